"""Token state shared by the models' blocks and the reduction engine: where the current tokens of a (possibly
reduced) sequence came from, and the pure functions that select and gather tokens. Indices are computed once and
applied to every tensor that follows the tokens (hidden, residual, positions), in the manner of ToMe's
``bipartite_soft_matching`` returning a merge function.

Per-forward state is typed and passed to and returned by each step, never stored on a module.
Shapes: B batch, L current tokens, L0 original tokens, K kept tokens, E d_inner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ssmtrim.ops.selective_scan import tracing
from ssmtrim.ops.tokens import group_kernels

__all__ = ["BlockOutput", "Streams", "TokenState", "gather_tokens", "gaps_from_positions", "owner_after", "owners",
           "restore_tokens", "topk_sorted", "tracing", "Unmerge", "WholeStreams", "add_update", "merge_pair",
           "mlp_tokens", "unmerge_of"]

# the tensors that follow the tokens through the blocks, e.g. Vim's (hidden, fp32 residual) or PlainMamba's (hidden,);
# a reduction applies the same selection to each (None entries: a stream not started yet)
Streams = tuple[Tensor | None, ...]


@dataclass(frozen=True)
class WholeStreams:
    """How the blocks run when the streams still hold every original position of the grid (B L0 ...): the tokens of
    the state (positions, sizes, owner) are what the blocks' mixers and MLPs run on, each the mean of the positions it
    owns, and their updates are un-merged back to every position (:class:`Unmerge`)."""

    # the blocks' mixers too read every position, exactly as dense, and only their per-token MLPs run on the tokens
    # (what unmerge's ``--option mixer=positions`` asks for)
    exact_mixers: bool = False
    # each later block's MLP regroups the positions by its own input around this share of the tokens (1.0 all of
    # them; :meth:`Unmerge.for_mlp`, what unmerge's ``--option mlp_groups=block`` and ``mlp_share`` ask for); None:
    # the MLPs run on the tokens' own groups
    mlp_share: float | None = None


@dataclass(frozen=True)
class TokenState:
    """Where the current tokens came from. Replaced, never mutated, when tokens are reduced."""

    positions: Tensor  # B L original index of each token (-1: a token that stands at no single position, e.g. fused)
    # indices of the protected tokens in the current sequence: B (one class token) or B P (P tokens, e.g. registers,
    # in sequence order); None: nothing protected
    cls_index: Tensor | None
    length: int  # L0, tokens before any reduction
    grid: tuple[int, int]  # (H, W) of the original patch grid
    keeps_positions: bool  # the strategy keeps tokens at their original positions (convs and scans see the gaps)
    reduced: bool = False  # tokens were removed at least once
    sizes: Tensor | None = None  # B L original tokens each token stands for (merging strategies); None: one each
    # B L0: the current token that stands for each original position (-1: none, a pruned position; restore then
    # takes the nearest token along the scan); None: the identity, nothing reduced yet
    owner: Tensor | None = None
    track_owner: bool = False  # keep ``owner`` up to date (a family that restores the grid sets it in embed)
    # (rows, columns): the scans of the following blocks read every rows-th row and columns-th column of the grid and
    # their outputs are spread back to every position by nearest neighbour, the tokens themselves untouched (a
    # strategy that thins the scan, not the sequence: QuarterMap); None: the scans read every token
    scan_stride: tuple[int, int] | None = None
    # the streams still hold every original position of the grid (B L0 ...), and how the blocks then run (a strategy
    # that reduces for the blocks, not the residual stream: unmerge); None: the streams hold the tokens
    whole: WholeStreams | None = None

    @property
    def full_streams(self) -> bool:
        """The streams hold every original position (``whole`` is set): the tokens are what the blocks run on."""
        return self.whole is not None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def num_protected(self) -> int:
        """Tokens that are never reduced (a class token, registers)."""
        if self.cls_index is None:
            return 0
        return 1 if self.cls_index.dim() == 1 else self.cls_index.shape[1]

    def protected_index(self) -> Tensor | None:
        """B P indices of the protected tokens (None: nothing protected)."""
        if self.cls_index is None:
            return None
        return self.cls_index[:, None] if self.cls_index.dim() == 1 else self.cls_index

    def protected(self) -> Tensor:
        """B L bool, True for tokens that are never reduced (the class token, registers)."""
        if self.cls_index is None:
            return torch.zeros(self.positions.shape, dtype=torch.bool, device=self.positions.device)
        if self.cls_index.dim() == 1:  # one class token: a comparison (two small ops, where a scatter takes four)
            return torch.arange(self.positions.shape[1], device=self.positions.device) == self.cls_index[:, None]
        mask = torch.zeros(self.positions.shape, dtype=torch.bool, device=self.positions.device)
        index = self.protected_index()
        return mask.scatter(1, index, torch.ones_like(index, dtype=torch.bool))

    def protected_after(self, index: Tensor) -> Tensor | None:
        """Where the protected tokens sit in a new sequence made of ``index`` (B K, current indices, every protected
        token among them, in their order), in the shape of ``cls_index``."""
        if self.cls_index is None:
            return None
        taken = self.protected().gather(1, index)  # B K
        # a stable sort puts the protected slots first, in their order (no data-dependent shape: FLOP tracers follow)
        slots = torch.sort((~taken).long(), dim=1, stable=True).indices[:, : self.num_protected]
        return slots[:, 0] if self.cls_index.dim() == 1 else slots

    def in_streams(self, index: Tensor) -> Tensor:
        """Where current tokens ``index`` (B ... of current indices) sit in the streams: the same indices, or, when
        the streams still hold the full grid (``full_streams``), the tokens' original positions."""
        if not self.full_streams:
            return index
        flat = index.reshape(index.shape[0], -1)
        return self.positions.gather(1, flat).reshape(index.shape)

    def replace(self, **changes) -> TokenState:
        """A copy with ``changes`` (as dataclasses.replace, which a compiled graph would guard field by field)."""
        return TokenState(**{**{name: getattr(self, name) for name in _STATE_FIELDS}, **changes})


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(TokenState))


