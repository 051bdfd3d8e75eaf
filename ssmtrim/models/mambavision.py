"""MambaVision: Hatamizadeh & Kautz, "MambaVision: A Hybrid Mamba-Transformer Vision Backbone", CVPR 2025,
arXiv 2407.08083.

Mirrors ``mambavision/models/mamba_vision.py::MambaVision`` of NVlabs/MambaVision, read from the official source
(``shared/specs/MODELS.md``), written anew:

- stem: conv3x3 s2 (no bias) -> BN(eps 1e-4) -> ReLU, twice (``patch_embed.conv_down.{0,1,3,4}``);
- four levels; the first ``conv_levels`` (2 in every released model) hold ConvBlocks: conv -> BN -> GELU(tanh) ->
  conv -> BN [-> * gamma] -> + x; the others hold Blocks, ``x += [gamma_1 *] mixer(LN(x)); x += [gamma_2 *]
  MLP(LN(x))``, whose mixer is a Mamba mixer in the first half of the level and attention in the last (for an odd
  depth d the attention blocks are d//2+1 .. d-1, for an even one d//2 .. d-1);
- a Block level runs on windows: zero-padded right and bottom to a multiple of the window, partitioned into
  (B nH nW, ws ws, C) with windows in (image, row, column) order and tokens row-major inside; padded tokens are not
  masked; un-windowed and cropped after the level's last block;
- between levels a conv3x3 s2 p1 without bias or norm (``levels.i.downsample.reduction.0``), after every level but
  the last;
- head: BatchNorm2d on the map, average pooling, ``head``.

Mixer: ``in_proj`` (no bias) C -> C, x and z halves; BOTH through a depth-wise conv1d k=3 with 'same' padding
(non-causal, no bias) and SiLU; only x is scanned (d_state 8, the dt bias added twice: ``dt_proj`` includes it and the
scan adds it again); ``out_proj(cat([y, z]))``, no gating. Attention: ``qkv`` with bias, scale head_dim^-1/2, no mask.

Hub files (``nvidia/MambaVision-*-1K``) hold the network under the wrapper's ``model.`` prefix; the ``.pth.tar``
files hold it under ``state_dict``. Shapes: B batch, C width of a level, E = C/2 scanned channels, N d_state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.layers import DropPath, Mlp, initial_dt_bias, self_attention
from ssmtrim.models.registry import (
    ArchConfig,
    DataConfig,
    ModelSpec,
    PretrainedCfg,
    register_family,
    register_model,
    registered_img_size,
)  # fmt: skip
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw
from ssmtrim.models.tokens import (
    BlockOutput,
    TokenState,
    Unmerge,
    add_update,
    gaps_from_positions,
    gather_tokens,
    merge_pair,
    owners,
    restore_tokens,
    unmerge_of,
)
from ssmtrim.ops import selective_scan

D_STATE, D_CONV = 8, 3


@dataclass(frozen=True)
class MambaVisionConfig(ArchConfig):
    family: ClassVar[str] = "mambavision"

    dim: int = 80
    in_dim: int = 32
    depths: tuple[int, ...] = (1, 3, 8, 4)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    window_size: tuple[int, ...] = (8, 8, 14, 7)
    mlp_ratio: float = 4.0
    layer_scale: bool = False  # gamma_1 / gamma_2 in the Blocks (B, L, L2: initialised at 1e-5)
    layer_scale_conv: bool = False  # gamma in the ConvBlocks
    conv_levels: int = 2  # levels of ConvBlocks before the Mamba-and-attention levels
    img_size: ImgSize = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.depths)
        if not (len(self.num_heads) == len(self.window_size) == n) or n == 0:
            raise ConfigError(f"MambaVision needs one head count and window per level: depths {self.depths}, heads "
                              f"{self.num_heads}, windows {self.window_size}.")
        if not 0 <= self.conv_levels <= n:
            raise ConfigError(f"MambaVision conv_levels {self.conv_levels} is outside 0..{n}.")
        for i in range(self.conv_levels, n):
            if self.level_dim(i) % self.num_heads[i]:
                raise ConfigError(f"MambaVision level {i} width {self.level_dim(i)} is not divisible by its "
                                  f"{self.num_heads[i]} heads.")
        h, w = size_hw(self.img_size)
        if h < 4 or w < 4:
            raise ConfigError(f"MambaVision needs images of at least 4x4 pixels, not {h}x{w}.")

    def width_text(self) -> str:
        return f"{self.dim}-{self.level_dim(len(self.depths) - 1)}"

    def level_dim(self, level: int) -> int:
        return self.dim * 2**level

    @property
    def depth(self) -> int:
        return sum(self.depths)

    def stage_of(self, block: int) -> tuple[int, int]:
        for level, depth in enumerate(self.depths):
            if block < depth:
                return level, block
            block -= depth
        raise IndexError(f"block {block} is beyond the {self.depth} blocks")

    def attention_blocks(self, level: int) -> range:
        d = self.depths[level]
        return range(d // 2 + 1, d) if d % 2 else range(d // 2, d)

    def grids(self) -> list[tuple[int, int]]:
        h, w = size_hw(self.img_size)
        out = []
        for _ in range(2):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        for _ in self.depths:
            out.append((h, w))
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return out


@dataclass(frozen=True)
class MambaVisionGeometry:
    """Where the kept tokens of reduced windows sit (one row per window), for the Mamba mixers; with mixers that read
    every position (an exact-mixer ``unmerge``), only the un-merge."""

    owners: Tensor | None = None  # B' T: the token standing for each position of the window
    positions: Tensor | None = None  # B' K: each token's position in the window (raster order)
    gaps: Tensor | None = None  # B' K positions skipped before each token along the scan (float); None: no decay
    gap_estimate: str = "bias"  # "bias" or "mean"
    log_sizes: Tensor | None = None  # B' K log of the positions each token stands for (merges); None: one each
    # the windows still hold every position (an ``unmerge`` state): the blocks merge into the tokens before the mixer
    # and the MLP and un-merge their updates; None: the windows hold the tokens
    unmerge: Unmerge | None = None


class MambaVisionMixer(nn.Module):
    """``forward(x: B L C) -> B L C``; :meth:`ssm_output` (B L E) is the scan's output y before the concatenation
    with z, which token scores read."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        e, n = dim // 2, D_STATE
        r = math.ceil(dim / 16)
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.in_proj = nn.Linear(dim, dim, bias=False)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.conv1d_x = nn.Conv1d(e, e, D_CONV, groups=e, bias=False)
        self.conv1d_z = nn.Conv1d(e, e, D_CONV, groups=e, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(initial_dt_bias(self.d_inner, dt_min, dt_max, dt_floor))

    def _conv(self, u: Tensor, conv: nn.Conv1d) -> Tensor:
        return F.silu(F.conv1d(u, conv.weight, conv.bias, padding="same", groups=self.d_inner))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B L C) -> u, delta (B E L) (delta includes dt_proj's bias once), B, C (B N L), z (B E L)."""
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        u, z = self._conv(u, self.conv1d_x), self._conv(z, self.conv1d_z)
        dt, b, c = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)
        return u, delta, b.transpose(1, 2), c.transpose(1, 2), z

    def project_reduced(self, x: Tensor, geometry: MambaVisionGeometry) -> tuple[Tensor, ...]:
        """:meth:`project` on the K tokens of a reduced window (B K C): in_proj on the tokens, each 'same' conv on
        the window restored from them (a merged position holds the token it was merged into, a pruned one its
        nearest token), read back at the tokens' positions."""
        u, z = self.in_proj(x).chunk(2, dim=-1)  # B K E each

        def conv(t: Tensor, layer: nn.Conv1d) -> Tensor:
            full = gather_tokens(t, geometry.owners).transpose(1, 2)  # B E T
            return gather_tokens(self._conv(full, layer).transpose(1, 2), geometry.positions).transpose(1, 2)

        u, z = conv(u, self.conv1d_x), conv(z, self.conv1d_z)
        dt, b, c = torch.split(self.x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u, self.dt_proj(dt).transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2), z

    def ssm_output(self, x: Tensor, deltas: list[Tensor] | None = None,
                   geometry: MambaVisionGeometry | None = None) -> tuple[Tensor, Tensor]:
        """x (B L C) -> (y (B L E), z (B L E)). With a ``deltas`` list, softplus(Δ) (B L E) is appended to it. With a
        ``geometry``, x holds the kept tokens of reduced windows: the convs read the restored window, and the scan
        decays across the positions it skips (exp(G A), G = skipped x the Δ estimate)."""
        u, delta, b, c, z = self.project(x) if geometry is None else self.project_reduced(x, geometry)
        bias = self.dt_proj.bias.float()
        if deltas is not None:  # the bias enters twice
            deltas.append(F.softplus(delta.float() + bias[:, None]).transpose(1, 2))
        gap = gap_scale = None
        if geometry is not None and geometry.gaps is not None:
            gap = geometry.gaps
            gap_scale = F.softplus(bias)[None, :].expand(x.shape[0], -1) if geometry.gap_estimate == "bias" else \
                F.softplus(delta.float() + bias[:, None]).mean(-1)
        y = selective_scan(u.contiguous(), delta.contiguous(), -torch.exp(self.A_log.float()), b.contiguous(),
                           c.contiguous(), self.D.float(), z=None, delta_bias=bias, delta_softplus=True, gap=gap,
                           gap_scale=gap_scale)
        return y.transpose(1, 2), z.transpose(1, 2)

    def forward(self, x: Tensor, deltas: list[Tensor] | None = None,
                geometry: MambaVisionGeometry | None = None) -> tuple[Tensor, Tensor]:
        y, z = self.ssm_output(x, deltas, geometry)
        return self.out_proj(torch.cat([y, z], dim=-1)), y


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, deltas: list[Tensor] | None = None, geometry=None) -> tuple[Tensor, None]:
        """With the geometry of merged tokens, proportional attention (ToMe): a key that stands for s positions
        weighs s times, as the s tokens it replaced would have together."""
        bias = None
        if geometry is not None and geometry.log_sizes is not None:
            bias = geometry.log_sizes[:, None, None, :].to(x.dtype)  # B' 1 1 K, added to the logits
        return self.proj(self_attention(x, self.qkv, self.num_heads, bias)), None


