"""Token pruning patched into a loaded Vim, in place (the manner of ToMe's ``apply_patch``: swap classes, keep weights).

After each pruning block the tokens are scored from that block's gated SSM output (both directions, original order),
the class token is protected, and one index per image is applied to the hidden stream, the fp32 residual stream and
the position map. Arrangements (see :mod:`ssmtrim.pruning.config`):

- ``align``: kept tokens in original order with the class token at its original place; every later mixer scatters
  its tokens back to their original positions for the causal conv (pruned neighbours read as zero) and gives the scan
  the decay of the skipped positions, h_k = exp((Δ_k + G_k) A) h_prev + Δ_k B_k x_k, G_k = (#skipped) · Δ̃. Norms,
  projections and the scan itself run on the reduced token set.
- ``keep-order``: kept tokens in original order, class token re-centred, nothing else (the released code).
- ``reorder``: kept tokens in score order, class token in the middle, the pruned tokens fused into one token
  appended at the end, weighted by their (clipped) scores (EViT's inattentive-token fusion).

Shapes: B batch, L current tokens, L0 original tokens, K kept tokens, D embed dim, E d_inner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.vim import BiMambaMixer, VisionMamba
from ssmtrim.ops.conv import causal_conv1d_silu
from ssmtrim.pruning.config import PruneConfig, PruneStats, forward_image_by_image, kept_count
from ssmtrim.pruning.scoring import gaps_from_positions, gather_tokens, token_scores, topk_sorted

# observer(block index 0-based, scores (B L), candidate mask (B L) of prunable tokens); used by calibration
ScoreObserver = Callable[[int, Tensor, Tensor], None]


@dataclass
class TokenLayout:
    """Where the current tokens came from (per-forward state of a pruned model)."""

    positions: Tensor  # B L original positions (-1: a fused token)
    cls_index: Tensor  # B, index of the class token in the current sequence
    length: int  # L0, tokens before any pruning
    aligned: bool  # the scans keep the gaps of pruned positions

    @property
    def is_full(self) -> bool:
        return self.positions.shape[1] == self.length

    @functools.cached_property
    def gap_counts(self) -> tuple[Tensor, Tensor]:
        """(forward, backward) skipped positions before each token (B L, float, the scan's gap counts): once per
        layout, shared by all blocks."""
        fwd, bwd = gaps_from_positions(self.positions, self.length)
        return fwd.float(), bwd.float()


class PrunableBiMambaMixer(BiMambaMixer):
    """BiMambaMixer that honours a :class:`TokenLayout` (set by the model for one forward, then cleared)."""

    layout: TokenLayout | None = None
    gap_estimate: str = "mean"
    conv_neighbours: str = "original"

    def _aligned(self) -> bool:
        return self.layout is not None and self.layout.aligned and not self.layout.is_full

    def conv_act(self, x: Tensor, backward: bool) -> Tensor:
        if not self._aligned() or self.conv_neighbours == "kept":
            return super().conv_act(x, backward)
        lay = self.layout
        pos = (lay.length - 1 - lay.positions).flip(1) if backward else lay.positions  # scan order
        return causal_conv1d_silu(x, self.conv1d_b if backward else self.conv1d, pos, lay.length)

    def decay_gap(self, dt: Tensor, backward: bool) -> tuple[Tensor, Tensor] | None:
        if not self._aligned() or self.gap_estimate == "zero":
            return None
        fwd, bwd = self.layout.gap_counts
        counts = bwd.flip(1) if backward else fwd  # B L in scan order
        bias = (self.dt_proj_b if backward else self.dt_proj).bias.float()
        if self.gap_estimate == "bias":
            estimate = F.softplus(bias)[None, :].expand(dt.shape[0], -1)
        else:  # mean Δ of the kept tokens of this layer and direction
            estimate = F.softplus(dt.float() + bias[:, None]).mean(-1)
        return counts, estimate  # G = counts x estimate, formed inside the scan

    def set_layout(self, layout: TokenLayout | None) -> None:
        self.layout = layout


class PrunedVisionMamba(VisionMamba):
    """A VisionMamba whose forward prunes tokens according to ``self.prune_config``."""

    prune_config: PruneConfig
    last_stats: PruneStats | None = None
    score_observer: ScoreObserver | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.prune_config.mode == "threshold" and x.shape[0] > 1:
            return forward_image_by_image(self, x)
        tokens, layout, self.last_stats = self.forward_pruned(x)
        return self.head(gather_tokens(tokens, layout.cls_index[:, None])[:, 0])

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_pruned(x)[0]

    def forward_pruned(self, x: Tensor) -> tuple[Tensor, TokenLayout, PruneStats]:
        """Images -> (final-normed kept tokens (B K D), their layout, what was pruned)."""
        cfg = self.prune_config
        hidden = self.embed(x)
        bsz, length, _ = hidden.shape
        layout = TokenLayout(
            positions=torch.arange(length, device=x.device).expand(bsz, -1),
            cls_index=torch.full((bsz,), self.config.cls_position, device=x.device, dtype=torch.long),
            length=length,
            aligned=cfg.arrangement == "align",
        )
        keep = cfg.keep_by_layer()
        thresholds = dict(zip(keep, cfg.thresholds, strict=True)) if cfg.thresholds is not None else {}
        stats = PruneStats()
        residual: Tensor | None = None
        for i, block in enumerate(self.layers):
            mixer: PrunableBiMambaMixer = block.mixer
            stats.tokens_per_block.append(float(hidden.shape[1]))
            residual = hidden.float() if residual is None else residual + hidden.float()
            mixer.set_layout(layout)
            try:
                y = mixer.ssm_output(block.norm(residual.to(block.norm.weight.dtype)))
            finally:
                mixer.set_layout(None)
            hidden = mixer.out_proj(y)
            if i in keep:
                index, layout, fuse_w, kept_frac = self._select(i, y, layout, keep[i], thresholds.get(i))
                stats.kept_fraction.append(kept_frac)
                fused = None
                if fuse_w is not None:  # reorder: one token summarising the pruned ones, appended at the end
                    fused = [(fuse_w[..., None] * t.float()).sum(1, keepdim=True) for t in (hidden, residual)]
                hidden, residual = gather_tokens(hidden, index), gather_tokens(residual, index)
                if fused is not None:
                    hidden = torch.cat([hidden, fused[0].to(hidden.dtype)], 1)
                    residual = torch.cat([residual, fused[1]], 1)
        tokens = self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))
        return tokens, layout, stats

    def _select(self, block: int, y: Tensor, layout: TokenLayout, keep: float, threshold: float | None):
        cfg = self.prune_config
        bsz, length = y.shape[:2]
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + block) if cfg.score == "random" else None
        scores = token_scores(y, cfg.score, generator)
        is_cls = torch.arange(length, device=y.device)[None, :] == layout.cls_index[:, None]
        if self.score_observer is not None:
            self.score_observer(block, scores, ~is_cls)
        candidates = length - 1
        if cfg.mode == "threshold" and threshold is not None:
            k = int(((scores >= threshold) & ~is_cls).sum())  # batch of one (see forward)
            k = max(k, 1)
            if cfg.arrangement == "keep-order" and k % 2 and k < candidates:
                k += 1
        else:
            k = kept_count(candidates, keep)
        kept_frac = k / candidates
        if k >= candidates:
            return torch.arange(length, device=y.device).expand(bsz, -1), layout, None, kept_frac  # nothing to prune
        cls = layout.cls_index[:, None]
        if cfg.arrangement == "align":
            index = torch.cat([topk_sorted(scores, k, is_cls), cls], 1).sort(1).values
            new_cls = (index == cls).long().argmax(1)
        else:
            if cfg.arrangement == "keep-order":
                kept = topk_sorted(scores, k, is_cls)
            else:  # reorder: score order
                kept = torch.sort(-scores.masked_fill(is_cls, float("-inf")), dim=1, stable=True).indices[:, :k]
            half = k // 2
            index = torch.cat([kept[:, :half], cls, kept[:, half:]], 1)
            new_cls = torch.full((bsz,), half, device=y.device, dtype=torch.long)
        positions = gather_tokens(layout.positions, index)
        fuse_w = None
        if cfg.arrangement == "reorder":
            dropped = torch.ones(bsz, length, dtype=torch.bool, device=y.device)
            dropped = dropped.scatter(1, index, torch.zeros_like(index, dtype=torch.bool))
            weights = (scores.clamp_min(0) + 1e-6) * dropped  # clipped scores of the pruned tokens, normalised
            fuse_w = weights / weights.sum(1, keepdim=True)
            positions = torch.cat([positions, positions.new_full((bsz, 1), -1)], 1)
        return index, TokenLayout(positions, new_cls, layout.length, layout.aligned), fuse_w, kept_frac


def apply_pruning(model: VisionMamba, config: PruneConfig) -> VisionMamba:
    """Patch ``model`` in place so that its forward prunes tokens as ``config`` says; returns the same object."""
    if isinstance(model, PrunedVisionMamba):
        raise ConfigError("this model is already pruned; load the dense model to prune it again.")
    config.validate_for(model.config.depth)
    model.__class__ = PrunedVisionMamba
    model.prune_config = config
    for block in model.layers:
        block.mixer.__class__ = PrunableBiMambaMixer
        block.mixer.gap_estimate = config.gap
        block.mixer.conv_neighbours = config.conv
    return model


def remove_pruning(model: PrunedVisionMamba) -> VisionMamba:
    """Undo :func:`apply_pruning`: the plain dense model again (same object, same weights)."""
    if not isinstance(model, PrunedVisionMamba):
        return model
    for block in model.layers:
        block.mixer.__class__ = BiMambaMixer
        for attr in ("gap_estimate", "conv_neighbours", "layout"):
            block.mixer.__dict__.pop(attr, None)
    for attr in ("prune_config", "last_stats", "score_observer"):
        model.__dict__.pop(attr, None)
    model.__class__ = VisionMamba
    return model