@dataclass
class BlockOutput:
    """What a family's block hands to the reduction step after it ran."""

    streams: Streams
    y: Tensor  # B L E, the gated SSM output in the current token order (what the scores read)
    delta: Tensor | None = None  # B L E, softplus(Δ) in the current token order, when asked for ("delta")
    mixer_input: Tensor | None = None  # B L D, the normed input of the block's mixer, when asked for ("mixer_input")
    # B L F, the SSM's input and output projections B and C of every scan direction side by side, in the current token
    # order, when asked for ("bc")
    bc: Tensor | None = None
    # the SSM's implicit attention to the class token ("cls_attention"): B L, how much each token writes into the
    # class token's output through the scans (see ssmtrim.pruning.scores.cls_attention), when asked for
    cls_attention: Tensor | None = None


def topk_sorted(scores: Tensor, k: int, protected: Tensor | None = None) -> Tensor:
    """Indices (B k) of the k highest scores per row, returned in increasing index order (original order).

    ``protected`` (B L bool) marks tokens that must not be chosen (they are kept separately, e.g. the class token).
    Ties break towards the lower index, so results do not depend on the batch.
    """
    if protected is not None:
        scores = scores.masked_fill(protected, float("-inf"))
    # a stable sort on -score breaks ties by position; topk's order among equal values is unspecified
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (B L ...) , index (B K) -> x[b, index[b]] (B K ...)."""
    if x.shape[0] == 1 and index.shape[0] == 1:  # one image: one index_select, about 10x faster than a gather
        return x.index_select(1, index[0])
    if x.dim() > 2:  # rows of features: one index_select of whole rows of the flattened batch (B L0 D float rows, one
        # thread: about 2x faster than advanced indexing, 3x faster than an expanded gather)
        bsz, length = x.shape[:2]
        rows = index + torch.arange(bsz, device=x.device)[:, None] * length
        return x.reshape(bsz * length, *x.shape[2:]).index_select(0, rows.reshape(-1)).view(*rows.shape, *x.shape[2:])
    shape = index.shape + x.shape[2:]
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, idx)


def gaps_from_positions(positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Number of pruned original positions just before each kept token, in each scan direction.

    positions (B K), increasing original positions of the kept tokens of a sequence of ``length`` tokens.
    Returns (forward (B K), backward (B K)): forward[k] = positions skipped between kept token k-1 and k (leading ones
    before the first kept token count for the first); backward[k] the same for the reversed scan, i.e. between k and
    k+1 (trailing ones count for the last), still indexed in original order.
    """
    pos = positions.long()
    prev = torch.cat([pos.new_full((pos.shape[0], 1), -1), pos[:, :-1]], dim=1)
    nxt = torch.cat([pos[:, 1:], pos.new_full((pos.shape[0], 1), length)], dim=1)
    return (pos - prev - 1).clamp_min(0), (nxt - pos - 1).clamp_min(0)


