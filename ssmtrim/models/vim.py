"""Vision Mamba (Vim): Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State
Space Model", ICML 2024, arXiv 2401.09417.

Mirrors ``vim/models_mamba.py::VisionMamba`` of hustvl/Vim with the "bimamba v2" mixer of its vendored
``mamba_ssm/modules/mamba_simple.py``, for the released configuration: middle class token, absolute position
embedding, RMSNorm, residual stream in fp32, outputs of the two directions averaged (``div2``). Training-only switches
of the official code (token flipping, RoPE, drop path at eval) are left out. State-dict keys equal the official ones.

Shapes: B batch, L tokens (M patches + 1 class token), D embed dim, E d_inner, N d_state, R dt_rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.registry import ArchConfig, DataConfig, ModelSpec, PretrainedCfg, register_family, register_model
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw, size_text
from ssmtrim.models.tokens import (
    BlockOutput,
    TokenState,
    Unmerge,
    gaps_from_positions,
    gather_tokens,
    merge_pair,
    restore_tokens,
    unmerge_of,
)
from ssmtrim.ops import selective_scan
from ssmtrim.ops.conv import causal_conv1d_silu
from ssmtrim.ops.tokens import TokenKernels, standard_ops_only, token_kernels


@dataclass(frozen=True)
class VimConfig(ArchConfig):
    family: ClassVar[str] = "vim"

    embed_dim: int
    depth: int
    img_size: ImgSize = 224  # N (square) or (H, W), as the official to_2tuple takes it
    patch_size: int = 16
    stride: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), the official "auto"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "patch_size", "stride", "in_chans", "d_state", "d_conv", "expand"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"Vim config field {name} must be a positive integer, got {getattr(self, name)}.")
        if self.num_classes < 0:
            raise ConfigError(f"Vim config field num_classes must be >= 0, got {self.num_classes}.")
        object.__setattr__(self, "img_size", normalize_img_size(self.img_size))  # a square (N, N) is stored as N
        if min(self.input_hw) < self.patch_size:
            raise ConfigError(f"Vim img_size {size_text(self.img_size)} is smaller than patch_size {self.patch_size}.")
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.embed_dim / 16))

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of the input images."""
        return size_hw(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) patches, as the official PatchEmbed computes them per side: (side - patch) // stride + 1."""
        h, w = self.input_hw
        return (h - self.patch_size) // self.stride + 1, (w - self.patch_size) // self.stride + 1

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def protected_positions(self) -> tuple[int, ...]:
        """Where the protected tokens sit in the full sequence: the class token."""
        return (self.cls_position,)

    @property
    def cls_position(self) -> int:
        """Index of the class token: M // 2 with M = h w the number of patches before insertion (98 for 196; the
        official forward uses M // 2 for any grid, square or not)."""
        return self.num_patches // 2


