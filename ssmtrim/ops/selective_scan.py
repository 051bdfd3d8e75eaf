"""The selective scan of Mamba (Gu & Dao 2023, arXiv 2312.00752), several ways behind one signature.

:func:`selective_scan` runs it on the backend :func:`ssmtrim.ops.backend.resolve_backend` chooses, from the table in
:mod:`ssmtrim.ops.backends`:
- ``ref``: :func:`selective_scan_ref`, the readable loop, the reference twin (same semantics as mamba-ssm's
  ``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``);
- ``cpu``: the ``ssmtrim::selective_scan`` op: one registered PyTorch op (so fvcore and tracers see a single node)
  whose CPU implementation is the fused C kernel and whose backward is the kernel's reverse sweep;
- ``cuda``: mamba-ssm's CUDA ``selective_scan_fn`` when installed.

Per channel e and state n, with d_t = softplus(delta_t + bias) (or delta_t + bias):
    h_t = exp((d_t + G_t) A) h_{t-1} + d_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t * silu(z_t).
G (``gap``, optional) is the decay of pruned positions between two kept tokens: pruning-aware hidden-state
alignment (Zhan et al., NeurIPS 2024). It is given whole (B E L), or factored as counts ``gap`` (B L) times
``gap_scale`` (B E): G[b, e, t] = gap[b, t] * gap_scale[b, e] (number of pruned positions times their Δ estimate).
Maths run in fp32 whatever the input dtype; the output has u's dtype.

Shapes: u, delta, z (B E L); A (E N); B, C (B N L); D, delta_bias (E); last state (B E N).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import Tensor

from ssmtrim.ops.backend import backend_for, constant_when_compiled
from ssmtrim.ops.backends import cpu as cpu_backend
from ssmtrim.ops.backends.ref import full_gap, selective_scan_ref

__all__ = ["full_gap", "scan_as_single_op", "selective_scan", "selective_scan_ref", "single_op_requested", "tracing"]

_single_op: contextvars.ContextVar[bool] = contextvars.ContextVar("ssmtrim_scan_single_op", default=False)


@contextlib.contextmanager
def scan_as_single_op() -> Iterator[None]:
    """Route every CPU scan through the registered op (kernel, or the reference loop inside it), so that tracers such
    as fvcore see one ``ssmtrim::selective_scan`` node instead of an unrolled loop. Used by FLOP counting; scoped to
    this thread (or asyncio task)."""
    token = _single_op.set(True)
    try:
        yield
    finally:
        _single_op.reset(token)


def tracing() -> bool:
    """Whether this forward is being traced (``torch.compile``, ``torch.export``, ONNX export, ``torch.jit.trace``):
    kernels outside PyTorch's view and data-dependent shortcuts are left out, and the general path, which gives the
    same values, is taken."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@constant_when_compiled  # a compiled graph takes the answer at compile time
def single_op_requested() -> bool:
    """Inside :func:`scan_as_single_op` (a tracer is counting): ops keep to what the tracer can see."""
    return _single_op.get()


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    gap: Tensor | None = None,
    return_last_state: bool = False,
    backend: str | None = None,
    gap_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan on the backend chosen by :mod:`ssmtrim.ops.backend` (or ``backend``); see module docstring."""
    if single_op_requested() and u.device.type == "cpu":
        scan = cpu_backend.scan  # the registered op, whatever the backend: it runs the loop inside where it must
    else:
        scan = backend_for(u.device, backend).scan
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap, return_last_state, gap_scale)
