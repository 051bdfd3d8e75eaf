"""Vim's causal depth-wise conv1d + SiLU, over all tokens or over the tokens left after pruning.

``causal_conv1d_silu(x, conv, positions, length)``: x (B E L) in a scan direction's order; ``positions`` (B L), when
given, are the increasing original positions of the present tokens in a sequence of ``length``. The result is the
dense conv over the original grid, pruned positions reading as zero, evaluated at the present tokens (the position-
aware conv of hidden-state alignment). Two implementations with one meaning:

- PyTorch: ``nn.Conv1d`` (over the zero-filled original grid when positions are given, then gathered back);
- the scan backend's conv kernel, where it has one: the ``cpu`` backend's C kernel ``ssm_conv_silu``
  (``csrc/selective_scan.c``, :mod:`ssmtrim.ops.backends.cpu`) for CPU fp32: it reads x through its strides and
  visits only the present tokens, so the aligned conv costs no more than the plain one; its backward
  (``ssm_conv_silu_bwd``) serves training.
Where a gradient is wanted from a kernel without a backward, or a tracer (FLOP counting) is watching, PyTorch runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.ops.backend import backend_for
from ssmtrim.ops.backends import ConvKernel
from ssmtrim.ops.selective_scan import single_op_requested, tracing


def _wants_grad(x: Tensor, conv: nn.Conv1d) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters()))


def _kernel_for(x: Tensor, conv: nn.Conv1d, wants_grad: bool | None = None) -> ConvKernel | None:
    """The chosen backend's conv kernel when it may run on this input, else None (PyTorch); ``wants_grad`` as
    :func:`_wants_grad` says, when the caller has it already."""
    if tracing() or single_op_requested():
        return None
    width = conv.kernel_size[0]
    if conv.groups != x.shape[1] or conv.padding != (width - 1,) or conv.stride != (1,) or conv.dilation != (1,):
        return None
    kernel = backend_for(x.device).conv
    if wants_grad is None:
        wants_grad = _wants_grad(x, conv)
    if kernel is None or (kernel.backward is None and wants_grad):
        return None
    return kernel if kernel.accepts(x, conv) else None


class _KernelConvSilu(torch.autograd.Function):
    """A conv kernel's forward and backward as one autograd node (the weight and bias are its inputs, so that their
    gradients reach the conv's parameters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, conv, positions, length):  # noqa: ANN001, ARG004
        ctx.kernel, ctx.conv = kernel, conv
        ctx.save_for_backward(x, positions)
        return kernel.run(x, conv, positions, length)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: ANN001
        x, positions = ctx.saved_tensors
        dx, dweight, dbias = ctx.kernel.backward(x, ctx.conv, positions, grad)
        return dx.to(x.dtype), dweight, dbias, None, None, None, None


def _kernel_applies(x: Tensor, conv: nn.Conv1d) -> bool:
    return _kernel_for(x, conv) is not None


def causal_conv1d_silu(x: Tensor, conv: nn.Conv1d, positions: Tensor | None = None,
                       length: int | None = None) -> Tensor:
    """SiLU(causal depth-wise conv1d) of x (B E L); see the module docstring for ``positions`` and ``length``."""
    wants_grad = _wants_grad(x, conv)
    kernel = _kernel_for(x, conv, wants_grad)
    if kernel is not None and wants_grad:
        return _KernelConvSilu.apply(x, conv.weight, conv.bias, kernel, conv, positions, length)
    if kernel is not None:
        return kernel.run(x, conv, positions, length)
    if positions is None:
        return F.silu(conv(x)[..., : x.shape[-1]])
    full = int(length) if length is not None else int(positions.max()) + 1
    idx = positions[:, None, :].expand(-1, x.shape[1], -1)
    grid = x.new_zeros(x.shape[0], x.shape[1], full).scatter_(2, idx, x)
    return F.silu(conv(grid)[..., :full].gather(2, idx))
