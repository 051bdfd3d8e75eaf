"""Mamba® (Vim with registers): Wang et al., "Mamba®: Vision Mamba ALSO Needs Registers", CVPR 2025,
arXiv 2405.14858; checkpoints ``Wangf3014/Mamba-Reg`` on the Hub.

A Vim whose class token is replaced by P registers spread evenly through the patch sequence: the M row-major patches
are cut into P + 1 groups of M // (P + 1) (the last group takes the remainder) and register j follows group j. The
patches carry ``pos_embed`` (1 M D), the registers ``cls_token`` + ``pos_embed_cls`` (1 P D). The blocks are Vim's
(RMSNorm, residual in fp32, the bidirectional "v2" mixer with both directions averaged). The head reads the P
registers after ``norm_f``: concatenated (B P·D), or, with ``cls_reduce`` r > 1, each projected by ``neck``
(D -> D / r, no bias), concatenated and normed by ``norm_neck`` (RMSNorm over P·D / r). Official eval preprocessing:
bicubic resize to the input size (crop ratio 1.0), ImageNet mean and std.

The registers are protected tokens for reduction, as Vim's class token is; every Vim option applies. State-dict
keys equal the official ones.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.registry import DataConfig, ModelSpec, PretrainedCfg, register_family, register_model
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw, size_text
from ssmtrim.models.tokens import TokenState, gather_tokens
from ssmtrim.models.vim import (
    Block,
    PatchEmbed,
    RMSNorm,
    VimConfig,
    VimFamily,
    has_bimamba_mixers,
    init_weights,
    stored_size,
)


@dataclass(frozen=True)
class MambaRConfig(VimConfig):
    family: ClassVar[str] = "mambar"

    num_registers: int = 12  # official num_cls_tokens
    cls_reduce: int = 1  # r: each register projected to D / r before the head (1: no neck)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_registers < 1:
            raise ConfigError(f"Mamba® config field num_registers must be >= 1, got {self.num_registers}.")
        r = self.cls_reduce
        if r < 1 or self.num_registers % r or self.embed_dim % r:
            raise ConfigError(f"Mamba® config field cls_reduce ({r}) must divide num_registers "
                              f"({self.num_registers}) and embed_dim ({self.embed_dim}).")

    @property
    def cls_position(self) -> int:
        raise AttributeError("a Mamba® has registers, not one class token; see register_positions")

    @property
    def protected_positions(self) -> tuple[int, ...]:
        return self.register_positions

    @property
    def register_positions(self) -> tuple[int, ...]:
        return register_layout(self.num_patches, self.num_registers)[1]

    @property
    def head_features(self) -> int:
        return self.num_registers * self.embed_dim // self.cls_reduce


def register_layout(patches: int, registers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(order, register positions): ``order`` indexes the patches followed by the registers (M + P rows) into the
    sequence the blocks read; the registers' places in that sequence."""
    group = patches // (registers + 1)
    order: list[int] = []
    positions: list[int] = []
    for j in range(registers):
        order.extend(range(j * group, (j + 1) * group))
        positions.append(len(order))
        order.append(patches + j)
    order.extend(range(registers * group, patches))
    return tuple(order), tuple(positions)


