"""PlainMamba at another input size: the position embedding interpolated to the new token grid.

The same resize the official forward applies on the fly to inputs of another size (mmcls ``resize_pos_embed``,
bicubic, ``align_corners=False``; :meth:`ssmtrim.models.plainmamba.PlainMamba.pos_embed_for`), done once and stored,
so that the model's own grid, FLOPs and token count are those of the new size. There is no class token.

Shapes: L = H W tokens before, L' after, C embed dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any  # the family's config (its module imports this one)

import torch.nn.functional as F
from torch import Tensor

from ssmtrim.errors import CheckpointError, ConfigError


def check_img_size(config: Any, img_size: int) -> None:
    """Refuse sizes that are not a whole number of patches (the stem would pad them, a different input)."""
    patch = config.patch_size
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < patch:
        raise ConfigError(f"image size {img_size!r} is smaller than one {patch}x{patch} patch; give a size of at "
                          f"least {patch}.")
    if img_size % patch:
        lower = img_size - img_size % patch
        raise ConfigError(f"image size {img_size} is not a multiple of the patch stride {patch}; give e.g. {lower} "
                          f"or {lower + patch}.")


def interpolate_pos_embed(pos_embed: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """pos_embed (1 L C) on the grid ``src`` -> (1 L' C) on ``dst`` (row-major)."""
    _, length, dim = pos_embed.shape
    if length != src[0] * src[1]:
        raise CheckpointError(f"PlainMamba pos_embed has {length} tokens, not the {src[0]}x{src[1]} grid of its "
                              "config.")
    if tuple(src) == tuple(dst):
        return pos_embed
    image = pos_embed.float().reshape(1, *src, dim).permute(0, 3, 1, 2)  # 1 C H W
    image = F.interpolate(image, size=tuple(dst), mode="bicubic", align_corners=False)
    return image.flatten(2).transpose(1, 2).to(pos_embed.dtype)


def resize_state_dict(
    config: Any, state_dict: dict[str, Tensor], img_size: int
) -> tuple[Any, dict[str, Tensor]]:
    """The config for ``img_size`` and a copy of ``state_dict`` whose ``pos_embed`` fits its token grid; every
    other tensor is shared unchanged."""
    check_img_size(config, img_size)
    new_config = dataclasses.replace(config, img_size=img_size)
    if "pos_embed" not in state_dict:
        raise CheckpointError("the PlainMamba state dict has no pos_embed; it is not a complete PlainMamba checkpoint.")
    out = dict(state_dict)
    out["pos_embed"] = interpolate_pos_embed(state_dict["pos_embed"], config.grid_size, new_config.grid_size)
    return new_config, out
