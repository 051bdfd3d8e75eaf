"""Vim at another input size: the position embedding interpolated to the new token grid.

The official fine-tunes at new resolutions (hustvl/Vim ``vim/main.py``, after DeiT's ``main.py``) resize the
position embedding bicubically with ``align_corners=False`` to the new (rows, columns) of patches. DeiT takes the
extra (class) tokens from the front of the sequence; Vim's class token sits in the middle (index M // 2 of M + 1),
so here it is taken out from there, the M patch positions are resized as the h x w grid they were stored for
(row-major, like the tokens) to h' x w', and the class slot goes back at the new middle M' // 2 (M' = h' w', the
index the official forward inserts it at for any grid, square or not).

Shapes: M patches before, M' after, D embed dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any  # the family's config (its module imports this one)

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw


def _check_side(config: Any, side: Any, what: str) -> None:
    patch, stride = config.patch_size, config.stride
    if not isinstance(side, int) or isinstance(side, bool) or side < patch:
        raise ConfigError(f"{what} {side!r} is smaller than one {patch}x{patch} patch; give a size of at least "
                          f"{patch}.")
    if (side - patch) % stride:
        lower = side - (side - patch) % stride
        raise ConfigError(f"{what} {side} does not tile into {patch}-pixel patches at stride {stride}; give "
                          f"{patch} plus a multiple of {stride}, e.g. {lower} or {lower + stride}.")


def check_img_size(config: Any, img_size: ImgSize) -> None:
    """Refuse a size the patch grid does not tile exactly (the conv would silently drop border pixels); ``img_size``
    is ``N`` or ``(H, W)``."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        _check_side(config, img_size, "--img-size")
        return
    h, w = size_hw(img_size)
    _check_side(config, h, "--img-size height")
    _check_side(config, w, "--img-size width")


def interpolate_pos_embed(pos_embed: Tensor, cls_index: int, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """pos_embed (1 M+1 D) on the patch grid ``src`` (h, w), class slot at ``cls_index`` -> (1 M'+1 D) on ``dst``
    (h', w'), class slot at M' // 2."""
    _, length, dim = pos_embed.shape
    if length - 1 != src[0] * src[1]:
        raise CheckpointError(f"Vim pos_embed has {length} tokens, not the {src[0]}x{src[1]} patch grid of its config "
                              "plus a class token; the checkpoint does not match its config.")
    cls = pos_embed[:, cls_index : cls_index + 1]
    patches = torch.cat([pos_embed[:, :cls_index], pos_embed[:, cls_index + 1 :]], dim=1)  # 1 M D
    if tuple(dst) != tuple(src):
        image = patches.float().reshape(1, *src, dim).permute(0, 3, 1, 2)  # 1 D h w, row-major like the tokens
        image = F.interpolate(image, size=tuple(dst), mode="bicubic", align_corners=False)
        patches = image.permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], dim).to(pos_embed.dtype)
    middle = dst[0] * dst[1] // 2
    return torch.cat([patches[:, :middle], cls, patches[:, middle:]], dim=1)


def resize_state_dict(
    config: Any, state_dict: dict[str, Tensor], img_size: ImgSize
) -> tuple[Any, dict[str, Tensor]]:
    """The config for ``img_size`` (``N`` or ``(H, W)``) and a copy of ``state_dict`` whose ``pos_embed`` fits its
    token grid; every other tensor is shared unchanged (nothing else in a Vim depends on the input size)."""
    check_img_size(config, img_size)
    new_config = dataclasses.replace(config, img_size=normalize_img_size(img_size))
    if "pos_embed" not in state_dict:
        raise CheckpointError("the Vim state dict has no pos_embed; it is not a complete Vim checkpoint.")
    out = dict(state_dict)
    out["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], config.cls_position, config.grid_size,
                                             new_config.grid_size)
    return new_config, out
