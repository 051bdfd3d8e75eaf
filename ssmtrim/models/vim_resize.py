"""Vim at another input size: the position embedding interpolated to the new token grid.

The official fine-tunes at new resolutions (hustvl/Vim ``vim/main.py``, after DeiT's ``main.py``) resize the
position embedding bicubically with ``align_corners=False``. DeiT takes the extra (class) tokens from the front of
the sequence; Vim's class token sits in the middle (index M // 2 of M + 1), so here it is taken out from there, the
M patch positions are resized as a sqrt(M) x sqrt(M) grid, and the class slot goes back at the new middle M' // 2.

Shapes: M patches before, M' after, D embed dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any  # the family's config (its module imports this one)

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import CheckpointError, ConfigError


def check_img_size(config: Any, img_size: int) -> None:
    """Refuse a size the patch grid does not tile exactly (the conv would silently drop border pixels)."""
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < config.patch_size:
        raise ConfigError(f"image size {img_size!r} is smaller than one {config.patch_size}x{config.patch_size} "
                          f"patch; give a size of at least {config.patch_size}.")
    patch, stride = config.patch_size, config.stride
    if (img_size - patch) % stride:
        lower = img_size - (img_size - patch) % stride
        raise ConfigError(f"image size {img_size} does not tile into {patch}-pixel patches at stride {stride}; give "
                          f"{patch} plus a multiple of {stride}, e.g. {lower} or {lower + stride}.")


def interpolate_pos_embed(pos_embed: Tensor, cls_index: int, new_grid: int) -> Tensor:
    """pos_embed (1 M+1 D), class slot at ``cls_index`` -> (1 M'+1 D) with M' = new_grid², class slot at M' // 2."""
    _, length, dim = pos_embed.shape
    grid = round((length - 1) ** 0.5)
    if grid * grid != length - 1:
        raise CheckpointError(f"Vim pos_embed has {length} tokens, not a square grid plus a class token.")
    cls = pos_embed[:, cls_index : cls_index + 1]
    patches = torch.cat([pos_embed[:, :cls_index], pos_embed[:, cls_index + 1 :]], dim=1)  # 1 M D
    if new_grid != grid:
        image = patches.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # 1 D g g, row-major like the tokens
        image = F.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
        patches = image.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    middle = new_grid * new_grid // 2
    return torch.cat([patches[:, :middle], cls, patches[:, middle:]], dim=1)


def resize_state_dict(
    config: Any, state_dict: dict[str, Tensor], img_size: int
) -> tuple[Any, dict[str, Tensor]]:
    """The config for ``img_size`` and a copy of ``state_dict`` whose ``pos_embed`` fits its token grid; every
    other tensor is shared unchanged (nothing else in a Vim depends on the input size)."""
    check_img_size(config, img_size)
    new_config = dataclasses.replace(config, img_size=img_size)
    if "pos_embed" not in state_dict:
        raise CheckpointError("the Vim state dict has no pos_embed; it is not a complete Vim checkpoint.")
    out = dict(state_dict)
    out["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], config.cls_position, new_config.grid_size)
    return new_config, out
