"""``unmerge``: importance-ranked merging for the blocks, un-merged onto the full residual stream (after ToMe for
Stable Diffusion, which merges before a block's operations and un-merges their output).

The tokens that stay and where each removed token goes are chosen as ``merge`` chooses them (the k most important
stay, each removed token joins the staying token it is most similar to; with ``match=bipartite`` as ``tome`` does,
which with un-merging is ToMe for Stable Diffusion's scheme), but the streams are not shortened: the
residual stream keeps every original position. In the later blocks the family averages the positions each token
owns into that token before its mixer and its MLP, runs them on the k tokens (the scans at the tokens' positions,
decaying across the gaps, as for ``merge``), and adds each token's update to every position it owns. The owner map
composes across reduction points; the grid is whole wherever the family needs it (a downsample, the head, a dense
output) with nothing to restore. What the blocks save is the same as ``merge``'s at the same keep ratio; what the
residual stream keeps is every position's own value.

Shapes: B batch, L current tokens, L0 positions of the grid, K staying tokens, R removed.
"""

from __future__ import annotations

import torch

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import gather_tokens
from ssmtrim.pruning.options import Option
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import GAP, Strategy, register_strategy
from ssmtrim.pruning.strategies.merge import METRIC, PROTECT_AROUND, choose_merges, needs_of_metric, sizes_of
from ssmtrim.pruning.strategies.tome import choose_bipartite

MATCH = Option("match", "auto", "how the tokens that leave and their targets are chosen: importance the k most "
               "important stay and each other token joins its most similar one (merge's choice), bipartite ToMe's "
               "matching between alternate tokens (ToMe for Stable Diffusion's; keep 0.5 or more), auto bipartite "
               "where a step removes at most half of its tokens and importance where it removes more",
               choices=("auto", "importance", "bipartite"))


class Unmerge(Strategy):
    name = "unmerge"
    keeps_positions = True
    options = (METRIC, PROTECT_AROUND, MATCH, GAP)
    description = "merged for each later block's mixer and MLP, their updates un-merged onto the full residual stream"
    keeps_what = "of the tokens the blocks run on (the residual stream keeps every position)"

    def needs(self, plan) -> frozenset[str]:
        return super().needs(plan) | needs_of_metric(plan.option("metric")) | {"unmerge"}

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
        bsz, length = step.scores.shape
        match = step.plan.option("match")
        candidates = int(length) - step.state.num_protected
        if match == "bipartite" or (match == "auto" and candidates - step.k <= candidates // 2):
            src, dst = choose_bipartite(step)
            leaving = torch.zeros(bsz, length, dtype=torch.bool, device=src.device).scatter(
                1, src, torch.ones_like(src, dtype=torch.bool))
            index = torch.sort(leaving.long(), dim=1, stable=True).indices[:, : length - src.shape[1]]
        else:
            src, dst, _, index = choose_merges(step)
        staying = index.shape[1]
        device = index.device
        sizes = sizes_of(state)
        kept_sizes = gather_tokens(sizes, index)
        slot_of = torch.full((bsz, length), -1, dtype=torch.long, device=device).scatter(
            1, index, torch.arange(staying, device=device).expand(bsz, -1))
        moved = slot_of.scatter(1, src, slot_of.gather(1, dst)) if src.shape[1] else slot_of
        if src.shape[1]:
            kept_sizes = kept_sizes.scatter_add(1, slot_of.gather(1, dst), gather_tokens(sizes, src))
        old = state.owner if state.owner is not None else \
            torch.arange(state.length, device=device).expand(bsz, -1)
        protected = state.protected_index()
        new_cls = None if protected is None else slot_of.gather(1, protected)
        if new_cls is not None and state.cls_index.dim() == 1:
            new_cls = new_cls[:, 0]
        new = state.replace(positions=gather_tokens(state.positions, index), cls_index=new_cls, reduced=True,
                            sizes=kept_sizes, owner=moved.gather(1, old), track_owner=True, full_streams=True)
        return step.streams, new


register_strategy(Unmerge())
