"""``ssmtrim.models.layers.self_attention``: a reduced sequence padded to a multiple of ATTENTION_MULTIPLE on the
CPU (faster there), the padding masked out: PyTorch's attention to rounding, with and without a size bias; never
padded where a FLOP count watches (the count is of the sequence itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmtrim.models.layers import ATTENTION_MULTIPLE, self_attention
from tests.tolerance import assert_close_across_cpus


def _reference(x, qkv, heads, bias):
    bsz, length, dim = x.shape
    q, k, v = qkv(x).reshape(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(bsz, length, dim)


@pytest.mark.parametrize("length", [1, 15, 16, 31, 62])
@pytest.mark.parametrize("biased", [True, False])
def test_padded_attention_is_attention(length, biased):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(3, length, 16, generator=g)
    qkv = torch.nn.Linear(16, 48)
    bias = torch.rand(3, 1, 1, length, generator=g).log() if biased else None
    with torch.no_grad():
        got = self_attention(x, qkv, 2, bias)
        want = _reference(x, qkv, 2, bias)
    assert got.shape == want.shape == x.shape
    assert_close_across_cpus(got, want)


def test_a_trace_sees_the_sequence_unpadded():
    """fvcore counts FLOPs (and an export records the graph) from a trace: there, no padding."""

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)

        def forward(self, x):
            return self_attention(x, self.qkv, 2)

    x = torch.randn(1, ATTENTION_MULTIPLE - 1, 16)
    with torch.no_grad():
        graph = str(torch.jit.trace(Attend(), (x,)).graph)
    assert "scaled_dot_product_attention" in graph
    assert "pad" not in graph