class RMSNorm(nn.Module):
    """RMSNorm without bias, computed in fp32 (as mamba-ssm's fused kernel does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not standard_ops_only():
            # PyTorch's own RMSNorm: one call where the expression below takes six (at batch 1 a share of a block's
            # time); the same formula in fp32 (an export or a FLOP count sees the expression)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(self.weight.dtype)


@dataclass(frozen=True)
class VimGeometry:
    """Where the tokens of a reduced sequence sit, for the mixers (one per token layout, shared by the blocks)."""

    length: int  # L0, tokens before any reduction
    conv_positions: Tensor | None  # B L original positions for the causal conv; None: the conv reads the present tokens
    gap_counts: tuple[Tensor, Tensor] | None  # (forward, backward) skipped positions before each token (B L, float)
    gap_estimate: str  # "bias" or "mean": the Δ of a skipped position
    # the streams still hold every position (an ``unmerge`` state): the blocks merge their normed input into the
    # tokens and un-merge the mixer's output; None: the streams hold the tokens
    unmerge: Unmerge | None = None

    def conv_positions_for(self, backward: bool) -> Tensor | None:
        """The conv's positions in one direction's scan order (the backward direction's counted from the end), or
        None where the conv reads the present tokens."""
        if self.conv_positions is None:
            return None
        return (self.length - 1 - self.conv_positions).flip(1) if backward else self.conv_positions

    def gap_counts_for(self, backward: bool) -> Tensor | None:
        """The skipped positions before each token (B L) in one direction's scan order, or None without gaps."""
        if self.gap_counts is None:
            return None
        return self.gap_counts[1].flip(1) if backward else self.gap_counts[0]


class BiMambaMixer(nn.Module):
    """The bidirectional "v2" Mamba mixer: one in_proj/out_proj, a forward and a backward scan branch.

    ``forward(h: B L D) -> B L D`` is ``out_proj(ssm_output(h))``; :meth:`ssm_output` is the gated output of both
    directions in the original token order, averaged (B L E), which token pruning scores.
    """

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        d, e, n, r = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = e, n, r, cfg.d_conv
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.out_proj = nn.Linear(e, d, bias=False)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(e, e, cfg.d_conv, groups=e, padding=cfg.d_conv - 1))
            self.add_module("x_proj" + suffix, nn.Linear(e, r + 2 * n, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(r, e, bias=True))
        # A = -exp(A_log), S4D-real initialisation A_n = -(n + 1); D = 1 (mamba_simple.py)
        a_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(e))
        self.D_b = nn.Parameter(torch.ones(e))
        self.reset_dt()

    @torch.no_grad()
    def reset_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's dt initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank**-0.5
        for proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp_min(dt_floor)
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def conv_act(self, x: Tensor, backward: bool, geometry: VimGeometry | None = None) -> Tensor:
        """SiLU(causal depth-wise conv1d(x)), x (B E L) in the branch's scan order (left padding d_conv - 1). With a
        geometry whose tokens keep their original positions, neighbours are found by original position (a missing
        one reads as zero)."""
        conv = self.conv1d_b if backward else self.conv1d
        if geometry is None or geometry.conv_positions is None:
            return causal_conv1d_silu(x, conv)
        return causal_conv1d_silu(x, conv, geometry.conv_positions_for(backward), geometry.length)

    def decay_gap(self, dt: Tensor, backward: bool, geometry: VimGeometry | None = None,
                  ) -> tuple[Tensor, Tensor] | None:
        """Extra decay of the positions a reduced sequence skips, in factored form (counts (B L), Δ estimate (B E))
        (see :func:`ssmtrim.ops.selective_scan`); none for a full sequence."""
        if geometry is None or geometry.gap_counts is None:
            return None
        counts = geometry.gap_counts_for(backward)  # B L in scan order
        bias = (self.dt_proj_b if backward else self.dt_proj).bias.float()
        if geometry.gap_estimate == "bias":
            estimate = F.softplus(bias)[None, :].expand(dt.shape[0], -1)
        else:  # mean Δ of the present tokens of this layer and direction
            estimate = F.softplus(dt.float() + bias[:, None]).mean(-1)
        return counts, estimate  # G = counts x estimate, formed inside the scan

    def branch(self, x: Tensor, z: Tensor, backward: bool, geometry: VimGeometry | None = None,
               deltas: list[Tensor] | None = None, bcs: list[Tensor] | None = None,
               attention: tuple[Tensor, list[Tensor]] | None = None) -> Tensor:
        """One scan direction over x, z (B E L) already in that direction's order; returns gated y (B E L). With a
        ``deltas`` list, softplus(Δ) of this direction (B E L, scan order) is appended to it; with a ``bcs`` list, its
        B and C side by side (B L 2N, scan order); with ``attention`` (targets (B P) in scan order, a list), what
        each token writes into the targets' gated outputs (:func:`implicit_attention`, B L, scan order)."""
        s = "_b" if backward else ""
        x_proj, dt_proj = getattr(self, "x_proj" + s), getattr(self, "dt_proj" + s)
        A_log, D = getattr(self, "A_b_log" if backward else "A_log"), getattr(self, "D" + s)
        x = self.conv_act(x, backward, geometry)
        x_dbl = x_proj(x.transpose(1, 2))  # B L (R + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ dt_proj.weight.t()).transpose(1, 2)  # B E L; the bias enters once, inside the scan
        A = -torch.exp(A_log.float())
        gap, gap_scale = self.decay_gap(dt, backward, geometry) or (None, None)
        if deltas is not None:
            deltas.append(F.softplus(dt.float() + dt_proj.bias.float()[:, None]))
        if bcs is not None:
            bcs.append(torch.cat([b, c], dim=-1))
        if attention is not None:
            delta = F.softplus(dt.float() + dt_proj.bias.float()[:, None])
            if gap is not None:
                delta_gap = delta + gap.float()[:, None, :] * gap_scale.float()[:, :, None]
            else:
                delta_gap = delta
            attention[1].append(implicit_attention(x.float(), delta, delta_gap, A, b.float(), c.float(), z.float(),
                                                   attention[0]))
        return selective_scan(
            x, dt, A, b.transpose(1, 2), c.transpose(1, 2), D.float(), z=z, delta_bias=dt_proj.bias.float(),
            delta_softplus=True, gap=gap, gap_scale=gap_scale,
        )  # fmt: skip

    def ssm_output(self, hidden: Tensor, geometry: VimGeometry | None = None,
                   deltas: list[Tensor] | None = None, bcs: list[Tensor] | None = None,
                   attention: tuple[Tensor, list[Tensor]] | None = None) -> Tensor:
        """hidden (B L D) -> averaged gated output of both directions, original order (B L E). With a ``deltas``
        list, the two directions' softplus(Δ) averaged in original order (B L E) is appended to it; with a ``bcs``
        list, both directions' B and C side by side in original order (B L 4N); with ``attention`` (targets (B P),
        current indices; a list), the two directions' implicit attention to the targets summed in original order
        (B L) is appended to the list."""
        if deltas is None and bcs is None and attention is None:
            kernels = token_kernels(hidden, self, (self.conv1d, self.conv1d_b), self.d_inner, self.d_state)
            if kernels is not None:
                return self.ssm_output_tokens(hidden, kernels, geometry)
        xz = self.in_proj(hidden).transpose(1, 2)  # B 2E L
        x, z = xz.chunk(2, dim=1)
        per_direction: list[Tensor] | None = [] if deltas is not None else None
        bc_direction: list[Tensor] | None = [] if bcs is not None else None
        fwd = bwd = None
        if attention is not None:
            length = hidden.shape[1]
            fwd, bwd = (attention[0], []), (length - 1 - attention[0], [])
        y_f = self.branch(x, z, False, geometry, per_direction, bc_direction, fwd)
        y_b = self.branch(x.flip(-1), z.flip(-1), True, geometry, per_direction, bc_direction, bwd).flip(-1)
        if attention is not None:
            attention[1].append(fwd[1][0] + bwd[1][0].flip(-1))
        if deltas is not None:
            deltas.append(((per_direction[0] + per_direction[1].flip(-1)) / 2).transpose(1, 2))
        if bcs is not None:
            bcs.append(torch.cat([bc_direction[0], bc_direction[1].flip(1)], dim=-1))
        # rows (B L E), as the token-major kernels give them: out_proj would copy the transposed view anyway, and the
        # scores' reductions over E then sum in the same order on both paths
        return ((y_f + y_b) / 2).transpose(1, 2).contiguous()

    def ssm_output_tokens(self, hidden: Tensor, kernels: TokenKernels, geometry: VimGeometry | None = None) -> Tensor:
        """:meth:`ssm_output` on token-major kernels (:mod:`ssmtrim.ops.tokens`): the same values, with every
        activation kept as (B L ·) rows and the backward direction read by index instead of flipped; a geometry's
        conv positions and gap decay are read by the kernels."""
        x, z = self.in_proj(hidden).split(self.d_inner, dim=-1)  # B L E each, views
        if kernels.mixer is not None:  # the rest in a few calls
            return kernels.mixer(*self.mixer_directions(geometry), x, z, self.gap_mode(geometry))
        directions = []
        for backward in (False, True):
            s = "_b" if backward else ""
            x_proj, dt_proj = getattr(self, "x_proj" + s), getattr(self, "dt_proj" + s)
            A_log, D = getattr(self, "A_b_log" if backward else "A_log"), getattr(self, "D" + s)
            pos = None if geometry is None else geometry.conv_positions_for(backward)
            xc = kernels.conv(x, getattr(self, "conv1d" + s), backward, pos)  # B L E in scan order
            dt, b, c = torch.split(x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = dt @ dt_proj.weight.t()  # B L E
            gap, gap_scale = self.decay_gap(dt.transpose(1, 2), backward, geometry) or (None, None)
            directions.append((xc, dt, -torch.exp(A_log.float()), b, c, D.float(), dt_proj.bias.float(), gap,
                               gap_scale))
        return kernels.scan(*directions, z, True)

    def mixer_directions(self, geometry: VimGeometry | None) -> tuple[tuple, tuple]:
        """Each direction's weights and geometry for a backend's ``TokenKernels.mixer``: (conv weight, conv bias,
        conv positions, x_proj weight, dt_proj weight, dt_proj bias, A_log, D, gap counts), the positions and gap
        counts in the direction's scan order (None for a full sequence)."""
        directions = []
        for backward in (False, True):
            s = "_b" if backward else ""
            conv, dt_proj = getattr(self, "conv1d" + s), getattr(self, "dt_proj" + s)
            pos = gap = None
            if geometry is not None:
                pos, gap = geometry.conv_positions_for(backward), geometry.gap_counts_for(backward)
            directions.append((conv.weight, conv.bias, pos, getattr(self, "x_proj" + s).weight, dt_proj.weight,
                               dt_proj.bias, getattr(self, "A_b_log" if backward else "A_log"), getattr(self, "D" + s),
                               gap))
        return directions[0], directions[1]

    @staticmethod
    def gap_mode(geometry: VimGeometry | None) -> int:
        """How a backend's mixer kernel estimates the gap's step (see :meth:`decay_gap`): 2 softplus(dt_proj's
        bias), 1 the mean step of the present tokens; 0 without a gap."""
        if geometry is None or geometry.gap_counts is None:
            return 0
        return 2 if geometry.gap_estimate == "bias" else 1

    def forward(self, hidden: Tensor) -> Tensor:
        return self.out_proj(self.ssm_output(hidden))


def implicit_attention(u: Tensor, delta: Tensor, decay_steps: Tensor, a: Tensor, b: Tensor, c: Tensor, z: Tensor,
                       targets: Tensor) -> Tensor:
    """What each token writes into the targets' gated outputs through one scan direction (the scan's implicit
    attention, "The Hidden Attention of Mamba Models", arXiv 2403.01590), in that direction's order: token j's part of
    target t's output is sum_n C_t[n] exp(A[e, n] (S_t - S_j)[e]) B_j[n] Δ_j[e] u_j[e] for j <= t (none after it),
    S the running sum of the step sizes (with the decay of skipped positions), gated by SiLU(z_t); the score is its
    mean magnitude over the channels, summed over the targets. u, delta, decay_steps, z (B E L), a (E N), b, c (B L N),
    targets (B P) -> (B L)."""
    bsz, e, length = u.shape
    running = decay_steps.cumsum(-1)  # B E L
    written = delta * u  # Δ_j u_j, B E L
    index = torch.arange(length, device=u.device)
    out = u.new_zeros(bsz, length)
    for p in range(targets.shape[1]):
        t = targets[:, p]  # B
        s_t = running.gather(2, t[:, None, None].expand(-1, e, 1))  # B E 1
        span = (s_t - running).clamp_min(0)  # B E L, the decay from j to t
        c_t = c.gather(1, t[:, None, None].expand(-1, 1, c.shape[-1]))[:, 0]  # B N
        part = torch.zeros_like(u)
        for n in range(a.shape[1]):
            part += torch.exp(a[None, :, n, None] * span) * (c_t[:, n, None] * b[:, :, n])[:, None, :]
        gate = F.silu(z.gather(2, t[:, None, None].expand(-1, e, 1)))  # B E 1
        part = (part * written * gate).abs().mean(1)  # B L
        out += part.masked_fill(index[None, :] > t[:, None], 0.0)
    return out


class Block(nn.Module):
    """Pre-norm block "add -> norm -> mixer"; returns (mixer output, residual). Residual kept in fp32."""

    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mixer = BiMambaMixer(cfg)

    def forward(
        self, hidden: Tensor, residual: Tensor | None, geometry: VimGeometry | None = None,
        deltas: list[Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden, residual) (B L D) -> (mixer output, residual, the mixer's gated SSM output y (B L E), which token
        reduction scores). ``geometry`` says where the tokens of a reduced sequence sit (None: a full sequence);
        ``deltas`` collects softplus(Δ) (see :meth:`BiMambaMixer.ssm_output`)."""
        out, residual, y, _ = self.run(hidden, residual, geometry, deltas)
        return out, residual, y

    def run(
        self, hidden: Tensor, residual: Tensor | None, geometry: VimGeometry | None = None,
        deltas: list[Tensor] | None = None, bcs: list[Tensor] | None = None,
        attention: tuple[Tensor, list[Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`forward`, and also the normed mixer input (B L D) that it computed; ``bcs`` and ``attention`` as
        for :meth:`BiMambaMixer.ssm_output`."""
        residual = hidden.float() if residual is None else residual + hidden.float()
        normed = self.norm(residual.to(self.norm.weight.dtype))
        # with an unmerge state the streams hold every position, and the mixer runs on the merged tokens
        merge, unmerge = merge_pair(None if geometry is None else geometry.unmerge)
        normed = merge(normed)
        y = self.mixer.ssm_output(normed, geometry, deltas, bcs, attention)
        return unmerge(self.mixer.out_proj(y)), residual, y, normed


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig) -> None:
        super().__init__()
        self.input_hw = cfg.input_hw
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.stride)

    def forward(self, x: Tensor) -> Tensor:
        """x (B 3 H W) -> patch tokens, row-major (B M D)."""
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != self.input_hw:
            h, w = self.input_hw
            raise ConfigError(
                f"this model takes {h}x{w} images (height x width) but got {x.shape[-2]}x{x.shape[-1]}; resize the "
                "input (the eval transform from the model's data config does) or load the model for that size."
            )
        return self.proj(x).flatten(2).transpose(1, 2)


