"""PlainMamba at another input size: the position embedding interpolated to the new token grid.

The same resize the official forward applies on the fly to inputs of another size (mmcls ``resize_pos_embed``,
bicubic, ``align_corners=False``, to the new (rows, columns);
:meth:`ssmtrim.models.plainmamba.PlainMamba.pos_embed_for`), done once and stored, so that the model's own grid,
FLOPs and token count are those of the new size. There is no class token. The official backbone takes
``img_size=(H, W)`` (its detection and segmentation configs run non-square).

Shapes: L = h w tokens before, L' after, C embed dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any  # the family's config (its module imports this one)

import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw


def _check_side(patch: int, side: Any, what: str) -> None:
    if not isinstance(side, int) or isinstance(side, bool) or side < patch:
        raise ConfigError(f"{what} {side!r} is smaller than one {patch}x{patch} patch; give a size of at least "
                          f"{patch}.")
    if side % patch:
        lower = side - side % patch
        raise ConfigError(f"{what} {side} is not a multiple of the patch stride {patch}; give e.g. {lower} or "
                          f"{lower + patch}.")


def check_img_size(config: Any, img_size: ImgSize) -> None:
    """Refuse sizes that are not a whole number of patches (the stem would pad them, a different input);
    ``img_size`` is ``N`` or ``(H, W)``."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        _check_side(config.patch_size, img_size, "--img-size")
        return
    h, w = size_hw(img_size)
    _check_side(config.patch_size, h, "--img-size height")
    _check_side(config.patch_size, w, "--img-size width")


def interpolate_pos_embed(pos_embed: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """pos_embed (1 L C) on the grid ``src`` (h, w) -> (1 L' C) on ``dst`` (row-major)."""
    _, length, dim = pos_embed.shape
    if length != src[0] * src[1]:
        raise CheckpointError(f"PlainMamba pos_embed has {length} tokens, not the {src[0]}x{src[1]} grid of its "
                              "config.")
    if tuple(src) == tuple(dst):
        return pos_embed
    image = pos_embed.float().reshape(1, *src, dim).permute(0, 3, 1, 2)  # 1 C h w
    image = F.interpolate(image, size=tuple(dst), mode="bicubic", align_corners=False)
    return image.flatten(2).transpose(1, 2).to(pos_embed.dtype)


def resize_state_dict(
    config: Any, state_dict: dict[str, Tensor], img_size: ImgSize
) -> tuple[Any, dict[str, Tensor]]:
    """The config for ``img_size`` (``N`` or ``(H, W)``) and a copy of ``state_dict`` whose ``pos_embed`` fits its
    token grid; every other tensor is shared unchanged."""
    check_img_size(config, img_size)
    new_config = dataclasses.replace(config, img_size=normalize_img_size(img_size))
    if "pos_embed" not in state_dict:
        raise CheckpointError("the PlainMamba state dict has no pos_embed; it is not a complete PlainMamba checkpoint.")
    out = dict(state_dict)
    out["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], config.grid_size, new_config.grid_size)
    return new_config, out
