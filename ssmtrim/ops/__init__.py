"""Low-level ops: the selective scan (reference, fused CPU, mamba-ssm CUDA), its backend table and the switch."""

from ssmtrim.ops.backend import BACKENDS, describe_backends, resolve_backend, set_backend, use_backend
from ssmtrim.ops.backends import Backend, ConvKernel, get_backend, register_backend, unregister_backend
from ssmtrim.ops.selective_scan import scan_as_single_op, selective_scan, selective_scan_ref

__all__ = [
    "BACKENDS",
    "Backend",
    "ConvKernel",
    "describe_backends",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "scan_as_single_op",
    "selective_scan",
    "selective_scan_ref",
    "set_backend",
    "unregister_backend",
    "use_backend",
]
