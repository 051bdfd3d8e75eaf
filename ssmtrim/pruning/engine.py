"""The one family-agnostic reduction driver: embed, then block by block, and after each reduction point
score -> count -> strategy; the family adapter runs the blocks and the head, the strategy decides what the tokens
become. Per-forward state (:class:`~ssmtrim.pruning.state.TokenState`, the stats) is passed and returned.

Patching is ToMe's ``apply_patch``: the model's class is swapped for a subclass whose ``forward`` runs this driver,
weights untouched; :func:`remove_pruning` swaps it back, so "nothing reduced" is exactly the dense model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import (
    after_block_of,
    family_of,
    num_protected_of,
    provides_of,
    reducible_blocks_of,
    stages_of,
)
from ssmtrim.models.tokens import Streams, TokenState, owner_after
from ssmtrim.pruning.config import PruneConfig
from ssmtrim.pruning.scores import get_score
from ssmtrim.pruning.state import PruneStats, ReductionStep
from ssmtrim.pruning.strategies import get_strategy

# observer(block index 0-based, scores (B L), candidate mask (B L) of reducible tokens); used by calibration
ScoreObserver = Callable[[int, Tensor, Tensor], None]


@dataclass(frozen=True)
class DensePrefix:
    """The first ``blocks`` blocks run dense once, for several plans that reduce only after them (a method table, a
    schedule search): the streams and token state after those blocks (:func:`dense_prefix`), which
    :func:`reduced_forward` takes in place of the images. Holds a whole set of images; :meth:`select` takes some."""

    streams: Streams
    state: TokenState
    blocks: int

    def __len__(self) -> int:
        return self.state.positions.shape[0]

    def select(self, index: slice | Tensor) -> DensePrefix:
        """The prefix of some of the images (a slice or an index tensor over the batch)."""
        state = self.state
        taken = state.replace(positions=state.positions[index],
                              cls_index=None if state.cls_index is None else state.cls_index[index],
                              sizes=None if state.sizes is None else state.sizes[index],
                              owner=None if state.owner is None else state.owner[index])
        return DensePrefix(tuple(None if t is None else t[index] for t in self.streams), taken, self.blocks)


def dense_prefix(model: nn.Module, x: Tensor, blocks: int) -> DensePrefix:
    """Images (B 3 H W) through the embedding and the first ``blocks`` blocks of the dense model."""
    family = family_of(model)
    if not 0 <= blocks < family.depth(model.config):
        raise ConfigError(f"a dense prefix runs 0 to {family.depth(model.config) - 1} blocks, not {blocks}.")
    streams, state = family.embed(model, x, True)
    after = after_block_of(family)
    for i in range(blocks):
        streams = family.run_block(model, i, streams, state, None).streams
        streams, state = after(model, i, streams, state)
    return DensePrefix(streams, state, blocks)


@dataclass
class ReducedOutput:
    logits: Tensor  # B classes
    features: Tensor  # B D, what the classifier read
    state: TokenState | None  # of the last image's tokens after the last block (None when run image by image)
    stats: PruneStats
    maps: list[Tensor] | None = None  # with maps=True: each stage's output on its full grid (B C H W), restored


def kept_count(current: int, keep: float, centred: bool = True) -> int:
    """Unprotected tokens kept out of ``current``: floor(current * keep). With a class token to centre
    (``centred``) the count is made even so that the sequence length is odd and the class token sits exactly in the
    middle (the released Vim code: 196 -> 156 -> 124 -> 100 patch tokens at 0.8), at least 2; without, at least 1."""
    if keep >= 1.0:
        return current
    k = int(math.floor(current * keep + 1e-9))
    if not centred:
        return max(min(k, current), 1)
    if k % 2:
        k += 1
    return max(min(k, current), min(2, current))


def threshold_count(scores: Tensor, protected: Tensor, threshold: float) -> int:
    """Threshold mode: the unprotected tokens of ONE image whose score passes ``threshold`` (at least 1). Scores and
    the protected mask are (1 L); a batch would need a count per image, so it is refused rather than summed."""
    passing = ((scores >= threshold) & ~protected).sum(dim=1)  # B: a count per image
    if passing.numel() != 1:
        raise ValueError(f"threshold mode counts tokens image by image, got a batch of {passing.numel()}; run the "
                         "images one at a time (reduced_forward does).")
    return max(int(passing[0]), 1)


def reduced_forward(model: nn.Module, x: Tensor | DensePrefix, config: PruneConfig | None = None,
                    observer: ScoreObserver | None = None, maps: bool = False) -> ReducedOutput:
    """Images (B 3 H W), or their :class:`DensePrefix`, -> logits with tokens reduced as ``config`` (default: the
    model's plan) says. From a prefix the plan must reduce after its blocks only; the result is the same. With
    ``maps``, also each stage's output restored to its full grid (the family's ``feature_map``; see
    :func:`feature_maps`)."""
    config = config if config is not None else model.prune_config
    config.check_runnable()  # threshold mode without thresholds never falls back to counts in silence
    check_provides(model, config)  # a capability the family lacks is refused, never silently run without
    if config.mode == "threshold" and len(x) > 1:
        # each image keeps its own number of tokens, so a batch runs one image at a time
        one = (lambda i: x.select(slice(i, i + 1))) if isinstance(x, DensePrefix) else (lambda i: x[i : i + 1])
        outs = [reduced_forward(model, one(i), config, observer, maps) for i in range(len(x))]
        joined = [torch.cat(level) for level in zip(*(o.maps for o in outs), strict=True)] if maps else None
        return ReducedOutput(torch.cat([o.logits for o in outs]), torch.cat([o.features for o in outs]), None,
                             PruneStats.mean([o.stats for o in outs]), joined)
    family = family_of(model)
    strategy, score = get_strategy(config.arrangement), get_score(config.score)
    keep = config.keep_by_layer()
    if isinstance(x, DensePrefix):
        inside = [i + 1 for i in keep if i < x.blocks]
        if inside:
            raise ConfigError(f"this plan reduces after block {inside[0]}, inside the dense prefix of {x.blocks} "
                              f"blocks; make the prefix at most {min(keep)} block{'s' if min(keep) != 1 else ''} long.")
        streams, state, start = x.streams, x.state.replace(keeps_positions=strategy.keeps_positions), x.blocks
    else:
        streams, state = family.embed(model, x, strategy.keeps_positions)
        start = 0
    collected: list[Tensor] | None = None
    if maps:
        feature_map = getattr(family, "feature_map", None)
        if feature_map is None:
            raise ConfigError(f"a {family.name} model gives no feature maps (its family defines no feature_map).")
        state, collected = state.replace(track_owner=True), []
        stage_ends = {first - 1 for first, _ in stages_of(family, model.config)[1:]} | \
            {family.depth(model.config) - 1}
    thresholds = dict(zip(keep, config.thresholds, strict=True)) if config.thresholds is not None else {}
    stats = PruneStats()
    stats.tokens_per_block.extend([float(state.num_tokens)] * start)
    geometry = None
    after = after_block_of(family)
    # what run_block hands over at a reduction point (a capability such as "condensed" is checked, not handed over)
    needs_at_reduction = (score.needs(config) | strategy.needs(config)) - _CAPABILITIES
    for i in range(start, family.depth(model.config)):
        stats.tokens_per_block.append(float(state.num_tokens))
        needs = needs_at_reduction if i in keep else frozenset()
        output = family.run_block(model, i, streams, state, geometry, needs) if needs else \
            family.run_block(model, i, streams, state, geometry)
        streams = output.streams
        if i in keep:
            streams, state, geometry = _reduce_after(model, i, output, streams, state, geometry, config, keep,
                                                     thresholds, stats, observer)
        if collected is not None and i in stage_ends:
            collected.append(family.feature_map(model, i, streams, state))
        streams, moved = after(model, i, streams, state)
        if moved is not state:  # a stage change: the tokens now sit on the next stage's grid
            state, geometry = moved, None
    features = family.features(model, streams, state)
    return ReducedOutput(family.classifier(model)(features), features, state, stats, collected)


@torch.no_grad()
def feature_maps(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The backbone's outputs for dense tasks: each stage's output on its full grid (B C H W; a flat model has one
    stage), from a dense model or a reduced one, whose tokens are restored to the grid (a merged token un-merged to
    every position it stands for, a pruned position from its nearest token). timm's ``features_only`` in spirit:
    what a detection or segmentation head reads."""
    config = getattr(model, "prune_config", None)
    if config is None:
        family = family_of(model)
        config = PruneConfig(layers=(1,), keep=(1.0,)) if family.depth(model.config) > 1 else None
        if config is None:
            raise ConfigError("a one-block model has no reduction plan to run its feature maps through.")
    return reduced_forward(model, x, config, maps=True).maps


