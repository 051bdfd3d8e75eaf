"""Vim's causal conv + SiLU: the C kernel (forward and backward) against PyTorch's conv, over all tokens and over kept
ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssmtrim.ops import scan_as_single_op, use_backend
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.conv import _kernel_applies, causal_conv1d_silu

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")


def token_major(bsz: int, e: int, length: int, seed: int = 0) -> torch.Tensor:
    """x (B E L) laid out token-major with a row stride of 2E, like the x half of in_proj's output."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, length, 2 * e, generator=g)[..., :e].transpose(1, 2)


def kept_positions(bsz: int, kept: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(length, generator=g)[:kept].sort().values for _ in range(bsz)])


def zero_filled_reference(x: torch.Tensor, conv: nn.Conv1d, positions: torch.Tensor, length: int) -> torch.Tensor:
    """Written out: place the tokens on the original grid (zeros elsewhere), run the dense conv, read them back."""
    grid = torch.zeros(x.shape[0], x.shape[1], length)
    for b in range(x.shape[0]):
        grid[b][:, positions[b]] = x[b]
    dense = torch.nn.functional.silu(conv(grid)[..., :length])
    return torch.stack([dense[b][:, positions[b]] for b in range(x.shape[0])])


@requires_kernel
@pytest.mark.parametrize("e,width", [(40, 4), (70, 4), (130, 3)])  # channel chunks of 64: partial and several
@pytest.mark.parametrize("layout", ["token-major", "contiguous", "flipped"])
def test_kernel_matches_pytorch(e, width, layout):
    torch.manual_seed(e)
    conv = nn.Conv1d(e, e, width, groups=e, padding=width - 1)
    x = token_major(3, e, 17, seed=e)
    if layout == "contiguous":
        x = x.contiguous()
    elif layout == "flipped":
        x = x.flip(-1)
    pos = kept_positions(3, 17, 30, seed=e)
    pos[0] = torch.arange(13, 30)  # a run with no gap, starting late
    with use_backend("cpu"):
        assert _kernel_applies(x, conv)  # in grad mode too: the kernel has a backward
        with torch.no_grad():
            assert _kernel_applies(x, conv)
            fast_dense, fast_kept = causal_conv1d_silu(x, conv), causal_conv1d_silu(x, conv, pos, 30)
    with use_backend("ref"), torch.no_grad():
        assert not _kernel_applies(x, conv)
        slow_dense, slow_kept = causal_conv1d_silu(x, conv), causal_conv1d_silu(x, conv, pos, 30)
        written_out = zero_filled_reference(x, conv, pos, 30)
    torch.testing.assert_close(fast_dense, slow_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_kept, slow_kept, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow_kept, written_out, atol=1e-5, rtol=1e-5)
    assert fast_kept.is_contiguous()


@requires_kernel
def test_kernel_with_all_positions_is_the_dense_conv():
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = token_major(2, 8, 12)
    with use_backend("cpu"), torch.no_grad():
        full = causal_conv1d_silu(x, conv, torch.arange(12).expand(2, -1), 12)
        dense = causal_conv1d_silu(x, conv)
    torch.testing.assert_close(full, dense, atol=0, rtol=0)


@requires_kernel
@pytest.mark.parametrize("e,width,bias", [(40, 4, True), (70, 4, False), (130, 3, True)])
@pytest.mark.parametrize("kept", [False, True])
def test_kernel_gradients_match_pytorch(e, width, bias, kept):
    """Training through the kernel: the output and the gradients of x, the weight and the bias are PyTorch's."""
    torch.manual_seed(e)
    conv = nn.Conv1d(e, e, width, groups=e, padding=width - 1, bias=bias)
    pos = kept_positions(3, 17, 30, seed=e) if kept else None
    grad = torch.randn(3, e, 17, generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("cpu", "ref"):  # ref has no conv kernel: PyTorch's conv and autograd
        x = token_major(3, e, 17, seed=e).requires_grad_(True)
        conv.zero_grad()
        with use_backend(backend):
            assert _kernel_applies(x, conv) == (backend == "cpu")
            out = causal_conv1d_silu(x, conv, pos, 30 if kept else None)
        (out * grad).sum().backward()
        results.append((out.detach(), x.grad, conv.weight.grad.clone(), None if not bias else conv.bias.grad.clone()))
    for fast, slow in zip(*results, strict=True):
        if slow is None:
            assert fast is None
            continue
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_tracers_and_other_dtypes_use_pytorch():
    conv = nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = token_major(2, 8, 12).requires_grad_(True)
    pos = kept_positions(2, 12, 20)
    out = causal_conv1d_silu(x, conv, pos, 20)
    out.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    with torch.no_grad(), scan_as_single_op():
        assert not _kernel_applies(x.detach(), conv)
    with torch.no_grad():
        assert not _kernel_applies(x.detach().double(), conv.double())
