"""``merge``: importance-ranked, order-preserving token merging (after MTR, arXiv 2507.14042, and UTR, EMNLP 2024).

The k most important unprotected tokens stay, at their original positions (the family runs later blocks as for
``align``: scans decay across the gaps, convs read original neighbours or, with Vim's ``--conv kept``, the previous
kept token). Each removed token is not lost but averaged into the kept token it is most similar to (cosine similarity
of ``metric``: the normed mixer input by default), size-weighted: a token that already stands for s original tokens
weighs s, and the sizes add up across reduction points. Every stream is merged the same way (Vim's hidden and fp32
residual streams alike). With ``drop_fraction`` > 0 the least important share of the removed tokens is dropped
instead (UTR's prune-then-merge). The class token neither leaves nor receives merges.

Shapes: B batch, L current tokens, K kept, R removed and merged, F similarity features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import BlockOutput, Streams, TokenState, gather_tokens
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import Strategy, register_strategy


def similarity_features(output: BlockOutput, metric: str) -> Tensor:
    """B L F features whose cosine similarity decides where a token is merged."""
    features = {"input": output.mixer_input, "y": output.y, "delta": output.delta}[metric]
    if features is None:
        raise ConfigError(f"--metric {metric} needs what this model family does not give; choose --metric y.")
    return features


def merge_into(streams: Streams, sizes: Tensor, src: Tensor, dst: Tensor) -> tuple[Streams, Tensor]:
    """Size-weighted average of the tokens ``src`` (B R) into ``dst`` (B R, current indices); every token keeps its
    place (the caller gathers the survivors). Returns the merged streams and the new sizes (B L)."""
    w_src = gather_tokens(sizes, src)
    total = sizes.scatter_add(1, dst, w_src)
    out = []
    for t in streams:
        if t is None:
            out.append(None)
            continue
        acc = t.float() * sizes[..., None]
        acc = acc.scatter_add(1, dst[..., None].expand(-1, -1, t.shape[-1]), gather_tokens(t.float(), src) *
                              w_src[..., None])  # fmt: skip
        out.append((acc / total[..., None]).to(t.dtype))
    return tuple(out), total


def survivors(state: TokenState, streams: Streams, sizes: Tensor, removed: Tensor) -> tuple[Streams, TokenState]:
    """Drop the ``removed`` tokens (B R) from the streams and the state; the rest keep their order."""
    bsz, length = sizes.shape
    keep = torch.ones(bsz, length, dtype=torch.bool, device=sizes.device).scatter(
        1, removed, torch.zeros_like(removed, dtype=torch.bool))
    index = torch.arange(length, device=sizes.device).expand(bsz, -1)[keep].view(bsz, int(length) - removed.shape[1])
    new_cls = None
    if state.cls_index is not None:
        new_cls = (index == state.cls_index[:, None]).long().argmax(1)
    new_state = state.replace(positions=gather_tokens(state.positions, index), cls_index=new_cls, reduced=True,
                              sizes=gather_tokens(sizes, index))  # fmt: skip
    return tuple(None if t is None else gather_tokens(t, index) for t in streams), new_state


def sizes_of(state: TokenState) -> Tensor:
    return state.sizes if state.sizes is not None else torch.ones(state.positions.shape,
                                                                  device=state.positions.device)


class Merge(Strategy):
    name = "merge"
    keeps_positions = True
    options = frozenset({"metric", "drop_fraction"})
    description = "removed tokens averaged into their most similar kept token, size-weighted, original order"

    def needs(self, plan) -> frozenset[str]:
        return frozenset({"mixer_input"} if plan.metric == "input" else {"delta"} if plan.metric == "delta" else ())

    def reduce(self, step: ReductionStep):
        state, scores = step.state, step.scores
        protected = state.protected()
        bsz, length = scores.shape
        removed = int(length) - int(protected[0].sum()) - step.k  # int(): shapes are tensors under tracing
        ranked = torch.sort(scores.masked_fill(protected, float("inf")), dim=1, stable=True).indices
        src_all = ranked[:, :removed]  # the least important first
        n_drop = int(round(step.plan.drop_fraction * removed))
        sizes = sizes_of(state)
        src = src_all[:, n_drop:]
        streams = step.streams
        if src.shape[1]:
            features = F.normalize(similarity_features(step.output, step.plan.metric).float(), dim=-1)
            sim = gather_tokens(features, src) @ features.transpose(1, 2)  # B R L
            targets = torch.ones(bsz, length, dtype=torch.bool, device=scores.device).scatter(
                1, src_all, torch.zeros_like(src_all, dtype=torch.bool))
            sim = sim.masked_fill(~(targets & ~protected)[:, None, :], float("-inf"))
            streams, sizes = merge_into(streams, sizes, src, sim.argmax(-1))
        return survivors(state, streams, sizes, src_all)


register_strategy(Merge())