class ConvBlock(nn.Module):
    """On maps (B C H W): conv -> BN -> GELU(tanh) -> conv -> BN [-> * gamma] -> + x."""

    def __init__(self, dim: int, layer_scale: bool, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim)) if layer_scale else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)), approximate="tanh")))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class Block(nn.Module):
    """On windows (B' T C): ``x += [gamma_1 *] mixer(LN(x)); x += [gamma_2 *] MLP(LN(x))``; returns (x, the Mamba
    mixer's scan output y (B' T E), None for attention)."""

    def __init__(self, dim: int, heads: int, attention: bool, cfg: MambaVisionConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Attention(dim, heads) if attention else MambaVisionMixer(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.gamma_1 = nn.Parameter(1e-5 * torch.ones(dim)) if cfg.layer_scale else None
        self.gamma_2 = nn.Parameter(1e-5 * torch.ones(dim)) if cfg.layer_scale else None

    def forward(self, x: Tensor, deltas: list[Tensor] | None = None, geometry: MambaVisionGeometry | None = None,
                inputs: list[Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """``deltas``, ``inputs``: lists the mixer's softplus(Δ) and its normed input (on the tokens) are added to."""
        u = None if geometry is None else geometry.unmerge
        merge, _ = merge_pair(u)
        normed = self.norm1(x)
        if u is not None and u.exact_mixer:  # the mixer on every position, as dense; the MLP alone on the tokens
            spent = None if deltas is None else []
            out, y = self.mixer(normed, spent, None)
            if y is not None:  # a Mamba mixer's y and softplus(Δ), for a reduction step, are the tokens'
                y, spent = u.tokens_of(y, spent)
            if deltas is not None:
                deltas.extend(spent)
            if inputs is not None:
                inputs.append(merge(normed))
        else:
            normed = merge(normed)
            if inputs is not None:
                inputs.append(normed)
            out, y = self.mixer(normed, deltas, geometry)
        x = add_update(x, out, None if u is None or u.exact_mixer else u, self.gamma_1, self.drop_path)
        z = self.norm2(x)
        groups = None if u is None else u.for_mlp(z)
        merge, _ = merge_pair(groups)
        return add_update(x, self.mlp(merge(z)), groups, self.gamma_2, self.drop_path), y


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class Level(nn.Module):
    def __init__(self, cfg: MambaVisionConfig, level: int, rates: list[float]) -> None:
        super().__init__()
        dim = cfg.level_dim(level)
        self.conv = level < cfg.conv_levels
        self.window_size = cfg.window_size[level]
        if self.conv:
            self.blocks = nn.ModuleList(ConvBlock(dim, cfg.layer_scale_conv, r) for r in rates)
        else:
            attention = set(cfg.attention_blocks(level))
            self.blocks = nn.ModuleList(Block(dim, cfg.num_heads[level], j in attention, cfg, r)
                                        for j, r in enumerate(rates))
        self.downsample = Downsample(dim) if level < len(cfg.depths) - 1 else None

    def to_windows(self, x: Tensor) -> Tensor:
        """Map (B C H W) -> windows (B nH nW, ws ws, C), zero-padded right and bottom to whole windows."""
        ws = self.window_size
        bsz, c, h, w = x.shape
        x = F.pad(x, (0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = x.shape[-2:]
        x = x.view(bsz, c, hp // ws, ws, wp // ws, ws)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)

    def from_windows(self, windows: Tensor, hw: tuple[int, int]) -> Tensor:
        """Windows -> map (B C H W), cropped to the level's grid ``hw``."""
        ws = self.window_size
        h, w = hw
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        bsz = windows.shape[0] // ((hp // ws) * (wp // ws))
        c = windows.shape[-1]  # sizes given in full: a batch of no images has no -1 to infer
        x = windows.reshape(bsz, hp // ws, wp // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(bsz, c, hp, wp)[:, :, :h, :w]


class MambaVision(nn.Module):
    """MambaVision classifier: ``forward(x: B 3 H W) -> logits``; any input size (no position embedding).
    :meth:`forward_stages` gives each level's map (B C H W) before its downsample."""

    def __init__(self, config: MambaVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Module()
        self.patch_embed.conv_down = nn.Sequential(
            nn.Conv2d(config.in_chans, config.in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(config.in_dim, eps=1e-4),
            nn.ReLU(), nn.Conv2d(config.in_dim, config.dim, 3, 2, 1, bias=False), nn.BatchNorm2d(config.dim, eps=1e-4),
            nn.ReLU(),
        )  # fmt: skip
        total = config.depth
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.levels = nn.ModuleList(Level(config, i, rates[s : s + d])
                                    for i, (s, d) in enumerate(zip(starts, config.depths, strict=True)))
        features = config.level_dim(len(config.depths) - 1)
        self.norm = nn.BatchNorm2d(features)
        self.head = nn.Linear(features, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # the official init: trunc_normal(std .02) for linear weights, zero biases (Mamba's dt init kept)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def run_level(self, level: Level, x: Tensor) -> Tensor:
        """One level on a map (B C H W) -> the map after its last block (before the downsample)."""
        if level.conv:
            for block in level.blocks:
                x = block(x)
            return x
        hw = tuple(x.shape[-2:])
        windows = level.to_windows(x)
        for block in level.blocks:
            windows, _ = block(windows)
        return level.from_windows(windows, hw)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed.conv_down(x)
        maps = []
        for level in self.levels:
            x = self.run_level(level, x)
            maps.append(x)
            if level.downsample is not None:
                x = level.downsample(x)
        return maps

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(self.norm(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_stages(x)[-1])


# ---------------------------------------------------------------------------------------------------------------
# family


class MambaVisionFamily:
    name = "mambavision"
    config_cls = MambaVisionConfig

    def build(self, config: MambaVisionConfig) -> MambaVision:
        return MambaVision(config)

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hub wrapper (``model.`` prefix), DDP (``module.``) -> ours; everything else is the official layout."""
        out = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            if key.startswith("model.") and not key.startswith("model.model."):
                key = key.removeprefix("model.")
            out[key] = value
        return out

    def detect(self, state_dict: dict[str, Tensor]) -> bool:
        return any(re.search(r"(^|\.)levels\.\d+\.blocks\.\d+\.mixer\.(conv1d_x\.weight|qkv\.weight)$", k)
                   for k in state_dict) or any(k.endswith("patch_embed.conv_down.0.weight") for k in state_dict)

    def infer_config(self, state_dict: dict[str, Tensor], img_size: ImgSize | None = None) -> MambaVisionConfig:
        sd = self.convert_state_dict(state_dict)
        try:
            in_dim = sd["patch_embed.conv_down.0.weight"].shape[0]
            dim = sd["patch_embed.conv_down.3.weight"].shape[0]
            in_chans = sd["patch_embed.conv_down.0.weight"].shape[1]
            levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"levels\.(\d+)\.blocks\.", k)))
            depths = tuple(1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"levels\.{i}\.blocks\.(\d+)\.", k)))
                           for i in range(levels))
        except (KeyError, ValueError) as exc:
            missing = exc.args[0] if isinstance(exc, KeyError) else "levels.0.blocks.0.*"
            raise CheckpointError(f"this looks like a MambaVision checkpoint but has no tensor {missing!r}; it is "
                                  "incomplete or not in the NVlabs/MambaVision layout.") from None
        conv_levels = sum(1 for i in range(levels) if f"levels.{i}.blocks.0.conv1.weight" in sd)
        mlp = next((sd[k] for k in sorted(sd) if k.endswith(".mlp.fc1.weight")), None)
        head = sd.get("head.weight")
        registered = [s.arch for s in _SPECS if s.arch.dim == dim and s.arch.in_dim == in_dim
                      and s.arch.depths == depths and s.arch.conv_levels == conv_levels]
        # head counts and windows are not in the tensors: those of the released model of this shape, else the
        # released rule (heads 2, 4, 8, 16 below width 196, twice that from it; windows 8, 8, 14, 7)
        heads = registered[0].num_heads if registered else tuple((2 if dim < 196 else 4) * 2**i for i in range(levels))
        windows = registered[0].window_size if registered else (8, 8, 14, 7)[:levels] + (7,) * max(levels - 4, 0)
        config = MambaVisionConfig(
            dim=dim, in_dim=in_dim, depths=depths, num_heads=heads, window_size=windows,
            mlp_ratio=4.0 if mlp is None else mlp.shape[0] / mlp.shape[1],
            layer_scale=any(k.endswith(".gamma_1") for k in sd), layer_scale_conv=any(k.endswith(".gamma") for k in sd),
            conv_levels=conv_levels, img_size=normalize_img_size(img_size) if img_size is not None else 224,
            in_chans=in_chans, num_classes=0 if head is None else head.shape[0],
        )  # fmt: skip
        if img_size is None:
            config = dataclasses.replace(config, img_size=registered_img_size(config))  # not in the tensors
        return config

    # --- token layout: the streams are (map (B C H W),) in a conv level and (windows (B' T C),) in a Block level

    def depth(self, config: MambaVisionConfig) -> int:
        return config.depth

    def num_tokens(self, config: MambaVisionConfig) -> int:
        h, w = config.grids()[0]
        return h * w

    def has_class_token(self, config: MambaVisionConfig) -> bool:
        return False

    def block_name(self, config: MambaVisionConfig, index: int) -> str:
        level, j = config.stage_of(index)
        return f"levels.{level}.blocks.{j}"

    def _state(self, model: MambaVision, level: int, x: Tensor, keeps_positions: bool) -> TokenState:
        """The token state entering a level: a conv level's map (B C H W), one row per image; a window level's
        windows (B nH nW, ws ws, C), one row per window (its tokens reduced within it, on the ws x ws grid)."""
        lv = model.levels[level]
        if lv.conv:
            bsz, _, h, w = x.shape
            rows, length, grid = bsz, h * w, (h, w)
        else:
            rows, length, grid = x.shape[0], x.shape[1], (lv.window_size, lv.window_size)
        positions = torch.arange(length, device=x.device).expand(rows, -1)
        return TokenState(positions, None, length, grid, keeps_positions, track_owner=True)

    def _enter(self, model: MambaVision, level: int, x: Tensor) -> Tensor:
        lv = model.levels[level]
        return x if lv.conv else lv.to_windows(x)

    def embed(self, model: MambaVision, x: Tensor, keeps_positions: bool) -> tuple[tuple, TokenState]:
        # the levels' grids (where windows are un-windowed and cropped) are the config's: another input size would
        # be cut into the wrong number of windows per image
        h, w = size_hw(model.config.img_size)
        if tuple(x.shape[-2:]) != (h, w):
            raise ConfigError(
                f"this MambaVision model was loaded for {h}x{w} images but got {x.shape[-2]}x{x.shape[-1]}; load it "
                f"for that size (ssmtrim.load_model(..., img_size=({x.shape[-2]}, {x.shape[-1]})), --img-size on "
                "the command line) to reduce tokens or take feature maps at it.")
        x = self._enter(model, 0, model.patch_embed.conv_down(x))
        return (x,), self._state(model, 0, x, keeps_positions)

    def run_block(self, model: MambaVision, index: int, streams: tuple, state: TokenState, geometry,
                  needs: frozenset[str] = frozenset()) -> BlockOutput:
        level, j = model.config.stage_of(index)
        block = model.levels[level].blocks[j]
        if model.levels[level].conv:
            x = block(streams[0])
            return BlockOutput((x,), x.flatten(2).transpose(1, 2))
        deltas: list[Tensor] | None = [] if "delta" in needs else None
        inputs: list[Tensor] | None = [] if "mixer_input" in needs else None  # what the mixer reads
        windows, y = block(streams[0], deltas, geometry, inputs)
        return BlockOutput((windows,), windows if y is None else y, deltas[0] if deltas else None,
                           inputs[0] if inputs else None)

    def _level_map(self, model: MambaVision, level: int, streams: tuple, state: TokenState, hw) -> Tensor:
        """The level's output as a map (B C H W): windows restored (un-merged, pruned positions from their nearest
        token), un-windowed and cropped."""
        lv = model.levels[level]
        return streams[0] if lv.conv else lv.from_windows(restore_tokens(streams[0], state), hw)

    def after_block(self, model: MambaVision, index: int, streams: tuple,
                    state: TokenState) -> tuple[tuple, TokenState]:
        """After a level's last block: restore, un-window and crop, downsample, and window for the next level."""
        level, j = model.config.stage_of(index)
        lv = model.levels[level]
        if j != len(lv.blocks) - 1:
            return streams, state
        x = self._level_map(model, level, streams, state, model.config.grids()[level])
        if lv.downsample is None:  # the head reads the map, every position of it
            bsz, _, h, w = x.shape
            positions = torch.arange(h * w, device=x.device).expand(bsz, -1)
            return (x,), TokenState(positions, None, h * w, (h, w), state.keeps_positions)
        x = self._enter(model, level + 1, lv.downsample(x))
        return (x,), self._state(model, level + 1, x, state.keeps_positions)

    def geometry(self, model: MambaVision, state: TokenState, plan) -> MambaVisionGeometry | None:
        """Reduced windows: owners, positions and the positions the scan skips; None for full windows. Where the
        mixers read every position (an exact-mixer ``unmerge`` state), only the un-merge: nothing else is read."""
        u = unmerge_of(state)
        if u is not None and u.exact_mixer:
            return MambaVisionGeometry(unmerge=u)
        if not state.reduced:
            return None
        forward, _ = gaps_from_positions(state.positions, state.length)
        gaps = None if plan.gap == "zero" else forward.float()
        log_sizes = None if state.sizes is None else state.sizes.float().log()
        return MambaVisionGeometry(owners(state), state.positions, gaps, plan.gap, log_sizes, u)

    def stages(self, config: MambaVisionConfig) -> list[tuple[int, int]]:
        """(first block, tokens per row) per level: a conv level's whole map, a window level's window."""
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        out = []
        for level, (start, (h, w)) in enumerate(zip(starts, config.grids(), strict=True)):
            out.append((start, h * w if level < config.conv_levels else config.window_size[level] ** 2))
        return out

    def reducible_blocks(self, config: MambaVisionConfig) -> frozenset[int]:
        """The Mamba-mixer blocks of the window levels: conv blocks have no tokens and attention blocks no scan
        output for a score to read."""
        out = set()
        for level in range(config.conv_levels, len(config.depths)):
            first = sum(config.depths[:level])
            attention = set(config.attention_blocks(level))
            out |= {first + j for j in range(config.depths[level]) if j not in attention}
        return frozenset(out)

    def feature_map(self, model: MambaVision, index: int, streams: tuple, state: TokenState) -> Tensor:
        """After level ``index``'s last block: its map (B C H W), restored."""
        level, _ = model.config.stage_of(index)
        return self._level_map(model, level, streams, state, model.config.grids()[level])

    def resize_state_dict(self, config: MambaVisionConfig, state_dict: dict[str, Tensor], img_size: ImgSize):
        """No position embedding: any input size takes the same weights (a new config, the same tensors)."""
        return dataclasses.replace(config, img_size=normalize_img_size(img_size)), state_dict


    def features(self, model: MambaVision, streams: tuple, state: TokenState) -> Tensor:
        return model.norm(streams[0]).mean(dim=(2, 3))  # the last level's map, restored by after_block

    def classifier(self, model: MambaVision) -> nn.Module:
        return model.head

    def recommended_plan(self, config: MambaVisionConfig) -> dict:
        # after the Mamba-mixer blocks of the window levels (at most three, spread over them)
        blocks = sorted(self.reducible_blocks(config))
        picks = sorted({blocks[min(len(blocks) - 1, round(f * (len(blocks) - 1)))] for f in (0.0, 0.5, 1.0)})
        # unmerge, as VMamba's (README, "The hierarchical test beds": 1.6 points more than merge at -30% FLOPs on
        # 2,000 training images), for dense outputs too: on a segmentation proxy of training images its restored maps
        # agreed with the dense maps' classes on 75-88% of the pixels at -20 / -30%, merge's on 63-80%
        # (benchmarks/seg_select.py; benchmarks/results/seg_select_agreement_*.json)
        # with the mixers on every position and only the MLPs merged (1.7 points more at -30%;
        # benchmarks/results/screen_mixer_mv_train.json; a target that needs the mixers' FLOPs runs them merged too,
        # the MLPs on a tenth of the tokens, a plan the schedule search also tries: unmerge's reaching_further),
        # each block's MLP regrouping the positions by its own input (+0.2 / +0.6 at -20 / -30%, agreement with dense
        # +1.1 / +0.9; benchmarks/results/screen_mlp_groups_mv_train.json; VMamba's screens gained nothing, and kept
        # the groups of the step)
        options = {"mixer": "positions", "mlp_groups": "block"}
        # for dense outputs, a target past the mixers-whole plan's reach runs the MLPs on a fifth of the tokens, not a
        # tenth (the mixers merged a little harder): on 500 mosaics of 2,000 training images its restored level-1 /
        # level-2 maps agreed with the dense maps' classes on 79.2 / 82.5% of the pixels at -30% (a tenth: 77.4 /
        # 80.3; 0.15: 78.6 / 82.3; 0.3: 78.3 / 82.0) and 60.0 / 66.4% at -40% (a tenth: 60.3 / 65.3)
        # (benchmarks/seg_select.py; benchmarks/results/seg_select_reach_share_mv_*.json); classification keeps a
        # tenth (chosen on top-1, unmerge's REACH_SHARE). VMamba's maps measured no such gain (its stage-1 map agreed
        # best with a tenth: seg_select_reach_share_vm64_*.json), so its dense plan is its classification plan.
        return {"arrangement": "unmerge", "score": "clipped", "compensate": "head", "options": options,
                "layers": tuple(b + 1 for b in picks), "dense": {"options": {**options, "reach_share": 0.2}}}

    def provides(self, config) -> frozenset[str]:
        """What run_block hands over when asked (scores and strategies that need more are refused)."""
        return frozenset({"delta", "mixer_input", "unmerge", "exact_mixer"})

    def token_mlp(self, model: MambaVision, index: int) -> nn.Module | None:
        """The part of block ``index`` that acts on each token alone: its MLP (None for a conv level's block)."""
        level, j = model.config.stage_of(index)
        return None if model.levels[level].conv else model.levels[level].blocks[j].mlp

    def check_plan(self, plan) -> None:
        if plan.mode == "threshold":
            raise ConfigError("MambaVision reduces tokens window by window, by counts: use --mode count.")
        if plan.conv != "original":
            raise ConfigError("--conv sets where Vim's 1-D conv finds neighbours; MambaVision's convs read the window "
                              "restored from the kept tokens, so leave --conv out.")

    def mixer_dims(self, module: nn.Module) -> MixerDims | None:
        if not isinstance(module, MambaVisionMixer):
            return None
        # in_proj C -> C (x and z halves), two convs over E channels each, one scan of E channels, out_proj 2E -> C
        return MixerDims(module.in_proj.in_features, module.d_inner, module.d_state, module.dt_rank, 2 * D_CONV, 0,
                         1, False, gate=True, out_proj_inputs=2)  # fmt: skip


FAMILY = register_family(MambaVisionFamily())
_SPECS: list[ModelSpec] = []


def _register(size: str, dim: int, in_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], layer_scale: bool,
              crop_pct: float, top1: float, gflops: float, params: float, file: str) -> None:
    spec = ModelSpec(
        name=f"mambavision_{size.lower()}",
        arch=MambaVisionConfig(dim=dim, in_dim=in_dim, depths=depths, num_heads=heads, layer_scale=layer_scale),
        data=DataConfig(input_size=(3, 224, 224), crop_pct=crop_pct, interpolation="bicubic"),
        pretrained=(PretrainedCfg(f"nvidia/MambaVision-{size}-1K", "model.safetensors", top1),
                    PretrainedCfg(f"nvidia/MambaVision-{size}-1K", file, top1)),
        description=f"MambaVision-{size} ({top1}% ImageNet-1k, {params}M parameters, {gflops} GFLOPs published)",
    )  # fmt: skip
    _SPECS.append(register_model(spec))


_register("T", 80, 32, (1, 3, 8, 4), (2, 4, 8, 16), False, 1.0, 82.3, 4.4, 31.8, "mambavision_tiny_1k.pth.tar")
_register("T2", 80, 32, (1, 3, 11, 4), (2, 4, 8, 16), False, 0.98, 82.7, 5.1, 35.1, "mambavision_tiny2_1k.pth.tar")
_register("S", 96, 64, (3, 3, 7, 5), (2, 4, 8, 16), False, 0.93, 83.3, 7.5, 50.1, "mambavision_small_1k.pth.tar")
_register("B", 128, 64, (3, 3, 10, 5), (2, 4, 8, 16), True, 1.0, 84.2, 15.0, 97.7, "mambavision_base_1k.pth.tar")
_register("L", 196, 64, (3, 3, 10, 5), (4, 8, 16, 32), True, 1.0, 85.0, 34.9, 227.9, "mambavision_large_1k.pth.tar")
_register("L2", 196, 64, (3, 3, 12, 5), (4, 8, 16, 32), True, 1.0, 85.3, 37.5, 241.5, "mambavision_large2_1k.pth.tar")
_SPECS.append(register_model(ModelSpec(
    name="mambavision_test",
    arch=MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(2, 2, 2, 4), window_size=(4, 4, 3, 2),
                           img_size=48, num_classes=10),
    data=DataConfig(input_size=(3, 48, 48), crop_pct=1.0), test_only=True,
    description="tiny MambaVision for tests (windows with padding at level 2)",
)))  # fmt: skip
# the project's CIFAR-10 test bed, on images upsampled to 64x64: one conv level (16x16), then two Mamba-and-attention
# levels on 8x8 (64 tokens, one window) and 4x4 grids; the released models have two conv levels before them
_SPECS.append(register_model(ModelSpec(
    name="mambavision_cifar",
    arch=MambaVisionConfig(dim=32, in_dim=16, depths=(1, 4, 2), num_heads=(2, 2, 4), window_size=(8, 8, 4),
                           conv_levels=1, img_size=64, num_classes=10),
    data=DataConfig(input_size=(3, 64, 64), crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    description="small MambaVision for CIFAR-10 at 64x64 (upsampled): widths 32/64/128, depths 1/4/2 (one conv level, "
                "then Mamba + attention on 8x8 and 4x4 grids)",
)))  # fmt: skip
