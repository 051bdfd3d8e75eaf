"""``ssmtrim.models.layers.attention``: a reduced sequence padded to a multiple of ATTENTION_MULTIPLE on the CPU
(faster there), the padding masked out: PyTorch's attention to rounding, with and without a size bias; never padded
where a FLOP count watches (the count is of the sequence itself)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmtrim.models.layers import ATTENTION_MULTIPLE, attention
from tests.tolerance import assert_close_across_cpus


@pytest.mark.parametrize("length", [1, 15, 16, 31, 62])
@pytest.mark.parametrize("biased", [True, False])
def test_padded_attention_is_attention(length, biased):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(3, 2, length, 8, generator=g) for _ in range(3))
    bias = torch.rand(3, 1, 1, length, generator=g).log() if biased else None
    with torch.no_grad():
        got = attention(q, k, v, bias)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert got.shape == want.shape
    assert_close_across_cpus(got, want)


def test_a_trace_sees_the_sequence_unpadded():
    """fvcore counts FLOPs (and an export records the graph) from a trace: there, no padding."""

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v)

    q = torch.randn(1, 2, ATTENTION_MULTIPLE - 1, 8)
    with torch.no_grad():
        graph = str(torch.jit.trace(Attend(), (q, q, q)).graph)
    assert "scaled_dot_product_attention" in graph
    assert "pad" not in graph