@torch.no_grad()
def init_weights(model: nn.Module, embeddings: tuple[Tensor, ...]) -> None:
    """The official initialisation of a Vim-style model (Vim, Mamba®): ``embeddings`` (position, class or register
    tokens) and linear weights trunc_normal(.02), zero biases (dt_proj's kept), then the GPT-2 style rescaling of the
    residual projections (models_mamba.py::_init_weights)."""
    for t in embeddings:
        nn.init.trunc_normal_(t, std=0.02)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(("dt_proj", "dt_proj_b")):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for block in model.layers:
        nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
        block.mixer.out_proj.weight /= math.sqrt(model.config.depth)


class VisionMamba(nn.Module):
    """Vim classifier: ``forward(x: B 3 H W) -> logits (B num_classes)``."""

    def __init__(self, config: VimConfig) -> None:
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm_f = RMSNorm(d, config.norm_eps)
        self.head = nn.Linear(d, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, (self.pos_embed, self.cls_token))

    def embed(self, x: Tensor) -> Tensor:
        """Images (B 3 H W) -> tokens with the class token in the middle and positions added (B L D)."""
        x = self.patch_embed(x)
        pos = self.config.cls_position
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :pos], cls, x[:, pos:]], dim=1)
        return x + self.pos_embed

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> final-normed tokens (B L D)."""
        hidden, residual = self.embed(x), None
        for block in self.layers:
            hidden, residual, _ = block(hidden, residual)
        return self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))

    def forward_head(self, tokens: Tensor) -> Tensor:
        return self.head(tokens[:, self.config.cls_position])

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# family: build, convert official checkpoints, infer architectures


def stored_size(patches: int, patch: int, img_size: ImgSize | None) -> tuple[ImgSize, int]:
    """(input size, stride) of a position embedding of ``patches`` patch slots. A square number is a square grid
    (the stride is not stored: prefer the one that makes a 224 input, the _stride8_ variants, else the patch size);
    any other number needs ``img_size``, whose grid must hold exactly that many patches."""
    grid = math.isqrt(patches)
    if grid * grid == patches:
        stride = next((s for s in (patch, patch // 2) if s > 0 and (grid - 1) * s + patch == 224), patch)
        return (grid - 1) * stride + patch, stride
    if img_size is None:
        raise CheckpointError(f"the Vim pos_embed holds {patches} patch positions, not a square grid, so the input "
                              "size it was trained at cannot be inferred; give that size with --img-size H,W "
                              "(img_size=(H, W) in Python).")
    h, w = size_hw(img_size)
    for stride in (patch, patch // 2):
        fits = stride > 0 and all(side >= patch and (side - patch) % stride == 0 for side in (h, w))
        if fits and ((h - patch) // stride + 1) * ((w - patch) // stride + 1) == patches:
            return normalize_img_size(img_size), stride
    raise CheckpointError(f"the Vim pos_embed holds {patches} patch positions, not a square grid, and {h}x{w} images "
                          f"do not make {patches} {patch}-pixel patches; give the size it was trained at with "
                          "--img-size H,W (img_size=(H, W) in Python), then resize the loaded model.")


def has_bimamba_mixers(state_dict: dict[str, Tensor]) -> bool:
    """Blocks with the bidirectional "v2" mixer (its backward direction's ``A_b_log``), as Vim and Mamba® have."""
    return any(re.search(r"(^|\.)layers\.\d+\.mixer\.A_b_log$", k) for k in state_dict)


class VimFamily:
    name = "vim"
    config_cls = VimConfig

    def build(self, config: VimConfig) -> VisionMamba:
        return VisionMamba(config)

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official hustvl/Vim keys already equal ours; strip wrappers added by DDP or other tools."""
        out = {}
        for key, value in state_dict.items():
            for prefix in ("module.", "model.", "backbone."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            out[key] = value
        return out

    def detect(self, state_dict: dict[str, Tensor]) -> bool:
        """Vim's bidirectional mixers around one class token (registers, ``pos_embed_cls``, make it a Mamba®)."""
        return has_bimamba_mixers(state_dict) and not any(k.endswith("pos_embed_cls") for k in state_dict)

    def infer_config(self, state_dict: dict[str, Tensor], img_size: ImgSize | None = None) -> VimConfig:
        """The architecture of a state dict. A square position embedding gives the input size; a non-square one
        does not, so it needs ``img_size``, the size it was trained at (ignored for a square one)."""
        sd = self.convert_state_dict(state_dict)
        try:
            patch_w = sd["patch_embed.proj.weight"]  # D 3 P P
            pos = sd["pos_embed"]  # 1 M+1 D
            in_proj = sd["layers.0.mixer.in_proj.weight"]  # 2E D
            a_log = sd["layers.0.mixer.A_log"]  # E N
            conv = sd["layers.0.mixer.conv1d.weight"]  # E 1 K
            dt_w = sd["layers.0.mixer.dt_proj.weight"]  # E R
        except KeyError as exc:
            raise CheckpointError(
                f"this looks like a Vim checkpoint but has no tensor {exc.args[0]!r}; it is incomplete or not in the "
                "hustvl/Vim layout, so pass the architecture explicitly with --arch."
            ) from None
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        embed_dim, patch = patch_w.shape[0], patch_w.shape[-1]
        size, stride = stored_size(pos.shape[1] - 1, patch, img_size)
        head = sd.get("head.weight")
        return VimConfig(
            embed_dim=embed_dim, depth=depth, img_size=size, patch_size=patch, stride=stride,
            in_chans=patch_w.shape[1], num_classes=0 if head is None else head.shape[0], d_state=a_log.shape[1],
            d_conv=conv.shape[-1], expand=in_proj.shape[0] // 2 // embed_dim, dt_rank=dt_w.shape[1],
        )  # fmt: skip

    # --- token layout and reduction (see ssmtrim.models.registry.Family)

    def depth(self, config: VimConfig) -> int:
        return config.depth

    def num_tokens(self, config: VimConfig) -> int:
        return config.num_patches + 1

    def has_class_token(self, config: VimConfig) -> bool:
        return True

    def block_name(self, config, index: int) -> str:
        return f"layers.{index}"

    def embed(self, model: VisionMamba, x: Tensor, keeps_positions: bool) -> tuple[tuple, TokenState]:
        """Streams (hidden, fp32 residual (None before the first block)) and the full token state."""
        hidden = model.embed(x)
        bsz, length, _ = hidden.shape
        state = TokenState(
            positions=torch.arange(length, device=x.device).expand(bsz, -1),
            cls_index=torch.full((bsz,), model.config.cls_position, device=x.device, dtype=torch.long),
            length=length, grid=model.config.grid_size, keeps_positions=keeps_positions,
        )  # fmt: skip
        return (hidden, None), state

    def run_block(self, model: VisionMamba, index: int, streams: tuple, state: TokenState,
                  geometry: VimGeometry | None, needs: frozenset[str] = frozenset()) -> BlockOutput:
        block = model.layers[index]
        deltas: list[Tensor] | None = [] if "delta" in needs else None
        bcs: list[Tensor] | None = [] if "bc" in needs else None
        attention = (state.protected_index(), []) if "cls_attention" in needs else None
        hidden, residual, y, normed = block.run(*streams, geometry, deltas, bcs, attention)
        return BlockOutput((hidden, residual), y, deltas[0] if deltas else None,
                           normed if "mixer_input" in needs else None, bcs[0] if bcs else None,
                           attention[1][0] if attention else None)

    def geometry(self, model: VisionMamba, state: TokenState, plan) -> VimGeometry | None:
        """Tokens at their original positions (align): the conv reads original neighbours (``plan.conv ==
        "original"``) and the scans decay over the gaps (unless ``plan.gap == "zero"``)."""
        if not (state.keeps_positions and state.reduced):
            return None
        counts = None
        if plan.gap != "zero":
            fwd, bwd = gaps_from_positions(state.positions, state.length)
            counts = (fwd.float(), bwd.float())
        conv_positions = state.positions if plan.conv == "original" else None
        return VimGeometry(state.length, conv_positions, counts, plan.gap, unmerge_of(state))

    def features(self, model: VisionMamba, streams: tuple, state: TokenState) -> Tensor:
        hidden, residual = streams
        tokens = model.norm_f((residual + hidden.float()).to(model.norm_f.weight.dtype))
        return gather_tokens(tokens, state.in_streams(state.cls_index[:, None]))[:, 0]

    def feature_map(self, model: VisionMamba, index: int, streams: tuple, state: TokenState) -> Tensor:
        """The patch tokens after the final norm, restored to the patch grid (B D h w); the protected tokens (class
        token, registers) left out."""
        hidden, residual = streams
        tokens = restore_tokens(model.norm_f((residual + hidden.float()).to(model.norm_f.weight.dtype)), state)
        keep = torch.ones(state.length, dtype=torch.bool, device=tokens.device)
        keep[list(model.config.protected_positions)] = False
        h, w = model.config.grid_size
        return tokens[:, keep].transpose(1, 2).reshape(*tokens.shape[::2], h, w)

    def classifier(self, model: VisionMamba) -> nn.Module:
        return model.head

    def recommended_plan(self, config: VimConfig) -> dict:
        # measured best at -30% FLOPs on the project's CIFAR-10 Vims (README, "The method, measured"): merging removed
        # tokens (each into the more similar of its staying neighbours, by the normed mixer input), the class token's
        # four neighbours on each side kept, the conv over the kept neighbours, no decay across the positions merged
        # away (Δ̃ = 0: a merged token carries its neighbour's step), a merged token rescaled to its tokens' mean norm
        # (README "Levers at 256 tokens": higher agreement with dense in every screened cell), and the head compensation
        layers = tuple(sorted({max(1, min(config.depth - 1, round(config.depth * f))) for f in (0.25, 0.5, 0.75)}))
        return {"arrangement": "merge", "score": "clipped", "metric": "input", "conv": "kept", "gap": "zero",
                "compensate": "head", "layers": layers,
                "options": {"merge_into": "adjacent", "protect_around": 4, "rescale": "norm"}}

    def resize_state_dict(self, config, state_dict: dict[str, Tensor], img_size: ImgSize):
        """(config at ``img_size`` (N or (H, W)), state dict with the position embedding interpolated to its token
        grid)."""
        from ssmtrim.models.vim_resize import resize_state_dict

        return resize_state_dict(config, state_dict, img_size)

    def provides(self, config) -> frozenset[str]:
        """What run_block hands over when asked (scores and strategies that need more are refused)."""
        return frozenset({"delta", "mixer_input", "bc", "cls_attention", "condensed", "unmerge"})

    def check_plan(self, plan) -> None:
        pass  # every option applies

    def mixer_dims(self, module: nn.Module) -> MixerDims | None:
        if not isinstance(module, BiMambaMixer):
            return None
        k = module.conv1d.kernel_size[0]
        # one scan direction counted (the peers' convention), z enters the scan
        return MixerDims(module.in_proj.in_features, module.d_inner, module.d_state, module.dt_rank, k, k - 1, 1, True)


FAMILY = register_family(VimFamily())

_HUB = "hustvl/Vim-{}-midclstok"
_LONG = "vim_{}_patch16_{}224_bimambav2_final_pool_mean_abs_pos_embed_with_{}_div2"


def _register_vim(size: str, dim: int, top1: float, ft_top1: float | None) -> None:
    s = size[0]
    files = (PretrainedCfg(_HUB.format(size), f"vim_{s}_midclstok_{top1:.1f}acc.pth".replace(".", "p", 1), top1),)
    register_model(ModelSpec(
        name=f"vim_{size}", arch=VimConfig(embed_dim=dim, depth=24), pretrained=files,
        aliases=(_LONG.format(size, "", "middle_cls_token" if size == "base" else "midclstok"), f"vim_{s}", f"vim-{s}"),
        description=f"Vim-{s.upper()}: D={dim}, 24 layers, middle class token, 196 patches, ImageNet-1k",
    ))  # fmt: skip
    if ft_top1 is None:
        return
    # the "+" checkpoints are fine-tuned at patch stride 8 (729 patches), a second architecture
    ft = (PretrainedCfg(_HUB.format(size), f"vim_{s}_midclstok_ft_{ft_top1:.1f}acc.pth".replace(".", "p", 1), ft_top1),)
    register_model(ModelSpec(
        name=f"vim_{size}_stride8", arch=VimConfig(embed_dim=dim, depth=24, stride=8), pretrained=ft,
        aliases=(_LONG.format(size, "stride8_", "midclstok"),),
        description=f"Vim-{s.upper()}+: Vim-{s.upper()} fine-tuned at patch stride 8 (729 patches), ImageNet-1k",
    ))  # fmt: skip


_register_vim("tiny", 192, 76.1, 78.3)
_register_vim("small", 384, 80.5, 81.6)
_register_vim("base", 768, 81.9, None)
register_model(ModelSpec(
    name="vim_test", arch=VimConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8, num_classes=10),
    data=DataConfig(input_size=(3, 32, 32)), test_only=True, description="tiny Vim for tests",
))  # fmt: skip

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_DATA = DataConfig(input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
register_model(ModelSpec(
    name="vim_cifar",
    arch=VimConfig(embed_dim=96, depth=12, img_size=32, patch_size=4, stride=4, num_classes=10),
    data=CIFAR10_DATA,
    description="small Vim for CIFAR-10: D=96, 12 layers, patch 4 on 32x32 (64 patches + middle class token)",
))  # fmt: skip
# vim_cifar's architecture on CIFAR-10 upsampled to 64x64: 256 patches + middle class token, the token count of the
# ImageNet models (196) rather than 64; started from vim_cifar with the position embedding interpolated (resize.py)
register_model(ModelSpec(
    name="vim_cifar256",
    arch=VimConfig(embed_dim=96, depth=12, img_size=64, patch_size=4, stride=4, num_classes=10),
    data=DataConfig(input_size=(3, 64, 64), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    description="small Vim for CIFAR-10 at 64x64 (upsampled): D=96, 12 layers, patch 4, 256 patches + middle class "
                "token",
))  # fmt: skip
