"""Data-parallel training under ``torchrun``: joining the process group (:mod:`ssmtrim.distributed`) and checking
that ranks agree."""

from __future__ import annotations

import torch
from torch import nn

from ssmtrim.distributed import barrier, dist_info, init_distributed

__all__ = ["barrier", "dist_info", "init_distributed", "weights_checksum"]


def weights_checksum(model: nn.Module) -> float:
    """A float64 checksum of every parameter and buffer, for checking that ranks hold the same weights."""
    with torch.no_grad():
        return float(sum(t.detach().double().abs().sum() + t.detach().double().sum() * (i % 7 + 1)
                         for i, t in enumerate(model.state_dict().values()) if t.is_floating_point()))
