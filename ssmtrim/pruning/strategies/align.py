"""``align`` (Zhan et al., NeurIPS 2024, §2, pruning-aware hidden-state alignment): the kept tokens stay in original
order with the class token at its original place, and the family runs the later blocks at the tokens' original
positions: convs read original neighbours (a pruned one reads as zero; Vim's ``--conv kept`` reads the previous kept
token instead) and each scan decays across the skipped positions, h = exp((Δ + G) A) h + Δ B x, G = (#skipped) · Δ̃.
"""

from __future__ import annotations

from ssmtrim.models.tokens import gather_tokens, topk_sorted
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import (
    GAP,
    Strategy,
    gather_streams,
    in_order_with_protected,
    register_strategy,
)


class Align(Strategy):
    name = "align"
    keeps_positions = True
    description = "kept tokens at their original positions; convs and scans see the gaps (the method)"
    options = (GAP,)

    def reduce(self, step: ReductionStep):
        state = step.state
        kept = topk_sorted(step.scores, step.k, state.protected())
        index, new_cls = in_order_with_protected(kept, state)
        positions = gather_tokens(state.positions, index)
        sizes = None if state.sizes is None else gather_tokens(state.sizes, index)
        new_state = state.replace(positions=positions, cls_index=new_cls, reduced=True, sizes=sizes)
        return gather_streams(step.streams, index), new_state


register_strategy(Align())