def _reduce_after(model: nn.Module, i: int, output, streams: Streams, state: TokenState, geometry, config: PruneConfig,
                  keep: dict[int, float], thresholds: dict[int, float], stats: PruneStats,
                  observer: ScoreObserver | None):
    """The reduction point after block ``i``: score -> count -> strategy; returns (streams, state, geometry)."""
    family = family_of(model)
    strategy, score = get_strategy(config.arrangement), get_score(config.score)
    # a seeded generator per plan and block keeps random scores reproducible
    generator = torch.Generator().manual_seed(config.seed * 1000 + i) if score.needs_generator else None
    if observer is not None or config.mode == "threshold":
        scores = score(output, generator)
    else:  # computed only if the strategy reads them
        def scores() -> Tensor:
            return score(output, generator)
    if observer is not None:
        observer(i, scores, ~state.protected())
    candidates = state.num_tokens - state.num_protected
    threshold = thresholds.get(i)
    if config.mode == "threshold" and threshold is not None:
        k = threshold_count(scores, state.protected(), threshold)
        k = strategy.threshold_count(k, candidates, state)
    else:
        k = kept_count(candidates, keep[i], centred=state.num_protected == 1)
    stats.kept_fraction.append(k / candidates)
    if k >= candidates and not strategy.steps_without_removal(config):
        return streams, state, geometry  # nothing to reduce here
    streams, new = strategy.reduce(ReductionStep(i, scores, k, streams, state, output, config))
    if state.track_owner and new.owner is state.owner and new.positions is not state.positions:
        # merged nothing: its tokens are found again by position (a step that moved none, QuarterMap's, keeps the map)
        new = new.replace(owner=owner_after(state, new))
    return streams, new, family.geometry(model, new, config)


