"""The pruning plan: where, how much, how tokens are scored and arranged. Travels with the weights.

Terms (Zhan et al., NeurIPS 2024, arXiv 2409.18962):
- ``layers``: 1-based block indices AFTER which tokens are pruned (``5, 10, 15`` prunes after the 5th, 10th, 15th);
- ``keep``: fraction of the current patch tokens kept at each of those layers (Vim's class token is always kept;
  PlainMamba has none, see ``ssmtrim.models.plainmamba_grid``);
- ``score``: token importance, a registered score (:mod:`ssmtrim.pruning.scores`), from the gated SSM output y
  (B L E) of the pruning layer before out_proj: ``clipped`` mean_e max(0, y) (the method), ``unclipped`` mean_e y,
  ``l1`` mean_e |y|, ``l2`` ||y||_2, ``random``;
- ``arrangement``: the registered strategy (:mod:`ssmtrim.pruning.strategies`) that reduces the tokens: ``align``
  (original order, class token at its original position, and the scans keep the gap of pruned positions),
  ``keep-order`` (original order, class token re-centred, no gap: the released code), ``reorder`` (score order,
  pruned tokens fused into one extra token: the EViT baseline);
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
- ``metric`` (merging strategies): what token similarity is measured on, ``input`` the normed input of the block's
  mixer (the default, measured best), ``y`` the gated SSM output, ``delta`` softplus(Δ);
- ``drop_fraction`` (``merge``): the share of the removed tokens, the least important, that is dropped instead of
  merged (UTR's prune-then-merge; 0 merges every removed token);
- ``compensate``: ``head`` fits a closed-form correction of the final feature on the calibration images and folds it
  into the classifier (:mod:`ssmtrim.pruning.compensation`); ``compensate_alpha`` its ridge strength;
- ``mode``: ``count`` keeps a fixed number per layer (batch-friendly), ``threshold`` keeps each image's tokens whose
  score passes the calibrated per-layer threshold.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.options import declarations_version
from ssmtrim.pruning.scores import score_names
from ssmtrim.pruning.strategies import strategy_names

GAP_ESTIMATES = ("mean", "bias", "zero")  # the choices of the strategies' GAP option (strategies/base.py)
MODES = ("count", "threshold")
CONV_NEIGHBOURS = ("original", "kept")
# plan fields that are plug-in options (declared by their strategies); kept as fields for folders written before
# plug-ins declared their options, every other plug-in option lives in ``options``
OPTION_FIELDS = ("gap", "metric", "drop_fraction")


_DECLARED: dict[int, dict] = {}  # the declared options, by the declarations' version (one entry)


def declared_options() -> dict:
    """Every option a registered strategy or score declares, by name (:mod:`ssmtrim.pruning.options`); the same
    mapping between registrations (read it, do not change it)."""
    version = declarations_version()
    if version not in _DECLARED:
        from ssmtrim.pruning.scores.base import score_options
        from ssmtrim.pruning.strategies.base import strategy_options

        _DECLARED.clear()
        _DECLARED[version] = {**score_options(), **strategy_options()}
    return _DECLARED[version]


def describe_options() -> list[dict[str, Any]]:
    """Every declared plug-in option, by name: how it is given (the plan's option fields by their own flag, e.g.
    ``--gap``; the others as ``--option NAME=VALUE``), its default, its allowed values (``choices``, or ``low`` and
    ``high``), the registered strategies and scores that read it, and what it does (``ssmtrim options``)."""
    from ssmtrim.pruning.scores.base import scores_reading
    from ssmtrim.pruning.strategies.base import strategies_reading

    return [{"name": name, "given_as": option.flag if name in OPTION_FIELDS else f"--option {name}=VALUE",
             "default": option.default, "choices": None if option.choices is None else list(option.choices),
             "low": option.low, "high": option.high,
             "read_by": {"strategies": list(strategies_reading(name)), "scores": list(scores_reading(name))},
             "help": option.help}
            for name, option in sorted(declared_options().items())]


def _sequence(values: Any, flag: str) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{flag} takes a sequence of numbers, e.g. (5, 10), got {values!r}.")
    return tuple(values)


def _block_indices(values: Any) -> tuple[int, ...]:
    """``layers`` as ints; a float, bool or text is refused, never rounded into another block."""
    out = []
    for v in _sequence(values, "--layers"):
        try:
            if isinstance(v, (bool, str, bytes)):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ConfigError(f"--layers are whole block numbers, got {v!r}; give e.g. 5,10,15.") from None
    return tuple(out)


def _ratios(values: Any) -> tuple[float, ...]:
    """``keep`` as floats; a bool or text is refused."""
    out = []
    for v in _sequence(values, "--keep"):
        try:
            if isinstance(v, (bool, str, bytes)):
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError):
            raise ConfigError(f"--keep ratios are numbers in (0, 1], got {v!r}; give e.g. 0.8.") from None
    return tuple(out)

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
    metric: str = "input"  # merging: token similarity from the mixer input, the gated SSM output y, or softplus(Δ)
    drop_fraction: float = 0.0  # merging: share of the removed tokens (the least important) dropped, not merged
    compensate: str = "none"  # closed-form correction fitted on the calibration images: none or head
    compensate_alpha: float = 0.1  # its ridge strength (relative to the feature variance)
    # further plug-in options, (name, value) pairs sorted by name (a dict is accepted); see ssmtrim.pruning.options
    options: tuple[tuple[str, Any], ...] | dict[str, Any] = ()

    def __post_init__(self) -> None:
        layers, keep = _block_indices(self.layers), _ratios(self.keep)
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
        for name, value, allowed in (("score", self.score, score_names()),
                                     ("arrangement", self.arrangement, strategy_names()),
                                     ("mode", self.mode, MODES), ("conv", self.conv, CONV_NEIGHBOURS)):
            if value not in allowed:
                raise ConfigError(f"--{name} {value!r} is not one of {', '.join(allowed)}.")
        self._validate_options()
        if self.compensate not in ("none", "head"):
            raise ConfigError(f"--compensate {self.compensate!r} is not one of none, head.")
        if not float(self.compensate_alpha) > 0 or math.isinf(float(self.compensate_alpha)):
            raise ConfigError(f"--compensate-alpha {self.compensate_alpha} must be a positive number, e.g. 0.1.")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
            if len(self.thresholds) != len(layers):
                raise ConfigError("the plan has a different number of thresholds than pruning layers; recalibrate.")

    def _validate_options(self) -> None:
        """Each plug-in option checked by its declaration: the fields kept for earlier folders and ``options``."""
        declared = declared_options()
        given = dict(self.options.items() if isinstance(self.options, dict) else self.options)
        for name in given:
            if name in OPTION_FIELDS or name in {f.name for f in dataclasses.fields(self)}:
                raise ConfigError(f"option {name!r} is a field of the plan; set it as {name}=..., not in options.")
            if name not in declared:
                raise ConfigError(f"option {name!r} is not declared by any strategy or score (declared: "
                                  f"{', '.join(sorted(declared)) or 'none'}).")
        checked = {name: declared[name].validate(value) for name, value in given.items()}
        object.__setattr__(self, "options", tuple(sorted(checked.items())))
        for name in OPTION_FIELDS:
            if name in declared:
                object.__setattr__(self, name, declared[name].validate(getattr(self, name)))

    def option(self, name: str) -> Any:
        """A plug-in option's value: the plan's field or ``options`` entry, else the declared default."""
        if name in OPTION_FIELDS:
            return getattr(self, name)
        given = dict(self.options)
        if name in given:
            return given[name]
        declared = declared_options()
        if name not in declared:
            raise ConfigError(f"option {name!r} is not declared by any strategy or score.")
        return declared[name].default

    @property
    def needs_calibration(self) -> bool:
        """Threshold mode before calibration: the plan is complete, but cannot run until thresholds are set
        (:func:`ssmtrim.pruning.calibrate.calibrate` finds them; ``ssmtrim prune`` does it)."""
        return self.mode == "threshold" and self.thresholds is None

    def check_runnable(self) -> None:
        """Refuse a threshold-mode plan that has no thresholds yet, in one sentence."""
        if self.needs_calibration:
            raise ConfigError("--mode threshold needs calibrated thresholds; calibrate the plan first (ssmtrim prune "
                              "--mode threshold --data DIR does).")

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
        d = dataclasses.asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown pruning field(s) {unknown} in the checkpoint; it was written by a newer "
                              "ssmtrim.")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if isinstance(d.get("options"), dict):
            d["options"] = tuple(sorted(d["options"].items()))
        return cls(**d)

    def replace(self, **changes: Any) -> PruneConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def recommended(cls, model, task: str | None = None, **fields: Any) -> PruneConfig:
        """The recommended plan of ``model``'s family (``Family.recommended_plan``: strategy and options chosen by
        measurement, the hand-set layers) with ``fields`` (None: not given) on top; ``keep`` defaults to 0.8. The
        family's option fields and options hold for its own arrangement: with another arrangement given, its option
        fields (``OPTION_FIELDS``) take their defaults and its options only those the strategy or score reads.
        ``task`` "dense": the family's plan for a model whose feature maps feed a dense head (where it sets one: no
        bundled family does, their classification plans' restored maps agreeing best with dense on a segmentation
        proxy); "classify" (the default, None) the classifier's."""
        from ssmtrim.models.registry import family_of, recommended_plan_of

        base = recommended_plan_of(family_of(model), model.config, task or "classify")
        given = {k: v for k, v in fields.items() if v is not None}
        if given.get("arrangement", base.get("arrangement")) != base.get("arrangement"):
            # the family's values of the strategies' option fields (gap, metric, drop_fraction) were measured for its
            # own arrangement: another arrangement takes their defaults unless they are given (Vim's Δ̃ = 0 for
            # merged neighbours is not the method's Δ̃ for pruned positions under --arrangement align)
            base = {k: v for k, v in base.items() if k not in OPTION_FIELDS}
        merged = {**base, **given}
        if "options" in base:
            # the family's options that the chosen strategy or score reads (another arrangement or score given does
            # not inherit them), with the options given laid over them
            from ssmtrim.pruning.scores import get_score
            from ssmtrim.pruning.strategies import get_strategy

            plugins = (get_strategy(merged.get("arrangement", cls.arrangement)), get_score(merged.get("score",
                                                                                                   cls.score)))
            reads = {o.name for plugin in plugins for o in plugin.options}
            merged["options"] = {**{k: v for k, v in dict(base["options"]).items() if k in reads},
                                 **dict(given.get("options") or {})}
        merged.setdefault("keep", (0.8,))
        return cls(**merged)


