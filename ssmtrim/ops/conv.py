"""Vim's causal depth-wise conv1d + SiLU, over all tokens or over the tokens left after pruning.

``causal_conv1d_silu(x, conv, positions, length)``: x (B E L) in a scan direction's order; ``positions`` (B L), when
given, are the increasing original positions of the present tokens in a sequence of ``length``. The result is the
dense conv over the original grid, pruned positions reading as zero, evaluated at the present tokens (the position-
aware conv of hidden-state alignment). Two implementations with one meaning:

- PyTorch: ``nn.Conv1d`` (over the zero-filled original grid when positions are given, then gathered back);
- the scan backend's conv kernel, where it has one: the ``cpu`` backend's C kernel ``ssm_conv_silu``
  (``csrc/selective_scan.c``, :mod:`ssmtrim.ops.backends.cpu`) for CPU fp32 inference: it reads x through its strides
  and visits only the present tokens, so the aligned conv costs no more than the plain one.
A kernel has no backward; whenever a gradient is wanted, or a tracer (FLOP counting) is watching, PyTorch runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.ops.backend import backend_for
from ssmtrim.ops.backends import ConvKernel
from ssmtrim.ops.selective_scan import single_op_requested


def _kernel_for(x: Tensor, conv: nn.Conv1d) -> ConvKernel | None:
    """The chosen backend's conv kernel when it may run on this input, else None (PyTorch)."""
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return None
    if torch.jit.is_tracing() or single_op_requested():
        return None
    width = conv.kernel_size[0]
    if conv.groups != x.shape[1] or conv.padding != (width - 1,) or conv.stride != (1,) or conv.dilation != (1,):
        return None
    kernel = backend_for(x.device).conv
    return kernel if kernel is not None and kernel.accepts(x, conv) else None


def _kernel_applies(x: Tensor, conv: nn.Conv1d) -> bool:
    return _kernel_for(x, conv) is not None


def causal_conv1d_silu(x: Tensor, conv: nn.Conv1d, positions: Tensor | None = None,
                       length: int | None = None) -> Tensor:
    """SiLU(causal depth-wise conv1d) of x (B E L); see the module docstring for ``positions`` and ``length``."""
    kernel = _kernel_for(x, conv)
    if kernel is not None:
        return kernel.run(x, conv, positions, length)
    if positions is None:
        return F.silu(conv(x)[..., : x.shape[-1]])
    full = int(length) if length is not None else int(positions.max()) + 1
    idx = positions[:, None, :].expand(-1, x.shape[1], -1)
    grid = x.new_zeros(x.shape[0], x.shape[1], full).scatter_(2, idx, x)
    return F.silu(conv(grid)[..., :full].gather(2, idx))