class ReducedModel:
    """Mixed into a model's class by :func:`apply_pruning`: ``forward`` reduces tokens per ``prune_config``."""

    prune_config: PruneConfig

    def forward(self, x: Tensor) -> Tensor:
        return reduced_forward(self, x).logits

    def __reduce__(self):
        # the generated class is not importable by name: pickle the dense class and rebuild the patch on load
        return _rebuild_reduced, (_dense_class(type(self)), self.__dict__)


_REDUCED_CLASSES: dict[type, type] = {}


def _dense_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if not issubclass(c, ReducedModel))


def _rebuild_reduced(dense_cls: type, state: dict) -> nn.Module:
    model = dense_cls.__new__(dense_cls)
    model.__dict__.update(state)
    model.__class__ = _reduced_class(dense_cls)
    return model


def _reduced_class(cls: type) -> type:
    if cls not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[cls] = type(f"Reduced{cls.__name__}", (ReducedModel, cls), {"__module__": __name__})
    return _REDUCED_CLASSES[cls]


def is_pruned(model: nn.Module) -> bool:
    return isinstance(model, ReducedModel)


def apply_pruning(model: nn.Module, config: PruneConfig) -> nn.Module:
    """Patch ``model`` in place so that its forward reduces tokens as ``config`` says; returns the same object."""
    if is_pruned(model):
        raise ConfigError("this model is already pruned; prune the dense model it came from instead.")
    check_plan_for(model, config)
    if config.is_identity and not get_strategy(config.arrangement).steps_without_removal(config):
        from ssmtrim.notices import notice

        notice("plan-removes-nothing", "every --keep is 1, so no step removes a token and the model runs as dense; "
               "give a keep ratio below 1 (e.g. --keep 0.8) or a FLOPs target (--flops 0.7).")
    model.__class__ = _reduced_class(type(model))
    model.prune_config = config
    return model


def check_plan_for(model: nn.Module, config: PruneConfig, runnable: bool = True) -> None:
    """Every check :func:`apply_pruning` makes of a plan, without patching: its layers fit the model, the strategy,
    score and family can honour its options, and each step can keep what it asks for. One sentence if not.
    ``runnable=False`` leaves out the one check a plan passes only after calibration (threshold mode's thresholds),
    so that a plan is checked before the calibration's work."""
    family = family_of(model)
    config.validate_for(family.depth(model.config))
    if runnable:
        config.check_runnable()
    strategy, score = get_strategy(config.arrangement), get_score(config.score)
    strategy.check_plan(config)  # options it cannot use: one sentence now, not mid-forward
    _check_score_options(score, config)
    family.check_plan(config)
    allowed = reducible_blocks_of(family, model.config)
    if allowed is not None:
        bad = [layer for layer in config.layers if layer - 1 not in allowed]
        if bad:
            raise ConfigError(f"--layers {','.join(map(str, bad))}: tokens of a {family.name} model can be reduced "
                              f"only after blocks {','.join(str(b + 1) for b in sorted(allowed))} (the others have no "
                              "tokens to reduce or no scan output to score); choose among those.")
    check_provides(model, config)
    _check_counts(family, model.config, config)