@dataclass(frozen=True)
class CalibrationSettings:
    """Which images calibrate, and how they are read."""

    num_images: int = 256  # seeded subset of the calibration folder
    batch_size: int = 32
    seed: int = 0
    workers: int | None = None  # image-reading processes (None: a default for this machine)

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be at least 1, got {self.num_images}.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}.")


@dataclass(frozen=True)
class FlopsTarget:
    """A FLOPs budget instead of a hand-set keep ratio: ``ratio`` of the dense FLOPs in ``convention``. With
    ``keep_layers`` the plan's layers stay and only the keep ratio is solved for; otherwise a schedule is searched on
    the first ``search_images`` calibration images. With ``allocate`` the steps then get keep ratios of their own,
    chosen by KL to dense on those images (:func:`ssmtrim.pruning.schedule.allocate_keeps`)."""

    ratio: float
    convention: str = "paper"  # the published figures' convention, as everywhere a FLOPs target is taken
    keep_layers: bool = False
    search_images: int = 256
    # after the layers are chosen: one keep ratio per step, allocated by measured sensitivity (schedule.allocate_keeps)
    allocate: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0 or math.isnan(self.ratio):
            raise ConfigError(f"--flops {self.ratio} must be a fraction of the dense FLOPs in (0, 1), e.g. 0.7.")
        if self.convention not in ("full", "paper"):
            raise ConfigError(f"--flops-convention {self.convention!r} is not one of full, paper.")
        if self.search_images < 1:
            raise ConfigError(f"search_images must be at least 1, got {self.search_images}.")
