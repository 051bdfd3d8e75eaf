"""From a FLOPs target to a pruning schedule: search layers and keep ratios, keep the one closest to dense.

The FLOPs of a schedule are estimated from one fvcore count of the dense model: each block's FLOPs scale with the
tokens it sees (the scan, projections and norms are per token; the convs nearly so), everything else is fixed. For
each candidate set of pruning layers (one to three, spread over the depth) the largest common keep ratio that meets
the target is found by bisection on that estimate; the candidates are then run on the calibration images and the
one with the smallest KL(dense || pruned) of the logits wins. The winner's FLOPs are then counted for real. Inside
:func:`ssmtrim.distributed.sharded` each rank passes its block of the images and the KL sums are added across ranks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import family_of, num_protected_of, stages_of
from ssmtrim.models.tokens import mlp_tokens
from ssmtrim.pruning.config import PruneConfig
from ssmtrim.pruning.engine import apply_pruning, check_plan_for, check_provides, kept_count, remove_pruning
from ssmtrim.pruning.strategies import get_strategy

# candidate pruning positions as fractions of the depth (Vim-S's released 5, 10, 15 of 24 is about .2 .4 .6)
_CANDIDATES = (
    (0.1,), (0.2,), (0.3,), (0.4,), (0.5,),
    (0.1, 0.4), (0.2, 0.45), (0.2, 0.6), (0.3, 0.6), (0.33, 0.67),
    (0.1, 0.3, 0.5), (0.2, 0.4, 0.6), (0.15, 0.35, 0.6), (0.25, 0.5, 0.75),
    # more, smaller steps (the released logs: three 0.8 steps beat two 0.7 steps at a similar budget)
    (0.25, 0.42, 0.58, 0.75), (0.2, 0.4, 0.6, 0.8), (0.17, 0.33, 0.5, 0.67, 0.83),
)  # fmt: skip


@dataclass
class Candidate:
    layers: tuple[int, ...]
    keep: float
    estimated_ratio: float  # estimated FLOPs / dense FLOPs
    kl: float | None = None
    measured_ratio: float | None = None  # counted on the pruned model (the chosen candidate only)
    # the plan's options where the candidate runs the plan its strategy offers to reach further (reaching_further)
    # instead of the base plan; None: the base plan's
    options: dict | None = None


@dataclass
class ScheduleSearch:
    target: float
    convention: str
    chosen: Candidate
    candidates: list[Candidate]

    def to_dict(self) -> dict:
        return asdict(self)

    def plan(self, base: PruneConfig) -> PruneConfig:
        """``base`` with the chosen schedule (and the chosen plan's options)."""
        chosen = base if self.chosen.options is None else base.replace(options=self.chosen.options)
        return chosen.replace(layers=self.chosen.layers, keep=(self.chosen.keep,))


def tokens_per_block(model: nn.Module, layers: tuple[int, ...], keep: float | tuple[float, ...]) -> list[int]:
    """Tokens entering each block under a count-mode schedule (a protected class token included); ``keep`` is one
    ratio for every step or one per step of ``layers``."""
    keeps = dict(zip(layers, keep, strict=True)) if isinstance(keep, tuple) else dict.fromkeys(layers, keep)
    family = family_of(model)
    protected = num_protected_of(family, model.config)
    starts = dict(stages_of(family, model.config))
    out = []
    for block in range(family.depth(model.config)):
        if block in starts:  # a new stage's grid: every token of it
            candidates = starts[block] - protected
        out.append(candidates + protected)
        if block + 1 in keeps:
            candidates = kept_count(candidates, keeps[block + 1], centred=protected == 1)
    return out


def after_step(model: nn.Module, layers: tuple[int, ...]) -> list[bool]:
    """Whether each block runs after a reduction step of ``layers`` (1-based, as ``tokens_per_block``) on its stage's
    grid, where a strategy's later-block plan (an MLPs' share) applies even to a step that removed nothing."""
    family = family_of(model)
    starts = dict(stages_of(family, model.config))
    out, stepped = [], False
    for block in range(family.depth(model.config)):
        if block in starts:
            stepped = False
        out.append(stepped)
        stepped = stepped or block + 1 in layers
    return out


class FlopsModel:
    """FLOPs of a schedule, estimated from the dense model's per-block counts. Each block's FLOPs scale with the tokens
    it runs on; with a ``plan`` whose strategy runs the blocks' per-token MLPs on other tokens than their mixers
    (``reduces_mlps_only``: the mixers on every position; ``mlp_share`` below 1: the MLPs on a share of the step's
    tokens, also after a step that removes none where ``steps_without_removal``), the MLPs' part (the multiply-adds
    of the Linear layers of the family's ``token_mlp`` of each block) scales with the MLPs' tokens and the rest with
    the mixers'."""

    def __init__(self, model: nn.Module, convention: str = "full", plan: PruneConfig | None = None) -> None:
        from ssmtrim.flops import count_flops

        report = count_flops(model, convention=convention)
        self.total = report.total
        family = family_of(model)
        depth = family.depth(model.config)
        self.dense_tokens = tokens_per_block(model, (), 1.0)
        self.whole_blocks = [report.by_module.get(family.block_name(model.config, i), 0) for i in range(depth)]
        self.model = model
        self._mlp_blocks: list[int] | None = None  # the blocks' MLP FLOPs, made when a plan first needs them
        self.mlp_blocks = [0] * depth  # the MLPs' FLOPs where they scale apart from the mixers (else 0)
        self.mixers_whole = False  # the mixers run on every position
        self.mlp_share = 1.0
        self.steps_without_removal = False  # a step that removes nothing still runs the MLPs on their share
        if plan is not None:
            view = self.for_plan(plan)
            self.mlp_blocks, self.mixers_whole, self.mlp_share = view.mlp_blocks, view.mixers_whole, view.mlp_share
            self.steps_without_removal = view.steps_without_removal

    def for_plan(self, plan: PruneConfig) -> FlopsModel:
        """This estimate for ``plan`` from the same dense count (no second trace)."""
        strategy = get_strategy(plan.arrangement)
        whole, share = strategy.reduces_mlps_only(plan), strategy.mlp_share(plan)
        empty = strategy.steps_without_removal(plan)
        if (whole, share, empty) == (self.mixers_whole, self.mlp_share, self.steps_without_removal):
            return self
        view = copy.copy(self)
        view.mixers_whole, view.mlp_share, view.steps_without_removal = whole, share, empty
        if whole or share < 1.0:
            if self._mlp_blocks is None:
                check_provides(self.model, plan)  # a family without per-token MLPs (token_mlp): one sentence
                family = family_of(self.model)
                self._mlp_blocks = [_linear_macs(family.token_mlp(self.model, i)) * tokens
                                    for i, tokens in enumerate(self.dense_tokens)]
                view._mlp_blocks = self._mlp_blocks
            view.mlp_blocks = self._mlp_blocks
        else:
            view.mlp_blocks = [0] * len(self.whole_blocks)
        return view

    def ratio(self, layers: tuple[int, ...], keep: float | tuple[float, ...]) -> float:
        tokens = tokens_per_block(self.model, layers, keep)
        # the MLPs' share applies after a step that removed tokens, or after any step where the strategy runs one
        # that removes nothing (Strategy.steps_without_removal)
        stepped = after_step(self.model, layers) if self.steps_without_removal else [False] * len(tokens)
        saved = 0.0
        for whole, mlp, t, d, s in zip(self.whole_blocks, self.mlp_blocks, tokens, self.dense_tokens, stepped,
                                       strict=True):
            mixers = d if self.mixers_whole else t
            mlps = mlp_tokens(t, self.mlp_share) if s or t < d else t
            saved += (whole - mlp) * (1 - mixers / d) + mlp * (1 - mlps / d)
        return (self.total - saved) / self.total


def reachable_plan(model: nn.Module, base: PruneConfig, target: float, convention: str = "full",
                   layers: tuple[int, ...] | None = None, held: Collection[str] = (),
                   estimate: FlopsModel | None = None) -> PruneConfig:
    """``base``, or where no keep ratio of it reaches ``target`` x dense FLOPs (reducing after ``layers``, default
    after every block) the plan its strategy offers to reach further (``Strategy.reaching_further``; said in a note),
    unless that changes an option in ``held`` (the ones the user set: never overridden). A target that is not reached
    is left for the caller to refuse. ``estimate``: the model's FlopsModel in ``convention`` when the caller has one
    (else counted here, where a plan could reach further)."""
    further = get_strategy(base.arrangement).reaching_further(base)
    if further is None or any(dict(further.options).get(k) != dict(base.options).get(k) for k in held):
        return base
    layers = layers or tuple(range(1, family_of(model).depth(model.config)))
    estimate = estimate if estimate is not None else FlopsModel(model, convention)
    if estimate.for_plan(base).ratio(layers, 0.01) <= target:
        return base
    from ssmtrim.notices import notice

    was, now = dict(base.options), dict(further.options)
    changed = [k for k in now if was.get(k) != now[k]]
    notice("reach-further", f"--flops {target:g} is out of reach with --option "
           f"{', '.join(f'{k}={base.option(k)}' for k in changed)}, so the plan runs with --option "
           f"{', '.join(f'{k}={now[k]}' for k in changed)}.")
    return further


# a keep whose FLOPs estimate is this far below the target leaves the plan's strategy to fit the target more closely
FIT_SLACK = 0.005


def fitted_plan(flops: FlopsModel, plan: PruneConfig, layers: tuple[int, ...], keep: float, target: float,
                held: Collection[str] = ()) -> PruneConfig:
    """``plan``, or where its estimate at ``keep`` after ``layers`` saves clearly more than ``target`` asks (a keep
    cannot fit it: the FLOPs jump at the first token a step removes), the plan its strategy fits to the target
    (``Strategy.fit_target``: e.g. unmerge's MLPs on a larger share of the tokens), unless that changes an option in
    ``held`` (the user's)."""
    if flops.for_plan(plan).ratio(layers, keep) >= target - FIT_SLACK:
        return plan
    fitted = get_strategy(plan.arrangement).fit_target(
        plan, lambda p: flops.for_plan(p).ratio(layers, keep) <= target)
    was, now = dict(plan.options), dict(fitted.options)
    return plan if any(was.get(k) != now.get(k) for k in held) else fitted


def refuse_unreachable(flops: FlopsModel, plan: PruneConfig, target: float, convention: str) -> None:
    """One sentence, before any work, for a FLOPs target that no schedule of ``plan`` reaches on the estimate
    ``flops`` (the widest the search tries: a step after every block, or one after the first)."""
    error = _unreachable(flops, plan, target, convention)
    if error is not None:
        raise error


def _unreachable(flops: FlopsModel, plan: PruneConfig, target: float, convention: str,
                 found_none: bool = False) -> ConfigError | None:
    """The sentence for a target out of reach (or whatever the estimate, when the search ``found_none``)."""
    depth = family_of(flops.model).depth(flops.model.config)
    least = min(flops.ratio(tuple(range(1, depth)), 0.01), flops.ratio((1,), 0.01))
    if least <= target and not found_none:
        return None
    hint = get_strategy(plan.arrangement).reach_hint(plan)
    return ConfigError(f"--flops {target} is unreachable for this model: token pruning gets down to about "
                       f"{least:.2f} of the dense FLOPs ({convention} convention){hint}; ask for more.")


def _linear_macs(module: nn.Module | None) -> int:
    """Multiply-adds per token of the Linear layers in ``module`` (none: 0)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def keep_for(flops: FlopsModel, layers: tuple[int, ...], target: float,
             fixed: tuple[float, ...] = ()) -> float | None:
    """Largest keep ratio (to 1e-3) whose estimated FLOPs ratio is <= target; None if none is. With ``fixed`` (the
    keep ratios of the first steps) only the last step's ratio is solved for; otherwise one ratio for every step."""

    def ratio(keep: float) -> float:
        return flops.ratio(layers, (*fixed, keep) if fixed else keep)

    lo, hi = 0.01, 1.0
    if ratio(lo) > target:
        return None
    if ratio(1.0) <= target:  # a plan whose steps save FLOPs while removing no token (an MLPs' share)
        return 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) <= target else (lo, mid)
    return lo


