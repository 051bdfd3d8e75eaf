"""Token importance scores: registered objects, one module each. A score reads what a block produced (its gated SSM
output y, and softplus(Δ) where the family gives it) and returns one number per token, higher is more important."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import BlockOutput


class Score:
    """Subclass, set ``name``, implement :meth:`__call__`, and :func:`register_score` an instance."""

    name: ClassVar[str]
    needs_delta: ClassVar[bool] = False  # reads softplus(Δ) (the family computes it only then)
    needs_generator: ClassVar[bool] = False  # draws random numbers (given a generator seeded per plan and block)

    def __call__(self, output: BlockOutput, generator: torch.Generator | None = None) -> Tensor:
        """-> scores (B L)."""
        raise NotImplementedError


_SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    _SCORES[score.name] = score
    return score


def unregister_score(name: str) -> None:
    _SCORES.pop(name, None)


def get_score(name: str) -> Score:
    if name not in _SCORES:
        raise ConfigError(f"--score {name!r} is not one of {', '.join(_SCORES)}.")
    return _SCORES[name]


def score_names() -> tuple[str, ...]:
    return tuple(_SCORES)