def owners(state: TokenState) -> Tensor:
    """B L0 current index standing for each original position of ``state``'s grid: the recorded owner (a merged
    position: the token it was merged into), and for a position nobody stands for (pruned) the token nearest to it
    along the raster scan (the earlier one on a tie)."""
    bsz = state.positions.shape[0]
    device = state.positions.device
    if state.owner is None:
        return torch.arange(state.length, device=device).expand(bsz, -1)
    owner = state.owner
    if not tracing() and not bool((owner < 0).any()):
        return owner
    # nearest token by original position, among the tokens that stand at one (a fused token, -1, stands nowhere)
    big = state.length * 4
    pos, slot = state.positions.masked_fill(state.positions < 0, big).sort(1)  # B L increasing, their indices
    grid = torch.arange(state.length, device=device).expand(bsz, -1).contiguous()  # B L0
    right = torch.searchsorted(pos, grid).clamp_max(pos.shape[1] - 1)  # first token at or after each position
    left = (right - 1).clamp_min(0)
    take_left = (grid - pos.gather(1, left)).abs() <= (pos.gather(1, right) - grid).abs()
    nearest = slot.gather(1, torch.where(take_left, left, right))
    return torch.where(owner < 0, nearest, owner)


def restore_tokens(x: Tensor, state: TokenState) -> Tensor:
    """Tokens of a reduced sequence (B L ...) back on the full grid (B L0 ...): a kept position takes its token, a
    merged one the token it was merged into (un-merging: every position a token stands for gets its value), a pruned
    one its nearest token along the scan. The identity when nothing was reduced, or when the streams still hold the
    full grid (``state.full_streams``)."""
    if not state.reduced or state.full_streams:
        return x
    return gather_tokens(x, owners(state))


def owner_after(state: TokenState, new: TokenState, moved: Tensor | None = None) -> Tensor:
    """B L0 owner map after a reduction step from ``state`` to ``new``. ``moved`` (B L, current tokens) gives the new
    index of each current token (-1: dropped); without it, a current token is found again by its original position
    (strategies that keep or drop tokens but merge none)."""
    old = state.owner if state.owner is not None else \
        torch.arange(state.length, device=state.positions.device).expand(state.positions.shape[0], -1)
    if moved is None:
        # current token i -> the new slot holding its original position (positions are unique among placed tokens;
        # a fused token, -1, stands at none): a slot per position, then looked up by each current token's position
        bsz, device = state.positions.shape[0], state.positions.device
        by_position = torch.full((bsz, state.length + 1), -1, dtype=torch.long, device=device)
        placed = new.positions.clamp_min(-1).masked_fill(new.positions < 0, state.length)  # -1 -> the spare column
        slots = torch.arange(new.positions.shape[1], device=device).expand(bsz, -1)
        by_position = by_position.scatter(1, placed, slots)
        by_position[:, state.length] = -1
        moved = by_position.gather(1, state.positions.masked_fill(state.positions < 0, state.length))
    return moved.gather(1, old.clamp_min(0)).masked_fill(old < 0, -1)