@torch.no_grad()
def search_schedule(
    model: nn.Module,
    base: PruneConfig,
    target: float,
    images: Tensor,
    dense_logits: Tensor,
    convention: str = "full",
    batch_size: int = 32,
    progress=None,
    held: Collection[str] = (),
) -> ScheduleSearch:
    """Best schedule reaching ``target`` x dense FLOPs; ``base`` gives how tokens are reduced, and its layers (e.g.
    the family's hand-set schedule) are always a candidate, so the search never picks a schedule farther from dense
    on these images than that one. Where the strategy offers a plan that reaches further (``reaching_further``: e.g.
    unmerge's mixers merged gently and the MLPs on a tenth of the tokens, for the mixers-whole plan), its schedules are
    candidates too, unless it changes an option in ``held`` (the user's). Inside
    :func:`ssmtrim.distributed.sharded`, ``images`` and ``dense_logits`` are this rank's share (possibly none)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"--flops {target} must be a fraction of the dense FLOPs in (0, 1), e.g. 0.7.")
    depth = family_of(model).depth(model.config)
    flops = FlopsModel(model, convention, base)
    further = get_strategy(base.arrangement).reaching_further(base)
    plans = [base]
    if further is not None and all(dict(further.options).get(k) == dict(base.options).get(k) for k in held):
        plans.append(further)
    candidates: list[Candidate] = []
    layer_sets = list(dict.fromkeys([tuple(base.layers)] + [
        tuple(sorted({min(depth - 1, max(1, round(f * depth))) for f in fractions})) for fractions in _CANDIDATES]))
    for plan in plans:
        estimate = flops.for_plan(plan)
        for layers in layer_sets:
            keep = keep_for(estimate, layers, target)
            if keep is None:
                continue
            keep = math.floor(keep * 1e4) / 1e4  # round down: rounding up can cross a token-count step
            fitted = fitted_plan(flops, plan, layers, keep, target, held)
            try:  # a plan the strategy cannot run as asked (ToMe below keep 0.5, a step below its least count)
                check_plan_for(model, fitted.replace(layers=layers, keep=(keep,), mode="count", thresholds=None))
            except ConfigError:
                continue
            options = None if fitted is base else dict(fitted.options)
            candidates.append(Candidate(layers, keep, flops.for_plan(fitted).ratio(layers, keep), options=options))
    if not candidates:
        raise _unreachable(flops, base, target, convention, found_none=True)
    dense_logp = F.log_softmax(dense_logits.float(), 1)

    def plan_of(cand: Candidate) -> PruneConfig:
        return base if cand.options is None else base.replace(options=cand.options)

    def run(cand: Candidate, measure: bool = False) -> None:
        config = plan_of(cand).replace(layers=cand.layers, keep=(cand.keep,), mode="count", thresholds=None)

        def count(pruned: nn.Module) -> None:
            from ssmtrim.flops import count_flops

            cand.measured_ratio = count_flops(pruned, convention=convention).total / flops.total

        cand.kl = _kl_to_dense(model, config, images, dense_logp, batch_size, count if measure else None)

    for i, cand in enumerate(candidates):
        run(cand)
        if progress:
            progress("searching schedules", i + 1, len(candidates))
    chosen = min(candidates, key=lambda c: c.kl)
    # the estimate leaves out the pruning's own bookkeeping; count the winner and tighten its keep if it overshoots
    run(chosen, measure=True)
    estimate = flops.for_plan(plan_of(chosen))
    for _ in range(3):
        if chosen.measured_ratio <= target + 0.005:
            break
        keep = keep_for(estimate, chosen.layers, target - (chosen.measured_ratio - chosen.estimated_ratio))
        if keep is None:
            break
        keep = math.floor(keep * 1e4) / 1e4
        try:
            check_plan_for(model, plan_of(chosen).replace(layers=chosen.layers, keep=(keep,), mode="count",
                                                          thresholds=None))
        except ConfigError:
            break
        chosen = Candidate(chosen.layers, keep, estimate.ratio(chosen.layers, keep), options=chosen.options)
        run(chosen, measure=True)
        candidates.append(chosen)
    if chosen.options is not None:
        from ssmtrim.notices import notice

        was = dict(base.options)
        changed = ", ".join(f"{k}={v}" for k, v in chosen.options.items() if was.get(k) != v)
        # keyed by the choice: a later search in the same process that chooses other options says so too
        notice(f"search-further {changed}", f"the schedule search chose --option {changed} (closer to dense on the "
               "calibration images than the plan's own options at this target).")
    return ScheduleSearch(target, convention, chosen, candidates)


@torch.no_grad()
def allocate_keeps(
    model: nn.Module,
    base: PruneConfig,
    target: float,
    images: Tensor,
    dense_logits: Tensor,
    convention: str = "full",
    batch_size: int = 32,
    spread: tuple[float, ...] = (-0.1, -0.05, 0.0, 0.05, 0.1),
    progress=None,
) -> tuple[tuple[float, ...], list[dict]]:
    """Per-step keep ratios for ``base``'s layers at ``target`` x dense FLOPs, by measured sensitivity: every step
    but the last takes the common keep ratio plus one of ``spread``, the last step the keep that meets the target
    (on the FLOPs estimate), and the allocation with the smallest KL(dense || reduced) on ``images`` wins (the common
    ratio is among the candidates, so the winner is never farther from dense on these images). Returns (keeps, every
    candidate's keeps, estimated ratio and KL)."""
    import itertools

    layers = tuple(base.layers)
    flops = FlopsModel(model, convention, base)
    common = keep_for(flops, layers, target)
    if common is None:
        raise ConfigError(f"--flops {target} cannot be reached by reducing after blocks {layers}; ask for more.")
    dense_logp = F.log_softmax(dense_logits.float(), 1)
    tried: list[dict] = []
    grid = list(itertools.product(spread, repeat=len(layers) - 1))
    for i, offsets in enumerate(grid):
        head = tuple(min(1.0, max(0.05, common + o)) for o in offsets)
        last = keep_for(flops, layers, target, fixed=head)
        if last is None:
            continue  # the earlier steps keep too much for any last step to meet the target
        keeps = tuple(math.floor(k * 1e4) / 1e4 for k in (*head, last))
        config = base.replace(keep=keeps, mode="count", thresholds=None)
        try:
            check_plan_for(model, config)
        except ConfigError:
            continue
        tried.append({"keep": list(keeps), "estimated_ratio": flops.ratio(layers, keeps),
                      "kl": _kl_to_dense(model, config, images, dense_logp, batch_size)})
        if progress:
            progress("allocating keep ratios", i + 1, len(grid))
    if not tried:
        raise ConfigError(f"no allocation of keep ratios after blocks {layers} meets --flops {target}.")
    best = min(tried, key=lambda t: t["kl"])
    return tuple(best["keep"]), tried


def _kl_to_dense(model: nn.Module, config: PruneConfig, images: Tensor, dense_logp: Tensor, batch_size: int,
                 also: Callable[[nn.Module], None] | None = None) -> float:
    """Mean KL(dense || reduced) over the images of every rank with ``model`` patched by ``config`` for the
    forward (and ``also`` on the patched model), then the patch undone. ``images`` may be none on this rank."""
    from ssmtrim.distributed import sum_counts, sum_floats
    from ssmtrim.evaluate import predict

    pruned = apply_pruning(model, config)
    try:
        logits = predict(pruned, images, batch_size) if images.shape[0] else dense_logp[:0]
        if also is not None:
            also(pruned)
    finally:
        remove_pruning(pruned)
    kl = float(F.kl_div(F.log_softmax(logits, 1), dense_logp, log_target=True, reduction="sum"))
    return sum_floats(kl)[0] / sum_counts(images.shape[0])[0]
