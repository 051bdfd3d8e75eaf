"""Small layers and initialisations the model families share: stochastic depth, the GELU MLP of a pre-norm block, and
Mamba's initial dt bias."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
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
