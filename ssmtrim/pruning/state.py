"""Per-forward state of the reduction engine beyond the token state (:mod:`ssmtrim.models.tokens`): one reduction
step as a strategy sees it, and what a forward recorded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ssmtrim.models.tokens import BlockOutput, Streams, TokenState


@dataclass(frozen=True)
class ReductionStep:
    """One reduction point: what a strategy is given."""

    block: int  # 0-based block after which tokens are reduced
    # B L, higher is more important, or what computes them when :attr:`scores` is first read (a strategy that does
    # not read them, such as ToMe's matching, then costs none)
    score_of: Tensor | Callable[[], Tensor]
    k: int  # unprotected tokens to keep per image
    streams: Streams
    state: TokenState
    output: BlockOutput
    plan: Any  # the PruneConfig (strategy options such as the merge metric)
    # the scores once computed (a dict, not functools.cached_property, whose lock torch.compile cannot enter)
    _computed: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def scores(self) -> Tensor:
        """The tokens' scores (B L), higher is more important."""
        if "scores" not in self._computed:
            self._computed["scores"] = self.score_of() if callable(self.score_of) else self.score_of
        return self._computed["scores"]


@dataclass
class PruneStats:
    """What reduction recorded during one forward."""

    tokens_per_block: list[float] = field(default_factory=list)  # mean tokens entering each block
    kept_fraction: list[float] = field(default_factory=list)  # mean kept fraction at each reduction point

    @staticmethod
    def mean(stats: list[PruneStats | None]) -> PruneStats:
        """Per-image stats averaged (threshold mode runs images one by one)."""
        valid = [s for s in stats if s is not None]
        if not valid:
            return PruneStats()
        n = len(valid)
        blocks, layers = len(valid[0].tokens_per_block), len(valid[0].kept_fraction)
        return PruneStats(
            tokens_per_block=[sum(s.tokens_per_block[i] for s in valid) / n for i in range(blocks)],
            kept_fraction=[sum(s.kept_fraction[i] for s in valid) / n for i in range(layers)],
        )
