"""``unmerge``: importance-ranked merging for the blocks, un-merged onto the full residual stream (after ToMe for
Stable Diffusion, which merges before a block's operations and un-merges their output).

The tokens that stay and where each removed token goes are chosen as ``merge`` chooses them (the k most important
stay, each removed token joins the staying token it is most similar to, or with ``merge_into=adjacent`` the more
similar of its staying neighbours; with ``match=bipartite`` as ``tome`` does,
which with un-merging is ToMe for Stable Diffusion's scheme), but the streams are not shortened: the
residual stream keeps every original position. In the later blocks the family averages the positions each token
owns into that token before its mixer and its MLP, runs them on the k tokens (the scans at the tokens' positions,
decaying across the gaps, as for ``merge``), and adds each token's update to every position it owns. The owner map
composes across reduction points; the grid is whole wherever the family needs it (a downsample, the head, a dense
output) with nothing to restore. What the blocks save is the same as ``merge``'s at the same keep ratio; what the
residual stream keeps is every position's own value. With ``--option mixer=positions`` the mixers read every position,
exactly as dense, and only the MLPs (which act on each token alone) run on the merged tokens: a step then saves the
MLPs' FLOPs alone, and what it changes is only how each MLP sees a group of similar positions (their mean). With
``--option mlp_groups=block`` each later block's MLP regroups the positions around the step's tokens by its own input;
``--option mlp_share=S`` around a share S of them, so that the MLPs can run on fewer tokens than the mixers (a target
past the MLPs' reach with the mixers whole runs the mixers merged, gently, and the MLPs on a tenth of the tokens).

Shapes: B batch, L current tokens, L0 positions of the grid, K staying tokens, R removed.
"""

from __future__ import annotations

import math

import torch

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import WholeStreams
from ssmtrim.pruning.options import Option
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import GAP, Strategy, register_strategy
from ssmtrim.pruning.strategies.merge import (
    MERGE_INTO,
    METRIC,
    PROTECT_AROUND,
    choose_merges,
    merge_and_keep,
    needs_of_metric,
    sizes_of,
)
from ssmtrim.pruning.strategies.tome import choose_bipartite

MATCH = Option("match", "auto", "how the tokens that leave and their targets are chosen: importance the k most "
               "important stay and each other token joins its most similar one (merge's choice), bipartite ToMe's "
               "matching between alternate tokens (ToMe for Stable Diffusion's; keep 0.5 or more), auto bipartite "
               "where a step removes at most half of its tokens and importance where it removes more",
               choices=("auto", "importance", "bipartite"))
MIXER = Option("mixer", "tokens", "what the later blocks' mixers read: tokens the merged tokens, as their MLPs do, or "
               "positions every position, exactly as dense (only the per-token MLPs run on the merged tokens, so a "
               "step saves their FLOPs alone, and a family must have MLPs)", choices=("tokens", "positions"))

MLP_GROUPS = Option("mlp_groups", "step", "the groups of positions the later blocks' MLPs run on: step those chosen at "
                    "the reduction step, block regrouped by each block around the same tokens by the MLP's own input "
                    "(nearest token, then k-means rounds; a family must have MLPs)", choices=("step", "block"))
MLP_SHARE = Option("mlp_share", 1.0, "the share of a step's tokens the later blocks' MLPs run on: below 1, each "
                   "block's MLP regroups the positions around that share of the tokens (the largest groups) by its own "
                   "input, as mlp_groups=block does, so a step can merge gently for the mixers and harder for the MLPs "
                   "(at --keep 1 a step removes no token: the mixers read every position, the MLPs their share; a "
                   "family must have MLPs)", low=0.01, high=1.0)

# the MLPs' share of a step's tokens where a target is past the MLPs' reach (reaching_further): on 2,000 training images
# at -40% FLOPs (benchmarks/results/screen_mlp_share_{mv,vm64}_train.json) shares 1 / 0.25 / 0.1 / 0.05 kept 69.25 /
# 73.15 / 74.15 / 72.80 (mambavision_cifar) and 62.45 / 69.75 / 71.65 / 71.90 (vmamba_cifar64): 0.1, best on average
REACH_SHARE = 0.1
REACH = Option("reach_share", REACH_SHARE, "the share of a step's tokens the later blocks' MLPs run on where a target "
               "is past the reach of mixer=positions (the plan the schedule search then tries: the mixers on the "
               "merged tokens, the MLPs on this share); an mlp_share the plan sets is taken instead",
               low=0.01, high=1.0)


