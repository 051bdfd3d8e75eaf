"""Low-level ops: the selective scan (reference, fused CPU, mamba-ssm CUDA) and the backend switch."""

from ssmtrim.ops.backend import BACKENDS, describe_backends, resolve_backend, set_backend, use_backend
from ssmtrim.ops.selective_scan import scan_as_single_op, selective_scan, selective_scan_ref

__all__ = [
    "BACKENDS",
    "describe_backends",
    "resolve_backend",
    "scan_as_single_op",
    "selective_scan",
    "selective_scan_ref",
    "set_backend",
    "use_backend",
]