def check_provides(model: nn.Module, config: PruneConfig) -> None:
    """The plan's score and strategy get what they need from the model's family (checked by :func:`check_plan_for`
    and, cheaply, by every :func:`reduced_forward`, so that a plan run directly is refused rather than run as
    something else); one sentence if not."""
    family = family_of(model)
    provides = provides_of(family, model.config)
    for what, plugin in ((f"--score {config.score}", get_score(config.score)),
                         (f"--arrangement {config.arrangement}", get_strategy(config.arrangement))):
        missing = plugin.needs(config) - provides
        if missing:
            said = " and ".join(_NEEDS.get(m, m) for m in sorted(missing))
            hint = " (a merge's --metric y needs nothing more)" if missing <= {"mixer_input", "delta", "bc"} else ""
            raise ConfigError(f"{what} (as set) needs {said}, which a {family.name} model does not give; choose "
                              f"another score or strategy{hint}.")


_CAPABILITIES = frozenset({"condensed", "subsampled_scan", "unmerge", "exact_mixer"})
# what a score or strategy may need from a family, in words
_NEEDS = {"delta": "softplus(Δ) from the blocks", "mixer_input": "the blocks' normed mixer input",
          "bc": "the SSM's B and C from the blocks",
          "cls_attention": "the scans' implicit attention to a class token from the blocks",
          "condensed": "blocks that run the kept tokens as a new sequence without their grid positions",
          "subsampled_scan": "scans that can read a strided part of the grid (as VMamba's cross-scan can)",
          "exact_mixer": "blocks with per-token MLPs that can run them alone on merged tokens (apart from the mixers, "
                         "which may read every position)",
          "unmerge": "blocks that run their mixer and MLP on merged tokens and un-merge the updates onto the full "
                     "residual stream"}


def _check_score_options(score, config: PruneConfig) -> None:
    """A score option set away from its default while another score is chosen is refused, naming its scores."""
    from ssmtrim.pruning.scores.base import score_options, scores_reading

    mine = {o.name for o in score.options}
    for name, option in score_options().items():
        if name not in mine and config.option(name) != option.default:
            users = ", ".join(scores_reading(name))
            raise ConfigError(f"{option.flag} is an option of --score {users}; --score {score.name} does not use it, "
                              f"so leave {option.flag} out or choose one of those.")


def _check_counts(family, arch, config: PruneConfig) -> None:
    """A keep ratio so small that a step would keep fewer tokens than it can (at least 1, or 2 around a class token)
    is refused: the plan printed and saved must be the plan that runs."""
    if config.mode != "count":
        return
    protected = num_protected_of(family, arch)
    stages = stages_of(family, arch)
    stage, candidates = None, 0
    for block, keep in sorted(config.keep_by_layer().items()):
        start, tokens = max((s for s in stages if s[0] <= block), key=lambda s: s[0])
        if start != stage:  # the first step in this stage: its whole grid
            stage, candidates = start, tokens - protected
        wanted = math.floor(candidates * keep + 1e-9)
        kept = kept_count(candidates, keep, centred=protected == 1)
        if kept > wanted + 1:  # more than the one token that centres a class token: the floor was not honoured
            advice = (f"use a keep ratio of at least {kept / candidates:.3f} there" if kept < candidates else
                      "use a larger keep ratio or fewer --layers")
            raise ConfigError(f"keep {keep:g} after block {block + 1} would keep {wanted} of {candidates} tokens, but "
                              f"a step keeps at least {kept}; {advice}.")
        candidates = kept


def record_dense(model: nn.Module, names: list[str]) -> None:
    """Before a recovery step changes parameters ``names`` of a reduced model, keep their dense values
    (``model.dense_tensors``) so that the true dense model can be rebuilt (:func:`dense_of`), saved and compared."""
    params = dict(model.named_parameters())
    kept = model.__dict__.setdefault("dense_tensors", {})
    for name in names:
        kept.setdefault(name, params[name].detach().clone())


def changed_weights(model: nn.Module) -> dict[str, Tensor]:
    """The dense values of the parameters a recovery step changed (empty when pruning left every weight alone)."""
    return dict(model.__dict__.get("dense_tensors") or {})


def dense_of(model: nn.Module) -> nn.Module | None:
    """The dense model a reduced one came from: a copy with the reduction removed and any weights a recovery step
    changed restored to their dense values; None for a dense model."""
    import copy

    if not is_pruned(model):
        return None
    return remove_pruning(copy.deepcopy(model))


def remove_pruning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_pruning`: the dense model again (same object; weights that a recovery step changed are
    restored to their dense values)."""
    if not is_pruned(model):
        return model
    dense = model.__dict__.pop("dense_tensors", None) or {}
    if dense:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in dense.items():
                params[name].copy_(value)
    model.__dict__.pop("prune_config", None)
    model.__class__ = _dense_class(type(model))
    return model