class Unmerge(Strategy):
    name = "unmerge"
    keeps_positions = True
    options = (METRIC, PROTECT_AROUND, MERGE_INTO, MATCH, GAP, MIXER, MLP_GROUPS, MLP_SHARE, REACH)
    description = "merged for each later block's mixer and MLP, their updates un-merged onto the full residual stream"
    keeps_what = "of the tokens the blocks run on (the residual stream keeps every position)"

    def needs(self, plan) -> frozenset[str]:
        mlps = self.reduces_mlps_only(plan) or self._regroups(plan)
        exact = {"exact_mixer"} if mlps else set()  # blocks with per-token MLPs
        return super().needs(plan) | needs_of_metric(plan.option("metric")) | {"unmerge"} | exact

    def reduces_mlps_only(self, plan) -> bool:
        return plan.option("mixer") == "positions"

    def mlp_share(self, plan) -> float:
        return float(plan.option("mlp_share"))

    def _regroups(self, plan) -> bool:
        return plan.option("mlp_groups") == "block" or self.mlp_share(plan) < 1.0

    def steps_without_removal(self, plan) -> bool:
        """With the MLPs on a share of the tokens, a step at keep 1 runs the later MLPs on that share, the mixers
        on every position exactly as dense (no merge, no un-merge, no matching)."""
        return self.mlp_share(plan) < 1.0

    def reaching_further(self, plan):
        """Past the MLPs' reach: the mixers on the merged tokens too, as gently as the target allows, and the MLPs on
        ``reach_share`` of a step's tokens (a tenth by default; the plan's own share where it sets one)."""
        if not self.reduces_mlps_only(plan):
            return None
        share = self.mlp_share(plan) if self.mlp_share(plan) < 1.0 else float(plan.option("reach_share"))
        return plan.replace(options={**dict(plan.options), "mixer": "tokens", "mlp_share": share})

    def fit_target(self, plan, meets):
        """With the MLPs on a share of the tokens: the largest share (to 1e-3) that still meets the target. A step
        that removes no token already runs the MLPs on that share, so where even keep 1 saves more than asked
        (vmamba_cifar64 at -30%: 31% with a tenth), the share takes up the difference the keep cannot."""
        share = self.mlp_share(plan)
        if share >= 1.0:
            return plan

        def with_share(value: float):
            return plan.replace(options={**dict(plan.options), "mlp_share": value})

        lo, hi = share, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if meets(with_share(mid)) else (lo, mid)
        fitted = math.floor(lo * 1e3) / 1e3  # round down: the share only ever saves more
        return with_share(fitted) if fitted > share else plan

    def reach_hint(self, plan) -> str:
        if not self.reduces_mlps_only(plan):
            return ""
        return ("; with --option mixer=positions only the MLPs save FLOPs (--option mixer=tokens runs the mixers on "
                "the merged tokens too and reaches further, with --option mlp_share=0.1 the MLPs on a tenth of them)")

    def check_plan(self, plan) -> None:
        super().check_plan(plan)
        if plan.mode != "count":
            raise ConfigError("--arrangement unmerge runs a batch on one owner map per image with the same number "
                              "of tokens; use --mode count (the default).")
        low = [k for k in plan.keep_by_layer().values() if k < 0.5]
        if plan.option("match") == "bipartite" and low:
            raise ConfigError(f"--option match=bipartite merges at most half the tokens of a step, so it cannot keep "
                              f"{min(low):g} of them; use keep >= 0.5, or leave match at importance.")

    def reduce(self, step: ReductionStep):
        state = step.state
        length = step.state.positions.shape[1]
        candidates = int(length) - state.num_protected
        if step.k >= candidates:  # nothing leaves (steps_without_removal): only the MLPs' share changes anything
            return step.streams, self._unreduced(step)
        match = step.plan.option("match")
        if match == "bipartite" or (match == "auto" and candidates - step.k <= candidates // 2):
            src, dst, index = choose_bipartite(step)
            removed = src
        else:
            src, dst, removed, index = choose_merges(step)
        # merge's bookkeeping (slots, sizes, owner map) with no stream to shorten: the streams stay whole
        _, new = merge_and_keep(state.replace(track_owner=True), (), sizes_of(state), src, dst, removed, index)
        share = self.mlp_share(step.plan) if self._regroups(step.plan) else None
        return step.streams, new.replace(whole=WholeStreams(self.reduces_mlps_only(step.plan), share))

    def _unreduced(self, step: ReductionStep):
        """The state after a step that removes nothing: every position its own token (the mixers read the positions
        as dense), the later MLPs regrouped around the plan's share of them; a stream already whole keeps its
        tokens."""
        state = step.state
        if state.full_streams:
            return state
        bsz, length = state.positions.shape
        identity = torch.arange(length, device=state.positions.device).expand(bsz, -1)
        return state.replace(owner=identity, sizes=sizes_of(state), track_owner=True,
                             whole=WholeStreams(True, self.mlp_share(step.plan)))


register_strategy(Unmerge())
