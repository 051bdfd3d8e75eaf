"""Token importance scores: registered objects, one module each. A score reads what a block produced (its gated SSM
output y, and softplus(Δ) where the family gives it) and returns one number per token, higher is more important."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import BlockOutput
from ssmtrim.pruning.options import Option, declarations_changed


class Score:
    """Subclass, set ``name``, implement :meth:`__call__`, and :func:`register_score` an instance."""

    name: ClassVar[str]
    needs_generator: ClassVar[bool] = False  # draws random numbers (given a generator seeded per plan and block)
    options: ClassVar[tuple[Option, ...]] = ()  # options it reads from the plan, declared in its own module

    def needs(self, plan) -> frozenset[str]:
        """What the family must hand over besides y ("delta": softplus(Δ), computed only when asked); checked
        against the family's ``provides`` when a plan is applied, as a strategy's needs are."""
        return frozenset()

    def __call__(self, output: BlockOutput, generator: torch.Generator | None = None) -> Tensor:
        """-> scores (B L)."""
        raise NotImplementedError


_SCORES: dict[str, Score] = {}


def register_score(score: Score) -> Score:
    _SCORES[score.name] = score
    declarations_changed()
    return score


def unregister_score(name: str) -> None:
    _SCORES.pop(name, None)
    declarations_changed()


def score_options() -> dict[str, Option]:
    """Every option a registered score declares, by name."""
    return {o.name: o for s in _SCORES.values() for o in s.options}


def scores_reading(option: str) -> tuple[str, ...]:
    """The registered scores that declare ``option``."""
    return tuple(s.name for s in _SCORES.values() if option in {o.name for o in s.options})


def get_score(name: str) -> Score:
    if name not in _SCORES:
        raise ConfigError(f"--score {name!r} is not one of {', '.join(_SCORES)}.")
    return _SCORES[name]


def score_names() -> tuple[str, ...]:
    return tuple(_SCORES)