@dataclass(frozen=True)
class Unmerge:
    """Between the full grid and the tokens of a ``full_streams`` state: :meth:`merge` averages the positions each
    token owns (B L0 ... -> B K ...), :meth:`unmerge` gives every position its token's value (B K ... -> B L0 ...),
    as ToMe for Stable Diffusion merges before a block's operations and un-merges their output onto the residual."""

    owner: Tensor  # B L0, the token owning each position (every position has one)
    sizes: Tensor  # B K, positions each token owns
    # the block's mixer reads every position (exactly as dense) and only its MLP runs on the tokens; the softplus(Δ)
    # and y it hands to a reduction step are then merged to the tokens (:meth:`tokens_of`)
    exact_mixer: bool = False
    # B K, the original position of each token, when each block's MLP regroups the positions around the tokens by
    # its own input (:meth:`for_mlp`); None: the MLPs run on these groups
    anchors: Tensor | None = None
    alone: Tensor | None = None  # B K bool, tokens that stand for themselves alone when regrouping (a class token)
    share: float = 1.0  # regroup around this share of the tokens (:func:`mlp_tokens` of them, the largest groups)
    # every position is its own token (a step removed nothing): merge and un-merge are the identity, only the MLPs'
    # regrouping (:meth:`for_mlp`) changes anything
    identity: bool = False

    def merge(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        kernels = group_kernels(x)
        if kernels is not None:  # one C call (ssmtrim.ops.tokens)
            return kernels.mean(x, self.owner, self.sizes)
        bsz, length = self.owner.shape
        k = self.sizes.shape[1]
        rows = x.shape[2:]
        if torch.compiler.is_exporting():
            # an exported graph: one product with the owner map as a 0/1 matrix (B K L0), a few operators where
            # index_add takes a dozen; the same sums in another order (values to rounding)
            acc = _membership(self.owner, k) @ x.reshape(bsz, length, -1).float()
            return (acc / self.sizes[..., None]).view(bsz, k, *rows).to(x.dtype)
        flat = (self.owner + torch.arange(bsz, device=x.device)[:, None] * k).reshape(-1)
        acc = x.new_zeros((bsz * k, *rows), dtype=torch.float32)
        acc = acc.index_add_(0, flat, x.reshape(bsz * length, *rows).float())
        sizes = self.sizes.reshape(bsz * k, *([1] * len(rows)))
        return (acc / sizes).view(bsz, k, *rows).to(x.dtype)

    def unmerge(self, y: Tensor) -> Tensor:
        return y if self.identity else gather_tokens(y, self.owner)

    def add_to(self, x: Tensor, update: Tensor, scale: Tensor | None = None) -> Tensor:
        """``x + scale * unmerge(update)`` (scale None: 1): a residual add of an update made on the tokens."""
        if self.identity:
            return x + (update if scale is None else scale * update)
        kernels = group_kernels(x, update, scale)
        if kernels is not None and kernels.add is not None:  # one C call (ssmtrim.ops.tokens)
            return kernels.add(x, update, self.owner, scale)
        out = self.unmerge(update)
        return x + (out if scale is None else scale * out)

    def for_mlp(self, z: Tensor) -> Unmerge:
        """The groups a block's MLP runs on, given its input z (B L0 D): these, or with ``anchors`` the positions
        regrouped by z itself around the same tokens (with ``share`` below 1, around that share of them: the tokens of
        the largest groups). Each position joins the token whose input is most like its own (cosine), then
        REGROUP_ROUNDS rounds of k-means move each position to the nearest group mean, every token's own position
        staying in its group (no group is empty): a group's mean, which the MLP reads, then stands closer for each of
        its positions than the groups fixed at the reduction step do. Costs (1 + rounds) L0 K D multiply-adds a row,
        which the paper convention leaves out (no Linear layer) and the full one counts."""
        if self.anchors is None:
            return self
        anchors, alone = self.anchors, self.alone
        count = mlp_tokens(int(anchors.shape[1]), self.share)
        kernels = group_kernels(z)
        if kernels is not None:  # one C call (ssmtrim.ops.tokens), the same groups
            return Unmerge(*kernels.regroup(z, anchors, self.sizes, alone, count, REGROUP_ROUNDS))
        if count < anchors.shape[1]:  # around the largest groups (a protected token first: it stays alone)
            rank = self.sizes if alone is None else self.sizes + alone.float() * (self.owner.shape[1] + 1)
            pick = torch.sort(-rank, dim=1, stable=True).indices[:, :count].sort(1).values
            anchors, alone = anchors.gather(1, pick), None if alone is None else alone.gather(1, pick)
        unit = torch.nn.functional.normalize(z.float(), dim=-1)
        centres = gather_tokens(unit, anchors)  # B K D
        slots = torch.arange(anchors.shape[1], device=z.device).expand_as(anchors)
        for round_ in range(REGROUP_ROUNDS + 1):
            likeness = unit @ centres.transpose(1, 2)  # B L0 K
            if alone is not None:  # below any cosine: a protected token takes no other position
                likeness = likeness.masked_fill(alone[:, None, :], -2.0)
            owner = likeness.argmax(-1).scatter(1, anchors, slots)
            if torch.compiler.is_exporting():  # the groups' sizes and means from one 0/1 membership matrix
                member = _membership(owner, slots.shape[1])
                sizes = member.sum(-1)
                groups = Unmerge(owner, sizes)
                if round_ < REGROUP_ROUNDS:
                    centres = torch.nn.functional.normalize((member @ unit) / sizes[..., None], dim=-1)
                continue
            groups = Unmerge(owner, torch.zeros_like(slots, dtype=torch.float32).scatter_add(
                1, owner, torch.ones_like(owner, dtype=torch.float32)))
            if round_ < REGROUP_ROUNDS:
                centres = torch.nn.functional.normalize(groups.merge(unit), dim=-1)
        return groups

    def tokens_of(self, y: Tensor, deltas: list[Tensor] | None) -> tuple[Tensor, list[Tensor] | None]:
        """An exact mixer's y and softplus(Δ) over every position, merged to the tokens a reduction step ranks."""
        return self.merge(y), None if deltas is None else [self.merge(d) for d in deltas]


# k-means rounds of :meth:`Unmerge.for_mlp`: two; on 2,000 training images (mambavision_cifar, vmamba_cifar64 at
# -20% / -30% FLOPs) the agreement with dense rose from none to two rounds and levelled off after
REGROUP_ROUNDS = 2


def mlp_tokens(tokens: int, share: float) -> int:
    """Tokens an MLP regrouped around ``share`` of ``tokens`` runs on (at least one)."""
    return tokens if share >= 1.0 else max(1, int(tokens * share + 1e-9))


def _membership(owner: Tensor, k: int) -> Tensor:
    """B K L0, 1.0 where token k owns position l (``owner`` B L0 in [0, k)), else 0."""
    return (owner[:, None, :] == torch.arange(k, device=owner.device)[None, :, None]).float()


def _same(x: Tensor) -> Tensor:
    return x


def merge_pair(u: Unmerge | None) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(merge, unmerge) of a block's ``Unmerge``, or the identity twice when its streams hold the tokens (None)."""
    return (u.merge, u.unmerge) if u is not None else (_same, _same)


def add_update(x: Tensor, update: Tensor, u: Unmerge | None, scale: Tensor | None, drop_path) -> Tensor:
    """A block's residual add ``x + drop_path(scale * unmerge(update))`` (scale None: 1; u None: the update is on
    x's positions already); ``drop_path`` a ``layers.DropPath``, whose ``drops`` says whether it may drop (training)
    or is the identity."""
    if u is not None and not drop_path.drops:
        return u.add_to(x, update, scale)
    out = update if u is None else u.unmerge(update)
    return x + drop_path(out if scale is None else scale * out)


def unmerge_of(state: TokenState) -> Unmerge | None:
    """The merge / un-merge maps of a ``full_streams`` state (None for any other)."""
    if not state.full_streams:
        return None
    share = state.whole.mlp_share
    regroup = share is not None
    return Unmerge(state.owner, state.sizes.float(), state.whole.exact_mixers, state.positions if regroup else None,
                   state.protected() if regroup and state.cls_index is not None else None, share or 1.0,
                   identity=not state.reduced)
