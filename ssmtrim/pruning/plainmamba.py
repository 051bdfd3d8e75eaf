"""Token pruning patched into a loaded PlainMamba, in place (as :mod:`ssmtrim.pruning.vim`: swap classes, keep weights).

After each pruning block the tokens are scored from that block's gated SSM output (the sum of the four un-permuted
scans times SiLU(z), B L E; Zhan et al., NeurIPS 2024, arXiv 2409.18962), and one index per image
is applied to the token stream and to the position map (the original raster index of each token on the H x W grid).
PlainMamba has no class token: nothing is protected, every current token is a candidate, and the head averages the
tokens that are left. Arrangements (see :mod:`ssmtrim.pruning.config`):

- ``align`` (the method, §2): kept tokens in raster order with their position map. Every later mixer scatters its
  tokens back to their cells of the original grid for the 7x7 depth-wise conv2d (pruned cells read as zero), and so
  does a layer's 3x3 ``dw`` conv (L1 layer 0). Each of the four zig-zag scans visits the kept tokens in the order of
  the ORIGINAL path over the full grid; the direction embedding of a step is the one of that token's step in the
  original path (the move that arrived at its cell); the scan gets the decay of the pruned positions the original
  path passed since the previous kept token, h = exp((Δ + G) A) h_prev + Δ B x, G = (#skipped in that direction) · Δ̃,
  Δ̃ from ``gap``: ``mean`` the mean Δ of the kept tokens of that layer (per image and channel; Δ is shared by the
  four directions, see below, so the mean is the same for all four), ``bias`` softplus(2 · dt bias) (the bias enters
  twice in PlainMamba), ``zero`` none. Norms, projections and the scan itself run on the reduced token set.
- ``keep-order``: kept tokens in raster order, no position map: the mixer treats the condensed sequence the way the
  official code treats any token sequence, as rows of the grid's width W. Token j sits in cell j of a ceil(K/W) x W
  grid (the last row partly empty, read as zero by the convs and skipped by the scans without a gap); the zig-zag
  paths, their direction embeddings and both convs are those of that packed grid. Once a token is pruned its
  successors shift, so conv neighbours and scan paths are no longer the original ones: the "no alignment" baseline,
  as Vim's keep-order where the causal conv reads condensed neighbours. (Scanning the original paths restricted to
  the kept tokens on the zero-filled original grid would be ``align`` with ``gap zero``, not a separate baseline.)
- ``reorder``: kept tokens in score order, the pruned ones fused into one token appended at the end, weighted by
  their clipped scores (EViT's inattentive-token fusion). The sequence is laid out like ``keep-order``'s packed
  grid, in storage order, so the fused token is simply the last token of the sequence: it has a cell and takes part
  in the convs, the scans and the head's mean like any other token. It is a candidate at the next pruning layer.

The official quirk: per direction only x is put into scan order; dt, B and C stay in raster order, so
scan step t reads x of the t-th token of the path with dt_t, B_t, C_t of raster token t. On a reduced sequence this
is kept literally, as the official code would run on the stored sequence: step i of every reduced scan uses the
dt, B and C of the i-th STORED token (for ``align`` and ``keep-order`` the i-th kept token in raster order), and
the direction embedding of step i is added to that B. A pruned position has no dt/B/C of its own; it only decays.

Count rule: PlainMamba has no class token to centre, so Vim's even-count trick does not apply: a pruning layer
keeps floor(L · keep) of its L current tokens, at least 1 (:func:`plain_kept_count`; L1 at 0.7: 196 -> 137 -> 95 ->
66). Threshold mode keeps each image's tokens whose score reaches the calibrated threshold (at least 1) and runs
image by image.

Shapes: B batch, L current tokens, L0 = H W original tokens, K = 4 scan directions, C embed dim, E d_inner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.plainmamba import NUM_DIRECTIONS, PlainMamba, PlainMambaLayer, PlainMambaMixer, zigzag_orders
from ssmtrim.pruning.config import PruneConfig, PruneStats, forward_image_by_image
from ssmtrim.pruning.scoring import gather_tokens, token_scores, topk_sorted

# observer(block index 0-based, scores (B L), candidate mask (B L) of prunable tokens); used by calibration
ScoreObserver = Callable[[int, Tensor, Tensor], None]


def plain_kept_count(current: int, keep: float) -> int:
    """Tokens kept out of ``current`` when there is no class token: floor(current * keep), at least 1."""
    if keep >= 1.0:
        return current
    return max(min(int(math.floor(current * keep + 1e-9)), current), 1)


@dataclass
class ScanPlan:
    """Where the current tokens sit for the 2-D ops of a mixer; computed once per layout, shared by its blocks."""

    cells: Tensor  # B L, cell (raster index on ``grid``) of each token
    grid: tuple[int, int]  # (h, w) of the grid the convs run on
    orders: Tensor  # K B L, the token read at each scan step
    inverse: Tensor  # K B L, the scan step of each token
    directions: Tensor  # K B L, direction-embedding id of each step: the move that arrived at its cell in the full path
    gaps: Tensor | None  # K B L, positions of the full path skipped just before each step (align only)


@dataclass
class TokenLayout:
    """Where the current tokens came from (per-forward state of a pruned model)."""

    positions: Tensor  # B L original raster positions on the H x W grid (-1: a fused token)
    hw: tuple[int, int]  # (H, W), the original token grid
    arrangement: str
    pruned: bool = False  # False until tokens were removed: the mixers then run the dense code unchanged
    _plan: ScanPlan | None = field(default=None, init=False, repr=False)

    @property
    def length(self) -> int:
        return self.hw[0] * self.hw[1]

    def plan(self) -> ScanPlan:
        if self._plan is None:
            self._plan = _make_plan(self)
        return self._plan


def _make_plan(layout: TokenLayout) -> ScanPlan:
    bsz, length = layout.positions.shape
    device = layout.positions.device
    if layout.arrangement == "align":
        cells, grid = layout.positions.long(), layout.hw
    else:  # the condensed sequence as rows of width W (keep-order, reorder)
        w = layout.hw[1]
        cells, grid = torch.arange(length, device=device).expand(bsz, -1), (-(-length // w), w)
    full_orders, full_inverse, full_dirs = (t.to(device) for t in zigzag_orders(*grid))
    k = NUM_DIRECTIONS
    steps = full_inverse[:, cells]  # K B L: step of each token in each full path
    steps, orders = steps.sort(dim=-1)  # the tokens in path order; steps are distinct, so no ties
    inverse = torch.empty_like(orders).scatter_(-1, orders, torch.arange(length, device=device).expand(k, bsz, -1))
    directions = full_dirs[:, None, :].expand(-1, bsz, -1).gather(-1, steps)
    gaps = None
    if layout.arrangement == "align":
        prev = torch.cat([steps.new_full((k, bsz, 1), -1), steps[..., :-1]], dim=-1)
        gaps = steps - prev - 1
    return ScanPlan(cells, grid, orders, inverse, directions, gaps)


def _to_grid(x: Tensor, plan: ScanPlan) -> Tensor:
    """x (B E L) -> (B E h w) with every token in its cell and zero in the others."""
    bsz, e, _ = x.shape
    h, w = plan.grid
    idx = plan.cells[:, None, :].expand(-1, e, -1)
    return x.new_zeros(bsz, e, h * w).scatter_(2, idx, x).view(bsz, e, h, w)


def _from_grid(g: Tensor, plan: ScanPlan) -> Tensor:
    """(B E h w) -> the tokens' cells (B E L)."""
    return g.flatten(2).gather(2, plan.cells[:, None, :].expand(-1, g.shape[1], -1))


