"""PlainMamba: Yang et al., "PlainMamba: Improving Non-Hierarchical Mamba in Visual Recognition", BMVC 2024,
arXiv 2403.17695.

Mirrors the mmcls backbone of ChenhongyiYang/PlainMamba (``mmcls/plain_mamba_dev/models/plain_mamba/plain_mamba.py``
::PlainMamba, ``plain_mamba_layer.py``::PlainMamba2D / PlainMambaLayer, ``models/modules/patch_embed.py``
::ConvPatchEmbed) with the ``CustomAveragePooling`` neck and a linear head, for the released L1/L2/L3
configurations: convolutional patch stem, learnable position embedding (no class token), pre-LayerNorm blocks whose
mixer runs four continuous zig-zag scans over the H x W grid. Behaviour of the official forward that looks like a bug
is kept on purpose, because the released weights were trained with it:

- the dt bias enters twice (``dt_proj`` adds it, the scan adds it again before softplus);
- per direction only x is put into scan order; dt, B and C stay in raster order, and the direction embedding of
  scan step t is added to the B of raster token t;
- layers with a depth-wise conv (L1: layer 0) replace the stream by GELU(BN(dwconv(x))), with no residual around it.

State-dict keys equal the official ones without the ``backbone.`` prefix, and with ``head.fc.`` renamed ``head.``.

Shapes: B batch, L = H W tokens, C embed dim, E d_inner, N d_state, R dt_rank, K = 4 scan directions.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.layers import DropPath, initial_dt_bias
from ssmtrim.models.plainmamba_grid import (
    NUM_DIRECTIONS,
    ScanPlan,
    from_grid,
    make_plan,
    to_grid,
    zigzag_orders,
)  # fmt: skip
from ssmtrim.models.registry import ArchConfig, DataConfig, ModelSpec, PretrainedCfg, register_family, register_model
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw, size_text
from ssmtrim.models.tokens import BlockOutput, TokenState, restore_tokens, tracing
from ssmtrim.ops import selective_scan


@dataclass(frozen=True)
class PlainMambaConfig(ArchConfig):
    family: ClassVar[str] = "plainmamba"

    embed_dim: int
    depth: int
    stem_convs: int = 1  # extra 3x3 conv + BN + ReLU blocks after the 7x7 stride-2 stem conv
    img_size: ImgSize = 224  # N (square) or (H, W), as the official to_2tuple takes it
    patch_size: int = 16  # total stride: the stem halves, the projection (kernel = stride = patch_size / 2) the rest
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    expand: int = 2
    conv_size: int = 7  # depth-wise 2-D conv of the mixer
    stem_channels: int = 64
    layers_with_dwconv: tuple[int, ...] = ()
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), the official "auto"
    norm_eps: float = 1e-5  # per-layer nn.LayerNorm default
    final_norm_eps: float = 1e-6  # ln1: mmcls norm_cfg dict(type='LN', eps=1e-6)
    drop_path_rate: float = 0.0  # stochastic depth (training only; linear over depth as in the official code)

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "patch_size", "in_chans", "d_state", "expand", "conv_size",
                     "stem_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"PlainMamba config field {name} must be a positive integer, got {value!r}.")
        if not isinstance(self.stem_convs, int) or self.stem_convs < 0:
            raise ConfigError(f"PlainMamba config field stem_convs must be >= 0, got {self.stem_convs!r}.")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ConfigError(f"PlainMamba config field num_classes must be >= 0, got {self.num_classes!r}.")
        if self.patch_size % 2:
            raise ConfigError(f"PlainMamba config field patch_size must be even (the stem halves it), "
                              f"got {self.patch_size}.")
        if self.conv_size % 2 == 0:
            raise ConfigError(f"PlainMamba config field conv_size must be odd ('same' padding), got {self.conv_size}.")
        object.__setattr__(self, "img_size", normalize_img_size(self.img_size))  # a square (N, N) is stored as N
        if min(self.input_hw) < 2:
            raise ConfigError(f"PlainMamba config field img_size must be at least 2 on each side, got "
                              f"{size_text(self.img_size)}.")
        layers = tuple(self.layers_with_dwconv)
        if any(not isinstance(i, int) or not 0 <= i < self.depth for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError(f"PlainMamba config field layers_with_dwconv must list distinct layer indices in "
                              f"[0, {self.depth}), got {self.layers_with_dwconv!r}.")
        object.__setattr__(self, "layers_with_dwconv", tuple(sorted(layers)))
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.embed_dim / 16))
        elif not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ConfigError(f"PlainMamba config field dt_rank must be a positive integer or None, "
                              f"got {self.dt_rank!r}.")
        for name in ("norm_eps", "final_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"PlainMamba config field {name} must be > 0, got {getattr(self, name)!r}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"PlainMamba config field drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}.")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of the input images."""
        return size_hw(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the token grid that ``pos_embed`` is stored for, computed per side as
        ConvPatchEmbed.init_out_size does: side // 2 after the stem, padded up to a multiple of patch_size / 2,
        divided by it."""
        step = self.patch_size // 2
        h, w = (-(-(side // 2) // step) for side in self.input_hw)
        return h, w

    @property
    def num_patches(self) -> int:
        h, w = self.grid_size
        return h * w


# ---------------------------------------------------------------------------------------------------------------
# zig-zag scan orders


def _orders_on(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The zig-zag orders on ``device``, cached (not while traced: see :func:`zigzag_orders`)."""
    return _orders_uncached(h, w, device) if tracing() else _orders_cached(h, w, device)


@functools.lru_cache(maxsize=64)
def _orders_cached(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return _orders_uncached(h, w, device)


def _orders_uncached(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.to(device) for t in zigzag_orders(h, w))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# layers


class PlainMambaMixer(nn.Module):
    """PlainMamba2D: in_proj -> (x, z); x -> depth-wise 2-D conv -> SiLU -> four zig-zag selective scans, summed,
    gated by SiLU(z) -> out_proj.

    ``forward(x: B L C, hw) -> B L C`` is ``out_proj(ssm_output(x, hw))``; :meth:`ssm_output` (B L E) is the gated sum
    of the four scans in raster order, which token pruning scores.
    """

    def __init__(self, cfg: PlainMambaConfig) -> None:
        super().__init__()
        c, e, n, r = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.in_proj = nn.Linear(c, 2 * e, bias=True)
        self.conv2d = nn.Conv2d(e, e, cfg.conv_size, padding=cfg.conv_size // 2, groups=e, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        # A = -exp(A_log), S4D-real initialisation A_n = -(n + 1); D = 1
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, c, bias=True)
        # one learned offset of B per step direction: start, right, left, up, down
        self.direction_Bs = nn.Parameter(torch.zeros(NUM_DIRECTIONS + 1, n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's dt initialisation (softplus(bias) log-uniform in [dt_min, dt_max]) and direction_Bs ~ N(0, .02)."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(initial_dt_bias(self.d_inner, dt_min, dt_max, dt_floor))
        nn.init.trunc_normal_(self.direction_Bs, std=0.02)

    def conv_act(self, u: Tensor, hw: tuple[int, int], plan: ScanPlan | None = None) -> Tensor:
        """SiLU(depth-wise conv2d) on the h x w grid: u (B E L) in raster order -> (B E L). With a ``plan`` (a
        reduced sequence) the conv runs on the grid cells the plan gives the tokens."""
        if plan is not None:
            return F.silu(from_grid(self.conv2d(to_grid(u, plan)), plan))
        bsz, e, length = u.shape
        h, w = hw
        if h * w != length:
            raise ConfigError(f"PlainMamba got {length} tokens for a {h}x{w} grid; the mixer needs the full grid.")
        return F.silu(self.conv2d(u.reshape(bsz, e, h, w))).flatten(2)

    def scan_orders(self, u: Tensor, hw: tuple[int, int], plan: ScanPlan | None = None,
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per direction and image, for u (B E L): ``orders`` (K B L) the token read at each scan step, ``inverse``
        (K B L) the scan step of each token, ``directions`` (K B L) the direction embedding id of each step: the
        zig-zag paths of the grid, the same for every image, or those the ``plan`` of a reduced sequence gives."""
        if plan is not None:
            return plan.orders, plan.inverse, plan.directions
        orders, inverse, directions = _orders_on(*hw, u.device)
        shape = (NUM_DIRECTIONS, u.shape[0], u.shape[2])
        return orders[:, None].expand(shape), inverse[:, None].expand(shape), directions[:, None].expand(shape)

    def decay_gap(self, delta: Tensor, plan: ScanPlan | None = None) -> Tensor | None:
        """Extra decay per direction and scan step (K B E L) given delta (B E L): the positions a reduced sequence
        skips (see :mod:`ssmtrim.models.plainmamba_grid`); none for a full sequence."""
        if plan is None or plan.gaps is None or plan.gap_estimate == "zero":
            return None
        bias = self.dt_proj.bias.float()
        if plan.gap_estimate == "bias":
            estimate = F.softplus(2 * bias)[None, :, None]  # 1 E 1: dt_proj adds the bias, the scan adds it again
        else:  # mean Δ of the present tokens of this layer; delta already holds the bias once
            estimate = F.softplus(delta.float() + bias[:, None]).mean(-1, keepdim=True)  # B E 1
        return plan.gaps[:, :, None, :].to(estimate.dtype) * estimate  # K B E L

    def project(self, x: Tensor, hw: tuple[int, int], plan: ScanPlan | None = None,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B L C) -> scan inputs in raster order: u (B E L) after conv and SiLU, delta (B E L) = dt_proj(dt)
        including its bias once, B and C (B N L), and the gate z (B L E)."""
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = self.conv_act(u.transpose(1, 2), hw, plan)  # B E L
        dt, b, c = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        return u, delta, b.transpose(1, 2), c.transpose(1, 2), z

    def scan(self, u: Tensor, delta: Tensor, b: Tensor, c: Tensor, hw: tuple[int, int],
             plan: ScanPlan | None = None) -> Tensor:
        """The four directional scans in one batched call; u, delta (B E L), b, c (B N L) in raster order ->
        the sum of the four outputs (with D u in each) back in raster order (B E L), not gated."""
        bsz, e, length = u.shape
        k = NUM_DIRECTIONS
        orders, inverse, directions = self.scan_orders(u, hw, plan)  # K B L each
        # only u is permuted into scan order; delta, B and C stay in raster order (official behaviour)
        u_k = u.unsqueeze(0).expand(k, -1, -1, -1).gather(3, orders[:, :, None, :].expand(k, bsz, e, length))
        u_k = u_k.reshape(k * bsz, e, length)
        delta_k = delta.unsqueeze(0).expand(k, -1, -1, -1).reshape(k * bsz, e, length)
        dir_b = self.direction_Bs[directions].transpose(2, 3).to(b.dtype)  # K B N L, indexed by scan step
        b_k = (b.unsqueeze(0) + dir_b).reshape(k * bsz, self.d_state, length)
        c_k = c.unsqueeze(0).expand(k, -1, -1, -1).reshape(k * bsz, self.d_state, length)
        gap = self.decay_gap(delta, plan)
        # the bias goes in once through dt_proj and a second time as delta_bias, as in the official forward
        y = selective_scan(
            u_k.contiguous(), delta_k.contiguous(), -torch.exp(self.A_log.float()), b_k.contiguous(),
            c_k.contiguous(), self.D.float(), z=None, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            gap=None if gap is None else gap.reshape(k * bsz, e, length).contiguous(),
        )  # fmt: skip
        y = y.reshape(k, bsz, e, length)
        return y.gather(3, inverse[:, :, None, :].expand(k, bsz, e, length)).sum(0)  # back in raster order

    def ssm_output(self, x: Tensor, hw: tuple[int, int], plan: ScanPlan | None = None,
                   deltas: list[Tensor] | None = None) -> Tensor:
        """x (B L C) -> SiLU(z) * sum of the four un-permuted scans (B L E). With a ``deltas`` list, softplus(Δ)
        (B L E, raster order; shared by the four directions) is appended to it."""
        u, delta, b, c, z = self.project(x, hw, plan)
        if deltas is not None:  # the bias enters twice (see the module docstring)
            deltas.append(F.softplus(delta.float() + self.dt_proj.bias.float()[:, None]).transpose(1, 2))
        return self.scan(u, delta, b, c, hw, plan).transpose(1, 2) * F.silu(z)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.out_proj(self.ssm_output(x, hw))


class PlainMambaLayer(nn.Module):
    """x + DropPath(mixer(LayerNorm(x))), then, for layers with a dw conv, GELU(BN(dwconv3x3(.))) replacing it."""

    def __init__(self, cfg: PlainMambaConfig, drop_path: float = 0.0, with_dwconv: bool = False) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.with_dwconv = with_dwconv
        if with_dwconv:
            self.dw = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.GELU()
            )
        self.mamba = PlainMambaMixer(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hw: tuple[int, int], plan: ScanPlan | None = None,
                deltas: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B L C) -> (x (B L C), the mixer's gated SSM output y (B L E), which token reduction scores). ``plan``
        says where the tokens of a reduced sequence sit (None: the full h x w grid); ``deltas`` collects
        softplus(Δ) (see :meth:`PlainMambaMixer.ssm_output`)."""
        y = self.mamba.ssm_output(self.norm(x), hw, plan, deltas)
        x = x + self.drop_path(self.mamba.out_proj(y))
        if self.with_dwconv:
            if plan is None:
                bsz, _, c = x.shape
                x = self.dw(x.transpose(1, 2).reshape(bsz, c, *hw)).flatten(2).transpose(1, 2)
            else:
                x = from_grid(self.dw(to_grid(x.transpose(1, 2), plan)), plan).transpose(1, 2)
        return x, y


class PlainMambaPatchEmbed(nn.Module):
    """ConvPatchEmbed: 7x7/2 conv + BN + ReLU (``stem``), ``stem_convs`` x (3x3 conv + BN + ReLU) (``convs``), zero
    padding at the bottom/right up to a multiple of patch_size / 2 (mmcv AdaptivePadding 'corner'), then a
    (patch_size / 2) conv of the same stride, with bias (``projection``). Stem convs have no bias."""

    def __init__(self, cfg: PlainMambaConfig) -> None:
        super().__init__()
        s = cfg.stem_channels
        self.step = cfg.patch_size // 2
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, s, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True)
        )
        convs: list[nn.Module] = []
        for _ in range(cfg.stem_convs):
            convs += [nn.Conv2d(s, s, 3, padding=1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*convs) if convs else None
        self.projection = nn.Conv2d(s, cfg.embed_dim, self.step, stride=self.step, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """x (B 3 H W) -> row-major tokens (B L C) and the grid (h, w)."""
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        pad_h, pad_w = (-x.shape[-2]) % self.step, (-x.shape[-1]) % self.step
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class PlainMamba(nn.Module):
    """PlainMamba classifier: ``forward(x: B 3 H W) -> logits (B num_classes)``.

    Other input sizes work as in the official code: ``pos_embed`` is resized bicubically to the token grid.
    """

    def __init__(self, config: PlainMambaConfig) -> None:
        super().__init__()
        self.config = config
        c = config.embed_dim
        self.patch_embed = PlainMambaPatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, c))
        # np.linspace(0, rate, depth) of the official code, in plain Python so that meta-device builds work
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.layers = nn.ModuleList(
            PlainMambaLayer(config, rates[i], i in config.layers_with_dwconv) for i in range(config.depth)
        )
        self.ln1 = nn.LayerNorm(c, eps=config.final_norm_eps)
        self.head = nn.Linear(c, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # the official config: TruncNormal(std .02, bias 0) for Linear layers, except that the mamba dt init is kept
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def pos_embed_for(self, hw: tuple[int, int]) -> Tensor:
        """pos_embed (1 L C) for a token grid hw; bicubic resize (mmcls resize_pos_embed) when it differs."""
        src = self.config.grid_size
        if tuple(hw) == src:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, *src, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(hw), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Images (B 3 H W) -> tokens with positions added (B L C) and the grid (h, w)."""
        tokens, hw = self.patch_embed(x)
        return tokens + self.pos_embed_for(hw), hw

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> tokens after the last layer, before the final norm (B L C)."""
        tokens, hw = self.embed(x)
        for layer in self.layers:
            tokens, _ = layer(tokens, hw)
        return tokens

    def forward_head(self, tokens: Tensor) -> Tensor:
        """Tokens (B L C) -> ln1 -> mean over tokens -> head."""
        return self.head(self.ln1(tokens).mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# family: build, convert official checkpoints, infer architectures


def _stored_size(tokens: int, patch: int, img_size: ImgSize | None) -> ImgSize:
    """The input size of a position embedding of ``tokens`` grid cells: a square number is a square grid of
    ``patch``-pixel patches; any other number needs ``img_size``, whose grid must hold exactly that many."""
    grid = math.isqrt(tokens)
    if grid * grid == tokens:
        return grid * patch
    if img_size is None:
        raise CheckpointError(f"the PlainMamba pos_embed holds {tokens} positions, not a square grid, so the input "
                              "size it was trained at cannot be inferred; give that size with --img-size H,W "
                              "(img_size=(H, W) in Python).")
    h, w = size_hw(img_size)
    if h % patch == 0 and w % patch == 0 and (h // patch) * (w // patch) == tokens:
        return normalize_img_size(img_size)
    raise CheckpointError(f"the PlainMamba pos_embed holds {tokens} positions, not a square grid, and {h}x{w} images "
                          f"do not make {tokens} {patch}-pixel patches; give the size it was trained at with "
                          "--img-size H,W (img_size=(H, W) in Python), then resize the loaded model.")


class PlainMambaFamily:
    name = "plainmamba"
    config_cls = PlainMambaConfig

    def build(self, config: PlainMambaConfig) -> PlainMamba:
        return PlainMamba(config)

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """mmcls layout -> ours: strip ``backbone.`` (and DDP's ``module.``), ``head.fc.`` -> ``head.``, drop the EMA
        hook's ``ema_*`` buffers, add ``num_batches_tracked`` where a BatchNorm lacks it. Our layout passes through."""
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            if any(part.startswith("ema_") for part in key.split(".")):
                continue
            if key.startswith("backbone."):
                key = key.removeprefix("backbone.")
            elif key.startswith("head.fc."):
                key = "head." + key[len("head.fc.") :]
            out[key] = value
        for key in [k for k in out if k.endswith(".running_mean")]:
            tracked = key[: -len("running_mean")] + "num_batches_tracked"
            if tracked not in out:
                out[tracked] = torch.zeros((), dtype=torch.long)
        return out

    def detect(self, state_dict: dict[str, Tensor]) -> bool:
        return any(re.search(r"(^|\.)layers\.\d+\.mamba\.direction_Bs$", k) for k in state_dict)

    def infer_config(self, state_dict: dict[str, Tensor], img_size: ImgSize | None = None) -> PlainMambaConfig:
        """The architecture of a state dict. A square position embedding gives the input size; a non-square one
        does not, so it needs ``img_size``, the size it was trained at (ignored for a square one)."""
        sd = self.convert_state_dict(state_dict)
        try:
            stem_w = sd["patch_embed.stem.0.weight"]  # S 3 7 7
            proj_w = sd["patch_embed.projection.weight"]  # C S P/2 P/2
            pos = sd["pos_embed"]  # 1 L C
            in_proj = sd["layers.0.mamba.in_proj.weight"]  # 2E C
            conv = sd["layers.0.mamba.conv2d.weight"]  # E 1 K K
            a_log = sd["layers.0.mamba.A_log"]  # E N
            dt_w = sd["layers.0.mamba.dt_proj.weight"]  # E R
        except KeyError as exc:
            raise CheckpointError(
                f"this looks like a PlainMamba checkpoint but has no tensor {exc.args[0]!r}; it is incomplete or not "
                "in the ChenhongyiYang/PlainMamba layout, so pass the architecture explicitly with --arch."
            ) from None
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        embed_dim, patch = proj_w.shape[0], 2 * proj_w.shape[-1]
        d_inner = in_proj.shape[0] // 2
        if d_inner % embed_dim:
            raise CheckpointError(f"PlainMamba d_inner {d_inner} is not a multiple of the embed dim {embed_dim}.")
        size = _stored_size(pos.shape[1], patch, img_size)
        convs = [v for k, v in sd.items() if re.fullmatch(r"patch_embed\.convs\.\d+\.weight", k)]
        stem_convs = sum(1 for v in convs if v.ndim == 4)  # the BatchNorm weights in between are 1-D
        dw_layers = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\.dw\.0\.weight", k)))
        head = sd.get("head.weight")
        return PlainMambaConfig(
            embed_dim=embed_dim, depth=depth, stem_convs=stem_convs, img_size=size, patch_size=patch,
            in_chans=stem_w.shape[1], num_classes=0 if head is None else head.shape[0], d_state=a_log.shape[1],
            expand=d_inner // embed_dim, conv_size=conv.shape[-1], stem_channels=stem_w.shape[0],
            layers_with_dwconv=tuple(dw_layers), dt_rank=dt_w.shape[1],
        )  # fmt: skip

    # --- token layout and reduction (see ssmtrim.models.registry.Family)

    def depth(self, config: PlainMambaConfig) -> int:
        return config.depth

    def num_tokens(self, config: PlainMambaConfig) -> int:
        return config.num_patches

    def has_class_token(self, config: PlainMambaConfig) -> bool:
        return False  # every token is a candidate; the head averages those left

    def block_name(self, config: PlainMambaConfig, index: int) -> str:
        return f"layers.{index}"

    def embed(self, model: PlainMamba, x: Tensor, keeps_positions: bool) -> tuple[tuple, TokenState]:
        hidden, hw = model.embed(x)
        bsz, length, _ = hidden.shape
        positions = torch.arange(length, device=hidden.device).expand(bsz, -1)
        return (hidden,), TokenState(positions, None, length, hw, keeps_positions)

    def run_block(self, model: PlainMamba, index: int, streams: tuple, state: TokenState,
                  geometry: ScanPlan | None, needs: frozenset[str] = frozenset()) -> BlockOutput:
        layer = model.layers[index]
        deltas: list[Tensor] | None = [] if "delta" in needs else None
        mixer_input = layer.norm(streams[0]) if "mixer_input" in needs else None
        hidden, y = layer(streams[0], state.grid, geometry, deltas)
        return BlockOutput((hidden,), y, deltas[0] if deltas else None, mixer_input)

    def geometry(self, model: PlainMamba, state: TokenState, plan) -> ScanPlan | None:
        return make_plan(state, plan.gap) if state.reduced else None

    def features(self, model: PlainMamba, streams: tuple, state: TokenState) -> Tensor:
        tokens = model.ln1(streams[0])
        if state.sizes is None:
            return tokens.mean(dim=1)
        # merged tokens stand for several: the mean over the original tokens they represent
        weights = state.sizes.to(tokens.dtype)[..., None]
        return (tokens * weights).sum(1) / weights.sum(1)

    def feature_map(self, model: PlainMamba, index: int, streams: tuple, state: TokenState) -> Tensor:
        """The tokens after the final norm, restored to the patch grid (B D h w)."""
        tokens = restore_tokens(model.ln1(streams[0]), state)
        h, w = state.grid
        return tokens.transpose(1, 2).reshape(*tokens.shape[::2], h, w)

    def classifier(self, model: PlainMamba) -> nn.Module:
        return model.head

    def recommended_plan(self, config: PlainMambaConfig) -> dict:
        # measured best at -30% FLOPs on the project's CIFAR-10 PlainMamba (README, "The method, measured"): merging
        # into the most similar kept token (normed mixer input), a merged token rescaled to its tokens' mean norm
        # (README "Levers at 256 tokens"); the head then averages tokens by size; and the head compensation
        layers = tuple(sorted({max(1, min(config.depth - 1, round(config.depth * f))) for f in (1 / 3, 2 / 3)}))
        return {"arrangement": "merge", "score": "clipped", "metric": "input", "conv": "original", "gap": "bias",
                "compensate": "head", "layers": layers, "options": {"rescale": "norm"}}

    def resize_state_dict(self, config, state_dict: dict[str, Tensor], img_size: ImgSize):
        """(config at ``img_size`` (N or (H, W)), state dict with the position embedding interpolated to its token
        grid)."""
        from ssmtrim.models.plainmamba_resize import resize_state_dict

        return resize_state_dict(config, state_dict, img_size)

    def provides(self, config) -> frozenset[str]:
        """What run_block hands over when asked (scores and strategies that need more are refused)."""
        return frozenset({"delta", "mixer_input", "condensed"})

    def check_plan(self, plan) -> None:
        if plan.conv != "original":
            raise ConfigError(f"--conv {plan.conv} is defined for Vim's 1-D conv only; PlainMamba's 2-D conv always "
                              "runs on the original grid (leave --conv at original).")

    def mixer_dims(self, module: nn.Module) -> MixerDims | None:
        if not isinstance(module, PlainMambaMixer):
            return None
        taps = math.prod(module.conv2d.kernel_size)
        # four scans counted, z gates outside the scan
        return MixerDims(module.in_proj.in_features, module.d_inner, module.d_state, module.dt_rank, taps, 0,
                         NUM_DIRECTIONS, False)  # fmt: skip


FAMILY = register_family(PlainMambaFamily())

_HUB = "ChenhongyiYang/PlainMamba"


def _register_plainmamba(size: str, dim: int, depth: int, stem_convs: int, dw: tuple[int, ...], top1: float) -> None:
    register_model(ModelSpec(
        name=f"plainmamba_{size}",
        arch=PlainMambaConfig(embed_dim=dim, depth=depth, stem_convs=stem_convs, layers_with_dwconv=dw),
        pretrained=(PretrainedCfg(_HUB, f"{size}.pth", top1),),
        description=f"PlainMamba-{size.upper()}: C={dim}, {depth} layers, 4 zig-zag scans, 196 patches, ImageNet-1k",
    ))  # fmt: skip


_register_plainmamba("l1", 192, 24, 1, (0,), 77.9)
_register_plainmamba("l2", 384, 24, 2, (), 81.6)
_register_plainmamba("l3", 448, 36, 2, (), 82.3)
register_model(ModelSpec(
    name="plainmamba_test",
    arch=PlainMambaConfig(embed_dim=32, depth=2, stem_convs=1, img_size=64, num_classes=10, d_state=8,
                          stem_channels=16, layers_with_dwconv=(0,)),
    data=DataConfig(input_size=(3, 64, 64)), test_only=True, description="tiny PlainMamba for tests",
))  # fmt: skip
register_model(ModelSpec(
    name="plainmamba_cifar",
    arch=PlainMambaConfig(embed_dim=96, depth=12, stem_convs=1, img_size=32, patch_size=4, num_classes=10,
                          stem_channels=32, layers_with_dwconv=(0,)),
    data=DataConfig(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    description="small PlainMamba for CIFAR-10: C=96, 12 layers, 8x8 grid of patches on 32x32 (stride 4)",
))  # fmt: skip
