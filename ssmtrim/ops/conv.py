"""Vim's causal depth-wise conv1d + SiLU, over all tokens or over the tokens left after pruning.

``causal_conv1d_silu(x, conv, positions, length)``: x (B E L) in a scan direction's order; ``positions`` (B L), when
given, are the increasing original positions of the present tokens in a sequence of ``length``. The result is the
dense conv over the original grid, pruned positions reading as zero, evaluated at the present tokens (the position-
aware conv of hidden-state alignment). Two implementations with one meaning:

- PyTorch: ``nn.Conv1d`` (over the zero-filled original grid when positions are given, then gathered back);
- the C kernel ``ssm_conv_silu`` (``csrc/selective_scan.c``) for CPU fp32 inference with the ``cpu`` scan backend: it
  reads x through its strides and visits only the present tokens, so the aligned conv costs no more than the plain one.
The kernel has no backward; whenever a gradient is wanted, or a tracer (FLOP counting) is watching, PyTorch runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.ops import _cpu_kernel
from ssmtrim.ops.backend import resolve_backend
from ssmtrim.ops.selective_scan import _ptr, single_op_requested


def _kernel_applies(x: Tensor, conv: nn.Conv1d) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        return False
    if torch.jit.is_tracing() or single_op_requested():
        return False
    width = conv.kernel_size[0]
    if conv.groups != x.shape[1] or conv.padding != (width - 1,) or conv.stride != (1,) or conv.dilation != (1,):
        return False
    return resolve_backend(x.device) == "cpu"


def causal_conv1d_silu(x: Tensor, conv: nn.Conv1d, positions: Tensor | None = None,
                       length: int | None = None) -> Tensor:
    """SiLU(causal depth-wise conv1d) of x (B E L); see the module docstring for ``positions`` and ``length``."""
    if _kernel_applies(x, conv):
        return _conv_kernel(x, conv, positions)
    if positions is None:
        return F.silu(conv(x)[..., : x.shape[-1]])
    full = int(length) if length is not None else int(positions.max()) + 1
    idx = positions[:, None, :].expand(-1, x.shape[1], -1)
    grid = x.new_zeros(x.shape[0], x.shape[1], full).scatter_(2, idx, x)
    return F.silu(conv(grid)[..., :full].gather(2, idx))


def _conv_kernel(x: Tensor, conv: nn.Conv1d, positions: Tensor | None) -> Tensor:
    lib = _cpu_kernel.load()
    bsz, e, length = x.shape
    width = conv.kernel_size[0]
    weight = conv.weight.detach().reshape(e, width).contiguous()
    bias = None if conv.bias is None else conv.bias.detach().contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    out = torch.empty(bsz, e, length, dtype=torch.float32)
    sb, se, sl = x.stride()
    with torch.profiler.record_function("ssmtrim::causal_conv1d_silu"):  # so that profiles show the C call
        lib.ssm_conv_silu(_ptr(x), sb, se, sl, _ptr(pos), _ptr(weight), _ptr(bias), 1, _ptr(out), bsz, e, length,
                          width, torch.get_num_threads())
    return out