class MambaR(nn.Module):
    """Mamba® classifier: ``forward(x: B 3 H W) -> logits (B num_classes)``."""

    def __init__(self, config: MambaRConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.embed_dim, config.num_registers
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, p, d))
        self.pos_embed_cls = nn.Parameter(torch.zeros(1, p, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, d))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm_f = RMSNorm(d, config.norm_eps)
        if config.cls_reduce > 1:
            self.neck = nn.Linear(d, d // config.cls_reduce, bias=False)
            self.norm_neck = RMSNorm(config.head_features, config.norm_eps)
        self.head = nn.Linear(config.head_features, config.num_classes) if config.num_classes > 0 else nn.Identity()
        order, positions = register_layout(config.num_patches, p)
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.register_buffer("register_positions", torch.tensor(positions), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self, (self.pos_embed, self.cls_token, self.pos_embed_cls))

    def embed(self, x: Tensor) -> Tensor:
        """Images (B 3 H W) -> patches and registers with positions added, interleaved (B M+P D)."""
        x = self.patch_embed(x) + self.pos_embed
        registers = (self.cls_token + self.pos_embed_cls).expand(x.shape[0], -1, -1)
        return torch.cat([x, registers], 1)[:, self.order]

    def head_input(self, registers: Tensor) -> Tensor:
        """The final-normed registers (B P D) -> what the head reads (B P·D / r)."""
        if self.config.cls_reduce > 1:
            return self.norm_neck(self.neck(registers).flatten(1))
        return registers.flatten(1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> final-normed tokens (B M+P D)."""
        hidden, residual = self.embed(x), None
        for block in self.layers:
            hidden, residual, _ = block(hidden, residual)
        return self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.head_input(self.forward_features(x)[:, self.register_positions]))


class MambaRFamily(VimFamily):
    """Vim's blocks, reduction and FLOP terms; registers instead of one class token."""

    name = "mambar"
    config_cls = MambaRConfig

    def build(self, config: MambaRConfig) -> MambaR:
        return MambaR(config)

    def detect(self, state_dict: dict[str, Tensor]) -> bool:
        return has_bimamba_mixers(state_dict) and any(re.search(r"(^|\.)pos_embed_cls$", k) for k in state_dict)

    def infer_config(self, state_dict: dict[str, Tensor], img_size: ImgSize | None = None) -> MambaRConfig:
        sd = self.convert_state_dict(state_dict)
        try:
            patch_w, pos, regs = sd["patch_embed.proj.weight"], sd["pos_embed"], sd["cls_token"]
            in_proj, a_log = sd["layers.0.mixer.in_proj.weight"], sd["layers.0.mixer.A_log"]
            conv, dt_w = sd["layers.0.mixer.conv1d.weight"], sd["layers.0.mixer.dt_proj.weight"]
        except KeyError as exc:
            raise CheckpointError(
                f"this looks like a Mamba® checkpoint but has no tensor {exc.args[0]!r}; it is incomplete or not in "
                "the Wangf3014/Mamba-Reg layout, so pass the architecture explicitly with --arch."
            ) from None
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        embed_dim, patch = patch_w.shape[0], patch_w.shape[-1]
        size, stride = stored_size(pos.shape[1], patch, img_size)
        neck = sd.get("neck.weight")  # D/r D
        head = sd.get("head.weight")
        return MambaRConfig(
            embed_dim=embed_dim, depth=depth, img_size=size, patch_size=patch, stride=stride,
            in_chans=patch_w.shape[1], num_classes=0 if head is None else head.shape[0], d_state=a_log.shape[1],
            d_conv=conv.shape[-1], expand=in_proj.shape[0] // 2 // embed_dim, dt_rank=dt_w.shape[1],
            num_registers=regs.shape[1], cls_reduce=1 if neck is None else embed_dim // neck.shape[0],
        )  # fmt: skip

    def recommended_plan(self, config: MambaRConfig) -> dict:
        """Vim's plan without its protection of the class token's neighbours: that was measured with one class token,
        and around Mamba®'s registers, spread through the sequence, it would keep a large share of the tokens."""
        plan = super().recommended_plan(config)
        return {**plan, "options": {k: v for k, v in plan["options"].items() if k != "protect_around"}}

    def data_config(self, config: MambaRConfig) -> DataConfig:
        """The release's eval preprocessing (no centre crop) at the config's input size."""
        return dataclasses.replace(_DATA, input_size=(config.in_chans, *size_hw(config.img_size)))

    def num_tokens(self, config: MambaRConfig) -> int:
        return config.num_patches + config.num_registers

    def num_protected(self, config: MambaRConfig) -> int:
        return config.num_registers

    def embed(self, model: MambaR, x: Tensor, keeps_positions: bool) -> tuple[tuple, TokenState]:
        hidden = model.embed(x)
        bsz, length, _ = hidden.shape
        state = TokenState(
            positions=torch.arange(length, device=x.device).expand(bsz, -1),
            cls_index=model.register_positions.to(x.device).expand(bsz, -1),
            length=length, grid=model.config.grid_size, keeps_positions=keeps_positions,
        )  # fmt: skip
        return (hidden, None), state

    def features(self, model: MambaR, streams: tuple, state: TokenState) -> Tensor:
        hidden, residual = streams
        tokens = model.norm_f((residual + hidden.float()).to(model.norm_f.weight.dtype))
        return model.head_input(gather_tokens(tokens, state.in_streams(state.protected_index())))

    def resize_state_dict(self, config, state_dict: dict[str, Tensor], img_size: ImgSize):
        """(config at ``img_size``, state dict with the patch position embedding resized bicubically to the new
        grid (the registers' own embedding does not depend on the size))."""
        from ssmtrim.models.vim_resize import check_img_size

        check_img_size(config, img_size)
        new_config = dataclasses.replace(config, img_size=normalize_img_size(img_size))
        pos = state_dict.get("pos_embed")
        if pos is None or pos.shape[1] != config.num_patches:
            raise CheckpointError(f"the Mamba® pos_embed does not hold the {config.num_patches} patch positions of a "
                                  f"{size_text(config.img_size)} input; the checkpoint does not match its config.")
        (h, w), (h2, w2), dim = config.grid_size, new_config.grid_size, pos.shape[-1]
        grid = pos.float().reshape(1, h, w, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h2, w2), mode="bicubic", align_corners=False)
        return new_config, {**state_dict, "pos_embed": grid.permute(0, 2, 3, 1).reshape(1, h2 * w2, dim).to(pos.dtype)}


FAMILY = register_family(MambaRFamily())

# official eval: DeiT's transform with --eval-crop-ratio 1.0 (bicubic resize to 224, no crop), ImageNet statistics
_DATA = DataConfig(input_size=(3, 224, 224), crop_pct=1.0, interpolation="bicubic")
_HUB = "Wangf3014/Mamba-Reg"


def _register(size: str, dim: int, depth: int, registers: int, reduce: int, top1: float | None) -> None:
    name = f"mambar_{size}_patch16_224"
    files = (PretrainedCfg(_HUB, f"{name}.pth", top1),) if top1 is not None else ()
    register_model(ModelSpec(
        name=f"mambar_{size}", arch=MambaRConfig(embed_dim=dim, depth=depth, num_registers=registers,
                                                 cls_reduce=reduce), data=_DATA, pretrained=files,
        aliases=(name, f"mamba-r-{size}"),
        description=f"Mamba®-{size[0].upper()}: D={dim}, {depth} layers, {registers} registers"
                    + (f" (neck /{reduce})" if reduce > 1 else "") + ", 196 patches, ImageNet-1k"
                    + ("" if top1 is not None else " (no released weights)"),
    ))  # fmt: skip


_register("tiny", 192, 24, 12, 1, None)  # the official code lists it; its weights are not released
_register("small", 384, 24, 12, 2, 81.4)
_register("base", 768, 24, 12, 4, 83.0)
_register("large", 1024, 48, 16, 8, 83.6)
register_model(ModelSpec(
    name="mambar_test",
    arch=MambaRConfig(embed_dim=32, depth=4, img_size=32, patch_size=8, stride=8, num_classes=10, num_registers=4,
                      cls_reduce=2),
    data=DataConfig(input_size=(3, 32, 32), crop_pct=1.0), test_only=True, description="tiny Mamba® for tests",
))  # fmt: skip