class PrunablePlainMambaMixer(PlainMambaMixer):
    """PlainMambaMixer that honours a :class:`TokenLayout` (set by the model for one forward, then cleared)."""

    layout: TokenLayout | None = None
    gap_estimate: str = "mean"

    def _plan(self) -> ScanPlan | None:
        lay = self.layout
        return lay.plan() if lay is not None and lay.pruned else None

    def conv_act(self, u: Tensor, hw: tuple[int, int]) -> Tensor:
        plan = self._plan()
        if plan is None:
            return super().conv_act(u, hw)
        return F.silu(_from_grid(self.conv2d(_to_grid(u, plan)), plan))

    def scan_orders(self, u: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        plan = self._plan()
        if plan is None:
            return super().scan_orders(u, hw)
        return plan.orders, plan.inverse, plan.directions

    def decay_gap(self, delta: Tensor) -> Tensor | None:
        plan = self._plan()
        if plan is None or plan.gaps is None or self.gap_estimate == "zero":
            return None
        bias = self.dt_proj.bias.float()
        if self.gap_estimate == "bias":
            estimate = F.softplus(2 * bias)[None, :, None]  # 1 E 1: dt_proj adds the bias, the scan adds it again
        else:  # mean Δ of the kept tokens of this layer; delta already holds the bias once
            estimate = F.softplus(delta.float() + bias[:, None]).mean(-1, keepdim=True)  # B E 1
        return plan.gaps[:, :, None, :].to(estimate.dtype) * estimate  # K B E L


class PrunedPlainMamba(PlainMamba):
    """A PlainMamba whose forward prunes tokens according to ``self.prune_config``."""

    prune_config: PruneConfig
    last_stats: PruneStats | None = None
    score_observer: ScoreObserver | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.prune_config.mode == "threshold" and x.shape[0] > 1:
            return forward_image_by_image(self, x)
        tokens, _, self.last_stats = self.forward_pruned(x)
        return self.head(tokens.mean(dim=1))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> kept tokens before the final norm (B L C), as the dense ``forward_features``."""
        return self._run(x)[0]

    def forward_pruned(self, x: Tensor) -> tuple[Tensor, TokenLayout, PruneStats]:
        """Images -> (final-normed kept tokens (B L C), their layout, what was pruned)."""
        tokens, layout, stats = self._run(x)
        return self.ln1(tokens), layout, stats

    def _run(self, x: Tensor) -> tuple[Tensor, TokenLayout, PruneStats]:
        cfg = self.prune_config
        if cfg.mode == "threshold" and x.shape[0] > 1:
            raise ConfigError("threshold mode keeps a different number of tokens per image; call the model itself "
                              "(it runs images one by one) or pass one image at a time.")
        hidden, hw = self.embed(x)
        bsz, length, _ = hidden.shape
        layout = TokenLayout(torch.arange(length, device=hidden.device).expand(bsz, -1), hw, cfg.arrangement)
        keep = cfg.keep_by_layer()
        thresholds = dict(zip(keep, cfg.thresholds, strict=True)) if cfg.thresholds is not None else {}
        stats = PruneStats()
        for i, layer in enumerate(self.layers):
            mixer: PrunablePlainMambaMixer = layer.mamba
            stats.tokens_per_block.append(float(hidden.shape[1]))
            mixer.layout = layout
            try:
                y = mixer.ssm_output(layer.norm(hidden), hw)
            finally:
                mixer.layout = None
            hidden = hidden + layer.drop_path(mixer.out_proj(y))
            if layer.with_dwconv:
                hidden = _dwconv(layer, hidden, layout)
            if i in keep:
                selected = self._select(i, y, layout, keep[i], thresholds.get(i))
                stats.kept_fraction.append(selected.kept_fraction)
                if selected.index is None:
                    continue
                fused = None
                if selected.fuse_weights is not None:  # reorder: one token summarising the pruned ones
                    fused = (selected.fuse_weights[..., None] * hidden.float()).sum(1, keepdim=True).to(hidden.dtype)
                hidden = gather_tokens(hidden, selected.index)
                if fused is not None:
                    hidden = torch.cat([hidden, fused], 1)
                layout = selected.layout
        return hidden, layout, stats

    def _select(self, block: int, y: Tensor, layout: TokenLayout, keep: float, threshold: float | None) -> _Selection:
        cfg = self.prune_config
        bsz, length = y.shape[:2]
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + block) if cfg.score == "random" else None
        scores = token_scores(y, cfg.score, generator)
        if self.score_observer is not None:  # no class token: every token is a candidate
            self.score_observer(block, scores, torch.ones_like(scores, dtype=torch.bool))
        if cfg.mode == "threshold" and threshold is not None:
            k = max(int((scores >= threshold).sum()), 1)  # batch of one (see forward)
        else:
            k = plain_kept_count(length, keep)
        kept_fraction = k / length
        if k >= length:
            return _Selection(None, layout, None, kept_fraction)  # nothing to prune
        if cfg.arrangement == "reorder":
            index = torch.sort(-scores, dim=1, stable=True).indices[:, :k]  # score order, ties by position
        else:
            index = topk_sorted(scores, k)  # raster order
        positions = gather_tokens(layout.positions, index)
        fuse_weights = None
        if cfg.arrangement == "reorder":
            dropped = torch.ones(bsz, length, dtype=torch.bool, device=y.device)
            dropped.scatter_(1, index, torch.zeros_like(index, dtype=torch.bool))
            weights = (scores.clamp_min(0) + 1e-6) * dropped  # clipped scores of the pruned tokens, normalised
            fuse_weights = weights / weights.sum(1, keepdim=True)
            positions = torch.cat([positions, positions.new_full((bsz, 1), -1)], 1)
        return _Selection(index, TokenLayout(positions, layout.hw, layout.arrangement, True), fuse_weights,
                          kept_fraction)  # fmt: skip


@dataclass
class _Selection:
    index: Tensor | None  # B K tokens kept (None: all kept)
    layout: TokenLayout  # of the tokens after this layer
    fuse_weights: Tensor | None  # B L weights of the fused token (reorder)
    kept_fraction: float


def _dwconv(layer: PlainMambaLayer, x: Tensor, layout: TokenLayout) -> Tensor:
    """GELU(BN(dwconv3x3)) replacing the stream, x (B L C) -> (B L C); on the tokens' cells once tokens are pruned."""
    if not layout.pruned:
        bsz, _, c = x.shape
        return layer.dw(x.transpose(1, 2).reshape(bsz, c, *layout.hw)).flatten(2).transpose(1, 2)
    plan = layout.plan()
    return _from_grid(layer.dw(_to_grid(x.transpose(1, 2), plan)), plan).transpose(1, 2)


def apply_pruning(model: PlainMamba, config: PruneConfig) -> PlainMamba:
    """Patch ``model`` in place so that its forward prunes tokens as ``config`` says; returns the same object."""
    if isinstance(model, PrunedPlainMamba):
        raise ConfigError("this model is already pruned; load the dense model to prune it again.")
    if type(model) is not PlainMamba:
        raise ConfigError(f"cannot prune a {type(model).__name__}; load a PlainMamba with ssmtrim.load_model.")
    config.validate_for(model.config.depth)
    if config.conv != "original":
        raise ConfigError(f"--conv {config.conv} is defined for Vim's 1-D conv only; PlainMamba's 2-D conv always "
                          "runs on the original grid (leave --conv at original).")
    model.__class__ = PrunedPlainMamba
    model.prune_config = config
    for layer in model.layers:
        layer.mamba.__class__ = PrunablePlainMambaMixer
        layer.mamba.gap_estimate = config.gap
    return model


def remove_pruning(model: PrunedPlainMamba) -> PlainMamba:
    """Undo :func:`apply_pruning`: the plain dense model again (same object, same weights)."""
    if not isinstance(model, PrunedPlainMamba):
        return model
    for layer in model.layers:
        layer.mamba.__class__ = PlainMambaMixer
        for attr in ("gap_estimate", "layout"):
            layer.mamba.__dict__.pop(attr, None)
    for attr in ("prune_config", "last_stats", "score_observer"):
        model.__dict__.pop(attr, None)
    model.__class__ = PlainMamba
    return model


__all__ = [
    "PrunablePlainMambaMixer", "PrunedPlainMamba", "ScanPlan", "TokenLayout", "apply_pruning", "plain_kept_count",
    "remove_pruning",
]  # fmt: skip
