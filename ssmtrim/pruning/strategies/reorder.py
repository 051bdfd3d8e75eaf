"""``reorder`` (the EViT baseline): kept tokens in score order, the class token centred, and the pruned tokens fused
into one token appended at the end, weighted by their clipped scores (EViT's inattentive-token fusion). The fused
token stands at no single position (-1) and is a candidate at the next reduction point."""

from __future__ import annotations

import torch

from ssmtrim.models.tokens import gather_tokens
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import Strategy, centre_protected, gather_streams, register_strategy


class Reorder(Strategy):
    name = "reorder"
    keeps_positions = False
    description = "kept tokens in score order, pruned ones fused into one extra token (EViT)"

    def reduce(self, step: ReductionStep):
        state, scores = step.state, step.scores
        bsz, length = scores.shape
        masked = scores.masked_fill(state.protected(), float("-inf"))
        kept = torch.sort(-masked, dim=1, stable=True).indices[:, : step.k]  # score order, ties by position
        index, new_cls = centre_protected(kept, state)
        dropped = torch.ones(bsz, length, dtype=torch.bool, device=scores.device)
        dropped = dropped.scatter(1, index, torch.zeros_like(index, dtype=torch.bool))
        weights = (scores.clamp_min(0) + 1e-6) * dropped  # clipped scores of the pruned tokens, normalised
        fuse_w = weights / weights.sum(1, keepdim=True)
        fused = [None if t is None else (fuse_w[..., None] * t.float()).sum(1, keepdim=True).to(t.dtype)
                 for t in step.streams]  # fmt: skip
        streams = tuple(None if t is None else torch.cat([t, f], 1)
                        for t, f in zip(gather_streams(step.streams, index), fused, strict=True))  # fmt: skip
        positions = gather_tokens(state.positions, index)
        positions = torch.cat([positions, positions.new_full((bsz, 1), -1)], 1)
        sizes = None
        if state.sizes is not None:
            sizes = torch.cat([gather_tokens(state.sizes, index), (state.sizes * dropped).sum(1, keepdim=True)], 1)
        return streams, state.replace(positions=positions, cls_index=new_cls, reduced=True, sizes=sizes)


register_strategy(Reorder())
