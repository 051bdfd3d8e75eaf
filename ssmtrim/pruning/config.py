"""The pruning plan: where, how much, how tokens are scored and arranged. Travels with the weights.

Terms (Zhan et al., NeurIPS 2024, arXiv 2409.18962):
- ``layers``: 1-based block indices AFTER which tokens are pruned (``5, 10, 15`` prunes after the 5th, 10th, 15th);
- ``keep``: fraction of the current patch tokens kept at each of those layers (Vim's class token is always kept;
  PlainMamba has none, see ``ssmtrim.pruning.plainmamba``);
- ``score``: token importance, from the gated SSM output y (B L E) of the pruning layer before out_proj:
  ``clipped`` mean_e max(0, y) (the method), ``unclipped`` mean_e y, ``l1`` mean_e |y|, ``l2`` ||y||_2, ``random``;
- ``arrangement`` of the kept tokens: ``align`` (original order, class token at its original position, and the scans
  keep the gap of pruned positions), ``keep-order`` (original order, class token re-centred, no gap: the released
  code), ``reorder`` (score order, pruned tokens fused into one extra token: the EViT baseline);
- ``gap``: how ``align`` estimates the step size Δ of the positions that no longer exist: ``bias``
  softplus(dt bias) per channel, ``mean`` the mean Δ of the kept tokens in that layer and direction, ``zero`` no decay
  (the carry-over reading, equal to dropping the tokens for the recurrence). ``bias`` is the default: it measured
  best on the project's CIFAR-10 Vim (benchmarks/method_table.py), by 0.4 and 0.8 points of top-1 over ``mean`` at
  -30% and -52% FLOPs, and 2.2 and 3.3 over ``zero``;
- ``conv``: where ``align``'s causal conv1d (Vim) finds a kept token's neighbours: ``original`` (the method as
  specified: the original positions, a pruned neighbour reads as zero) or ``kept`` (the previous kept tokens, as
  ``keep-order``'s conv does, while the scan still keeps the gaps). ``original`` is the default; ``kept`` measured
  about 5 points of top-1 better on the project's CIFAR-10 Vim (README, "The method, measured"). PlainMamba's 2-D
  conv always runs on the original grid;
- ``mode``: ``count`` keeps a fixed number per layer (batch-friendly), ``threshold`` keeps each image's tokens whose
  score passes the calibrated per-layer threshold.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ssmtrim.errors import ConfigError

SCORES = ("clipped", "unclipped", "l1", "l2", "random")
ARRANGEMENTS = ("align", "keep-order", "reorder")
GAP_ESTIMATES = ("mean", "bias", "zero")
MODES = ("count", "threshold")
CONV_NEIGHBOURS = ("original", "kept")


@dataclass(frozen=True)
class PruneConfig:
    layers: tuple[int, ...]
    keep: tuple[float, ...]
    score: str = "clipped"
    arrangement: str = "align"
    gap: str = "bias"  # chosen by measurement: benchmarks/method_table.py (README, "The method, measured")
    mode: str = "count"
    thresholds: tuple[float, ...] | None = None  # per pruning layer, set by calibration
    seed: int = 0  # for the random score
    conv: str = "original"  # align's conv neighbours (Vim): original positions or the kept tokens

    def __post_init__(self) -> None:
        layers, keep = tuple(int(v) for v in self.layers), tuple(float(v) for v in self.keep)
        if len(keep) == 1 and len(layers) > 1:
            keep = keep * len(layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "keep", keep)
        if len(keep) != len(layers):
            raise ConfigError(f"--keep gives {len(keep)} ratios for {len(layers)} --layers; give one ratio, or one per "
                              "layer.")
        if list(layers) != sorted(set(layers)):
            raise ConfigError(f"--layers must be distinct and increasing, got {','.join(map(str, layers))}.")
        if any(v < 1 for v in layers):
            raise ConfigError("--layers are 1-based block indices (prune after that block); the smallest is 1.")
        for k in keep:
            if not (0.0 < k <= 1.0) or math.isnan(k):
                raise ConfigError(f"--keep ratio {k} is outside (0, 1]; give the fraction of tokens to keep, e.g. 0.8.")
        for name, value, allowed in (("score", self.score, SCORES), ("arrangement", self.arrangement, ARRANGEMENTS),
                                     ("gap", self.gap, GAP_ESTIMATES), ("mode", self.mode, MODES),
                                     ("conv", self.conv, CONV_NEIGHBOURS)):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r} is not one of {', '.join(allowed)}.")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if len(self.thresholds) != len(layers):
                raise ConfigError("the plan has a different number of thresholds than pruning layers; recalibrate.")
        if self.mode == "threshold" and self.thresholds is None:
            raise ConfigError("--mode threshold needs calibrated thresholds; run calibration (give --data).")

    def validate_for(self, depth: int) -> None:
        bad = [v for v in self.layers if v >= depth]
        if bad:
            raise ConfigError(f"--layers {','.join(map(str, bad))} out of range: this model has {depth} blocks, so "
                              f"pruning can follow blocks 1..{depth - 1}.")

    @property
    def is_identity(self) -> bool:
        """True when nothing is ever pruned (every keep ratio is 1 in count mode)."""
        return self.mode == "count" and all(k == 1.0 for k in self.keep)

    def keep_by_layer(self) -> dict[int, float]:
        """0-based block index -> keep ratio."""
        return {layer - 1: k for layer, k in zip(self.layers, self.keep, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown pruning field(s) {unknown} in the checkpoint; it was written by a newer "
                              "ssmtrim.")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes: Any) -> PruneConfig:
        return dataclasses.replace(self, **changes)


def kept_count(current: int, keep: float) -> int:
    """Patch tokens kept out of ``current``: floor(current * keep), made even so that with the class token the
    sequence length is odd and the class token can sit exactly in the middle (the released code: 196 -> 156 -> 124
    -> 100 patch tokens at 0.8). At least 2, at most ``current``."""
    if keep >= 1.0:
        return current
    k = int(math.floor(current * keep + 1e-9))
    if k % 2:
        k += 1
    return max(min(k, current), min(2, current))


@dataclass
class PruneStats:
    """What pruning recorded during one forward (typed per-forward state, not a dict)."""

    tokens_per_block: list[float] = field(default_factory=list)  # mean tokens entering each block
    kept_fraction: list[float] = field(default_factory=list)  # mean kept fraction at each pruning layer

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


def forward_image_by_image(model, x):
    """Threshold mode: each image keeps its own number of tokens, so a batch runs one image at a time; the model's
    ``last_stats`` becomes the mean over the images. ``model`` is a pruned model of any family."""
    import torch

    outs, stats = [], []
    for i in range(x.shape[0]):
        outs.append(model(x[i : i + 1]))
        stats.append(model.last_stats)
    model.last_stats = PruneStats.mean(stats)
    return torch.cat(outs)
