"""``merge``: importance-ranked, order-preserving token merging (after MTR, arXiv 2507.14042, and UTR, EMNLP 2024).

The k most important unprotected tokens stay, at their original positions (the family runs later blocks as for
``align``: scans decay across the gaps, convs read original neighbours or, with Vim's ``--conv kept``, the previous
kept token). Each removed token is not lost but averaged into the kept token it is most similar to (cosine similarity
of ``metric``: the normed mixer input by default), or with ``merge_into`` "adjacent" into the more similar of the kept
tokens just before and after it in the sequence, size-weighted: a token that already stands for s original tokens
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
from ssmtrim.models.tokens import BlockOutput, Streams, TokenState, gather_tokens, owner_after, tracing
from ssmtrim.ops.tokens import merge_kernels
from ssmtrim.pruning.options import Option
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies.base import GAP, Strategy, register_strategy

METRIC = Option("metric", "input", "what token similarity is measured on: input the normed input of the block's "
                "mixer (measured best), y the gated SSM output, delta softplus(Δ), bc the SSM's B and C of every "
                "scan direction", choices=("input", "y", "delta", "bc"))
DROP_FRACTION = Option("drop_fraction", 0.0, "the share of the removed tokens, the least important, dropped instead "
                       "of merged (UTR's prune-then-merge)", low=0.0, high=1.0)

REDUNDANCY = Option("redundancy", 0.0, "how much a token's redundancy (its highest similarity to another token, "
                    "standardised per image) lowers its importance when choosing the tokens that leave: 0 importance "
                    "alone", low=0.0, high=10.0)

PROTECT_AROUND = Option("protect_around", 0, "tokens within this many original positions of a protected token (the "
                        "class token) always stay (after STM's protection of the hidden states around the class "
                        "token): 0 none", low=0, high=100000)

MERGE_INTO = Option("merge_into", "similar", "which staying token a removed token is averaged into: similar the most "
                    "similar one anywhere in the sequence, adjacent the more similar of its nearest staying neighbours "
                    "before and after it in the sequence (after STM's bidirectional nearest-neighbour merging)",
                    choices=("similar", "adjacent"))

RESCALE = Option("rescale", "none", "a token others were merged into: none their size-weighted average, norm that "
                 "average rescaled to the size-weighted mean of their norms (averaging tokens that differ shrinks the "
                 "norm), in every stream", choices=("none", "norm"))


def needs_of_metric(metric: str) -> frozenset[str]:
    """What the family must hand over for ``metric``."""
    return frozenset({"input": {"mixer_input"}, "delta": {"delta"}, "bc": {"bc"}}.get(metric, ()))


def similarity_features(output: BlockOutput, metric: str) -> Tensor:
    """B L F features whose cosine similarity decides where a token is merged."""
    features = {"input": output.mixer_input, "y": output.y, "delta": output.delta, "bc": output.bc}[metric]
    if features is None:
        raise ConfigError(f"--metric {metric} needs what this model family does not give; choose --metric y.")
    return features


def merge_and_keep(state: TokenState, streams: Streams, sizes: Tensor, src: Tensor, dst: Tensor,
                   removed: Tensor, index: Tensor | None = None, rescale: bool = False) -> tuple[Streams, TokenState]:
    """The tokens that stay (all but ``removed`` (B R'), in their order), with the tokens ``src`` (B R, among the
    removed) averaged into ``dst`` (B R, current indices of staying tokens), size-weighted: a staying token becomes
    (its value x its size + the sum of its merged tokens' values x their sizes) / the sum of the sizes, and that sum is
    its new size. Removed tokens not in ``src`` are dropped. Only the staying tokens are computed. ``index`` (B K),
    when the caller has it: the staying tokens' current indices in increasing order (else found from ``removed``).
    With ``rescale`` each token that others were merged into is then rescaled to the size-weighted mean of their
    norms (:func:`rescaled`)."""
    bsz, length = sizes.shape
    device = sizes.device
    staying = int(length) - removed.shape[1]
    kernels = merge_kernels(sizes, *streams) if index is not None else None
    if kernels is not None:  # the same, in two C calls (ssmtrim.ops.tokens)
        streams, kept_sizes, slot_of = kernels.keep(index, src, dst, sizes, streams, rescale)
        return _placed(state, streams, kept_sizes, slot_of, index, src, dst)
    if index is None:
        keep = torch.ones(bsz, length, dtype=torch.bool, device=device).scatter(
            1, removed, torch.zeros_like(removed, dtype=torch.bool))
        if tracing():  # a stable sort puts the staying tokens first, in order: no data-dependent shape to trace
            index = torch.sort((~keep).long(), dim=1, stable=True).indices[:, :staying]
        else:  # the same indices, cheaper
            index = torch.arange(length, device=device).expand(bsz, -1)[keep].view(bsz, staying)
    kept_sizes = gather_tokens(sizes, index)
    # where each current token stays: its slot among the staying tokens (-1: removed)
    slot_of = torch.full((bsz, length), -1, dtype=torch.long, device=device).scatter(
        1, index, torch.arange(staying, device=device).expand(bsz, -1))
    if src.shape[1]:
        to = slot_of.gather(1, dst)  # B R: the slot each merged token goes to
        # one index_add over the batch's rows (slot + image x K): the staying value first, then the merged ones in
        # src order, as a scatter_add along the tokens would sum them
        flat_to = (to + torch.arange(bsz, device=device)[:, None] * staying).reshape(-1)
        w_src = gather_tokens(sizes, src)
        total = kept_sizes.reshape(-1).index_add(0, flat_to, w_src.reshape(-1)).view(bsz, staying)
        merged = []
        for t in streams:
            if t is None:
                merged.append(None)
                continue
            rows = t.shape[2:]
            acc = (gather_tokens(t, index).float() * kept_sizes[..., None]).reshape(bsz * staying, *rows)
            acc = acc.index_add_(0, flat_to, (gather_tokens(t, src).float() * w_src[..., None]).reshape(-1, *rows))
            merged.append((acc.view(bsz, staying, *rows) / total[..., None]).to(t.dtype))
        merged = rescaled(streams, tuple(merged), sizes, total, slot_of, index, src, dst) if rescale else merged
        streams, kept_sizes = tuple(merged), total
    else:
        streams = tuple(None if t is None else gather_tokens(t, index) for t in streams)
    return _placed(state, streams, kept_sizes, slot_of, index, src, dst)


def rescaled(before: Streams, after: Streams, sizes: Tensor, total: Tensor, slot_of: Tensor, index: Tensor,
             src: Tensor, dst: Tensor) -> Streams:
    """The merged streams ``after`` (B K ...) with each token that others were merged into rescaled so that its norm
    (over each row's features) is the size-weighted mean of the norms its tokens had in ``before`` (B L ...); a token
    nothing was merged into is left as it is. ``sizes`` (B L) before, ``total`` (B K) after; ``slot_of`` (B L) each
    current token's slot among the staying ``index`` (B K); ``src`` merged into ``dst`` (B R)."""
    if not src.shape[1]:
        return after
    bsz, staying = total.shape
    flat_to = (slot_of.gather(1, dst) + torch.arange(bsz, device=total.device)[:, None] * staying).reshape(-1)
    received = total > gather_tokens(sizes, index)  # sizes are positive: a token that took others grew
    out = []
    for t, m in zip(before, after, strict=True):
        if t is None or m is None:
            out.append(m)
            continue
        weighted = torch.linalg.vector_norm(t.float().flatten(2), dim=-1) * sizes  # B L
        goal = gather_tokens(weighted, index).reshape(-1).index_add(
            0, flat_to, gather_tokens(weighted, src).reshape(-1)).view(bsz, staying) / total
        now = torch.linalg.vector_norm(m.float().flatten(2), dim=-1).clamp_min(1e-12)
        scale = torch.where(received, goal / now, torch.ones_like(now))  # x 1.0 leaves a row's bits as they are
        out.append((m.float() * scale.view(bsz, staying, *([1] * (m.dim() - 2)))).to(m.dtype))
    return tuple(out)


def _placed(state: TokenState, streams: Streams, kept_sizes: Tensor, slot_of: Tensor, index: Tensor, src: Tensor,
            dst: Tensor, positions: Tensor | None = None, new_cls: Tensor | None = None) -> tuple[Streams, TokenState]:
    """The state after a merge step: the staying tokens' positions and sizes, the protected tokens' new indices, the
    owner map; ``slot_of`` (B L) each current token's slot among the staying ones ``index`` (B K) (-1: leaves).
    ``positions`` (B K) and ``new_cls`` (B P), where a kernel made them: the staying tokens' original positions and
    the protected tokens' new indices."""
    protected = state.protected_index()
    if new_cls is None and protected is not None:
        new_cls = slot_of.gather(1, protected)  # protected tokens always stay
    if new_cls is not None and state.cls_index.dim() == 1:
        new_cls = new_cls[:, 0]
    positions = gather_tokens(state.positions, index) if positions is None else positions
    new_state = state.replace(positions=positions, cls_index=new_cls, reduced=True, sizes=kept_sizes)
    if not state.track_owner:
        return streams, new_state
    # where each current token went: a staying token to its slot, a merged one to its target's, a dropped one nowhere
    moved = slot_of.scatter(1, src, slot_of.gather(1, dst)) if src.shape[1] else slot_of
    return streams, new_state.replace(owner=owner_after(state, new_state, moved))


def sizes_of(state: TokenState) -> Tensor:
    return state.sizes if state.sizes is not None else torch.ones(state.positions.shape,
                                                                  device=state.positions.device)


class Merge(Strategy):
    name = "merge"
    keeps_positions = True
    options = (METRIC, DROP_FRACTION, REDUNDANCY, PROTECT_AROUND, MERGE_INTO, RESCALE, GAP)
    description = ("removed tokens averaged into their most similar kept token (or kept neighbour), size-weighted, "
                   "original order")

    def needs(self, plan) -> frozenset[str]:
        return super().needs(plan) | needs_of_metric(plan.option("metric"))

    def reduce(self, step: ReductionStep):
        fused = _merged_in_one_call(step)
        if fused is not None:
            return fused
        src, dst, removed, index = choose_merges(step)
        return merge_and_keep(step.state, step.streams, sizes_of(step.state), src, dst, removed, index,
                              step.plan.option("rescale") == "norm")


def _merged_in_one_call(step: ReductionStep) -> tuple[Streams, TokenState] | None:
    """The step as :func:`choose_merges` then :func:`merge_and_keep` make it, in the backend's one merge-step call
    (``MergeKernels.step``: the ranking's keys, the choice, the merged rows, the new positions); None where that
    kernel is not there or cannot take the step (a redundancy term, which needs every token's similarities)."""
    plan, state = step.plan, step.state
    if plan.option("redundancy") > 0:
        return None
    removed = int(state.num_tokens) - state.num_protected - step.k
    n_drop = int(round(plan.option("drop_fraction") * removed))
    raw = similarity_features(step.output, plan.option("metric")) if removed > n_drop else None
    kernels = merge_kernels(step.scores, raw, state.sizes, *step.streams)
    if kernels is None or kernels.step is None:
        return None
    around = plan.option("protect_around") if state.cls_index is not None else 0
    streams, sizes, positions, new_cls, slot_of, src_all, index, dst = kernels.step(
        step.scores, state.positions, state.protected_index(), around, raw, state.sizes, step.streams, removed, n_drop,
        plan.option("merge_into") == "adjacent", plan.option("rescale") == "norm")
    return _placed(state, streams, sizes, slot_of, index, src_all[:, n_drop:], dst, positions, new_cls)


def choose_merges(step: ReductionStep) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Which tokens leave and where they go, by importance and similarity: (src (B R) the removed tokens that are
    merged, dst (B R) the staying token each goes to, removed (B R') every removed token, the least important first,
    index (B K) the staying tokens, the protected ones among them, in order)."""
    state, scores = step.state, step.scores
    protected = state.protected()
    bsz, length = scores.shape
    removed = int(length) - state.num_protected - step.k  # int(): shapes are tensors under tracing
    features = None
    redundancy = step.plan.option("redundancy")
    if redundancy > 0:
        features = F.normalize(similarity_features(step.output, step.plan.option("metric")).float(), dim=-1)
        scores = _standardised(scores.float(), protected) - redundancy * _standardised(
            _nearest_similarity(features, protected), protected)
    around = step.plan.option("protect_around")
    if around > 0 and state.cls_index is not None:
        anchors = state.positions.gather(1, state.protected_index())  # B P original positions
        if anchors.shape[1] == 1:  # one class token: no minimum over the anchors to take
            distance = (state.positions - anchors).abs()  # B L
        else:
            distance = (state.positions[:, :, None] - anchors[:, None, :]).abs().amin(-1)  # B L
        # above every other token, below the protected ones (which a step never removes, however few it keeps)
        scores = scores.float().masked_fill(distance <= around, torch.finfo(torch.float32).max)
    keys = scores.masked_fill(protected, float("inf"))
    n_drop = int(round(step.plan.option("drop_fraction") * removed))
    if features is None and removed > n_drop:
        raw = similarity_features(step.output, step.plan.option("metric"))
    else:
        raw = features
    kernels = merge_kernels(keys, raw)
    if kernels is not None:  # the same choice in one C call (ssmtrim.ops.tokens), the features normed there
        src_all, index, dst = kernels.choose(keys, protected, raw, removed, n_drop,
                                             step.plan.option("merge_into") == "adjacent")
        return src_all[:, n_drop:], dst, src_all, index
    ranked = torch.sort(keys, dim=1, stable=True).indices
    src_all = ranked[:, :removed]  # the least important first
    index = ranked[:, removed:].sort(dim=1).values  # the staying tokens (the protected ones among them), in order
    src = src_all[:, n_drop:]
    dst = src  # nothing merged: no target needed
    if src.shape[1]:
        if features is None:
            features = F.normalize(raw.float(), dim=-1)
        if step.plan.option("merge_into") == "adjacent":
            return src, _adjacent_targets(features, protected, src, index, state.num_protected), src_all, index
        # each merged token's most similar staying unprotected token (the first on a tie, in token order)
        sim = gather_tokens(features, src) @ gather_tokens(features, index).transpose(1, 2)  # B R K
        sim = sim.masked_fill(gather_tokens(protected, index)[:, None, :], float("-inf"))
        dst = index.gather(1, sim.argmax(-1))
    return src, dst, src_all, index


def _adjacent_targets(features: Tensor, protected: Tensor, src: Tensor, index: Tensor, num_protected: int) -> Tensor:
    """dst (B R): for each merged token ``src`` (B R), the more similar (cosine of ``features``, normed, B L F) of the
    nearest staying unprotected tokens before and after it in the sequence (``index`` (B K), in order, ``num_protected``
    of them protected), the earlier one on a tie; the one that exists where the other does not."""
    n_free = int(index.shape[1]) - num_protected  # the protected tokens always stay
    if n_free == 0:  # nothing unprotected stays (keep 0): as the similarity rule, the first staying token
        return index[:, :1].expand_as(src)
    # the staying unprotected tokens, in order (a stable sort puts them first)
    order = torch.sort(gather_tokens(protected, index).long(), dim=1, stable=True).indices[:, :n_free]
    targets = index.gather(1, order)  # B K'
    after = (targets[:, None, :] < src[:, :, None]).sum(-1)  # B R: the first target after each merged token
    before = (after - 1).clamp_min(0)
    after_c = after.clamp_max(n_free - 1)
    prev_t, next_t = targets.gather(1, before), targets.gather(1, after_c)
    f_src = gather_tokens(features, src)
    sim_prev = (f_src * gather_tokens(features, prev_t)).sum(-1)
    sim_next = (f_src * gather_tokens(features, next_t)).sum(-1)
    take_next = (after == 0) | ((after < n_free) & (sim_next > sim_prev))
    return torch.where(take_next, next_t, prev_t)


def _nearest_similarity(features: Tensor, protected: Tensor) -> Tensor:
    """B L: each token's highest cosine similarity to another unprotected token (features normalised)."""
    sim = features @ features.transpose(1, 2)  # B L L
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
    return sim.masked_fill(eye[None] | protected[:, None, :], float("-inf")).amax(-1)


def _standardised(x: Tensor, protected: Tensor) -> Tensor:
    """x (B L) standardised over each image's unprotected tokens (protected ones left at 0)."""
    free = (~protected).float()
    n = free.sum(1, keepdim=True).clamp_min(1)
    x = x.masked_fill(protected, 0.0)
    mean = (x * free).sum(1, keepdim=True) / n
    std = (((x - mean) * free).square().sum(1, keepdim=True) / n).sqrt().clamp_min(1e-12)
    return ((x - mean) / std).masked_fill(protected, 0.0)


register_strategy(Merge())
