"""Small layers and initialisations the model families share: stochastic depth, the GELU MLP of a pre-norm block,
Mamba's initial dt bias, and attention over a reduced sequence."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ssmtrim.ops.tokens import standard_ops_only


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    @property
    def drops(self) -> bool:
        """Whether a forward may drop (training with p > 0); else it is the identity."""
        return self.p > 0.0 and self.training

    def forward(self, x: Tensor) -> Tensor:
        if not self.drops:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2, with biases (timm's ``Mlp``; the official models' ``mlp.fc1`` / ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def initial_dt_bias(shape: int | tuple[int, ...], dt_min: float = 1e-3, dt_max: float = 0.1,
                    dt_floor: float = 1e-4) -> Tensor:
    """Mamba's dt bias: softplus(bias) log-uniform in [dt_min, dt_max] (at least dt_floor), as its inverse."""
    dt = torch.exp(torch.rand(shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(dt_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


# the CPU's fused attention runs a sequence whose length is a multiple of this at up to twice the speed of one a few
# tokens shorter (benchmarks/bench_attention.py): a reduced window or grid is padded to it, the padding masked out
ATTENTION_MULTIPLE = 16


def self_attention(x: Tensor, qkv: nn.Linear, heads: int, bias: Tensor | None = None) -> Tensor:
    """Multi-head self-attention of x (B L D) with ``qkv`` (D -> 3D: q, k, v, each ``heads`` heads) and bias
    (B 1 1 L, added to the logits) or None -> the heads' outputs side by side (B L D), before the output projection;
    ``F.scaled_dot_product_attention``. On the CPU, outside a trace, export or FLOP count, a length that is not a
    multiple of ATTENTION_MULTIPLE is padded to one with zero rows of x (before ``qkv``: q, k and v then come as the
    unpadded ones do, strided views of one projection), the padded keys masked out (weight exactly 0) and the padded
    queries' rows dropped: the same values to rounding, faster."""
    bsz, length, dim = x.shape
    padded = x.device.type == "cpu" and not (standard_ops_only() or torch.compiler.is_compiling())
    pad = -length % ATTENTION_MULTIPLE if padded else 0  # a trace reads no length as a number
    mask = bias
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        mask = x.new_zeros(bsz, 1, 1, length) if bias is None else bias.to(x.dtype).expand(bsz, 1, 1, length)
        mask = F.pad(mask, (0, pad), value=float("-inf"))
    qkv_ = qkv(x).reshape(bsz, length + pad, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv_[0], qkv_[1], qkv_[2], attn_mask=mask).transpose(1, 2)
    return (out[:, :length] if pad else out).reshape(bsz, length, dim)
