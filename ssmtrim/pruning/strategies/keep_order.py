"""``keep-order``: the kept tokens in original order as a new, condensed sequence, the class token re-centred; no
position map for the later blocks (the released ToP-ViM code)."""

from __future__ import annotations

from ssmtrim.models.tokens import gather_tokens, topk_sorted
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import (
    Strategy,
    centre_protected,
    even_when_centred,
    gather_streams,
    register_strategy,
)


class KeepOrder(Strategy):
    name = "keep-order"
    keeps_positions = False
    description = "kept tokens condensed in original order, class token re-centred (the released code)"

    def threshold_count(self, k, candidates, state):
        return even_when_centred(k, candidates, state)

    def reduce(self, step: ReductionStep):
        state = step.state
        kept = topk_sorted(step.scores, step.k, state.protected())
        index, new_cls = centre_protected(kept, state)
        positions = gather_tokens(state.positions, index)
        sizes = None if state.sizes is None else gather_tokens(state.sizes, index)
        new_state = state.replace(positions=positions, cls_index=new_cls, reduced=True, sizes=sizes)
        return gather_streams(step.streams, index), new_state


register_strategy(KeepOrder())
