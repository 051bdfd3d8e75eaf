"""Input sizes: ``N`` (square) or ``(H, W)``, as the official Vim and PlainMamba take ``img_size`` (``to_2tuple``).

Configs store a square size as the int ``N`` and any other as the pair ``(H, W)`` (a list ``[H, W]`` in
``config.json``), so that a square model compares equal to its registered architecture whichever way it was given.
"""

from __future__ import annotations

from typing import Any

from ssmtrim.errors import ConfigError

ImgSize = int | tuple[int, int]  # N (square) or (H, W)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_img_size(value: Any) -> ImgSize:
    """``N``, ``(H, W)`` or ``[H, W]`` -> ``N`` when square, else ``(H, W)``; anything else raises
    :class:`~ssmtrim.errors.ConfigError` (whether the sides fit the patches is the family's check)."""
    if _is_int(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        h, w = value
        return h if h == w else (h, w)
    raise ConfigError(f"image size {value!r} is neither a whole number of pixels N nor a pair (H, W); give e.g. 224 "
                      "or (224, 320).")


def size_hw(img_size: ImgSize) -> tuple[int, int]:
    """(H, W) of an input size given as ``N`` or ``(H, W)``."""
    size = normalize_img_size(img_size)
    return (size, size) if isinstance(size, int) else size


def size_text(img_size: ImgSize) -> str:
    """``HxW``, as messages and tables write a size."""
    return "x".join(map(str, size_hw(img_size)))
