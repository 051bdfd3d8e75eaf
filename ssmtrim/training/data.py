"""Training data held in memory: images decoded once into uint8 arrays (cached on disk), normalised and augmented
on the fly by tensor ops (random crop with padding or random resized crop, horizontal flip)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.data import ImageSet, load_rgb, scan_folder
from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import DataConfig
from ssmtrim.training.config import Progress


@dataclass
class ArraySet:
    """Images held in memory: ``images`` uint8 (N H W 3), ``labels`` int64 (N)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    unreadable: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def _fit_square(img, size: int):
    """Resize the short side to ``size`` and center-crop a square (a no-op for images already size x size)."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def load_array_set(images: ImageSet, size: int, cache_dir: str | os.PathLike | None = None,
                   progress: Progress | None = None) -> ArraySet:
    """Decode a labelled image set into memory at ``size`` x ``size``; cached by file list and mtimes."""
    if not images.labelled:
        raise ConfigError(f"training needs labelled images (class sub-folders); {images.root!r} has none.")
    key = hashlib.sha256(json.dumps([size, images.paths, [os.path.getmtime(p) for p in images.paths]]).encode())
    cache = Path(cache_dir or Path.home() / ".cache" / "ssmtrim" / "arrays") / f"{key.hexdigest()[:20]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return ArraySet(z["images"], z["labels"], list(images.classes), int(z["unreadable"]))
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    keep = np.zeros(len(images), dtype=bool)
    for i, path in enumerate(images.paths):
        try:
            out[i] = np.asarray(_fit_square(load_rgb(path), size))
            keep[i] = True
        except (OSError, ValueError, SyntaxError):
            pass
        if progress is not None and (i % 500 == 0 or i == len(images) - 1):
            progress("decoding images", i + 1, len(images))
    labels = np.asarray(images.labels, dtype=np.int64)[keep]
    result = ArraySet(out[keep], labels, list(images.classes), int((~keep).sum()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=result.images, labels=result.labels, unreadable=result.unreadable)
    os.replace(tmp, cache)
    return result


def normalise(batch_u8: Tensor, data: DataConfig) -> Tensor:
    """uint8 (B H W 3) -> normalised float (B 3 H W)."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(data.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(x: Tensor, kind: str, generator: torch.Generator, rrc_scale: tuple[float, float] = (0.35, 1.0)) -> Tensor:
    """Random crop (pad an eighth of the side, reflect: 4 pixels at 32x32) or random resized crop (3/4..4/3 aspect),
    then a random horizontal flip."""
    b, _, h, w = x.shape
    if kind == "crop":
        pad = max(1, min(h, w) // 8)
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
        x = xp.gather(3, cols)
    elif kind == "rrc":
        area = torch.empty(b).uniform_(*rrc_scale, generator=generator)
        log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        ratio = log_ratio.exp()
        sw = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        sh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
        cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


def load_folder(data: str | os.PathLike, num_classes: int, size: int, progress: Progress | None = None,
                classes: list[str] | None = None) -> ArraySet:
    """The labelled images of ``data`` (class sub-folders) in memory, checked against the model's class count and,
    when given, the training data's ``classes``."""
    images = scan_folder(data)
    if images.layout != "class-folders":
        raise ConfigError(f"{str(data)!r} has no class sub-folders; training needs labelled images (DIR/<class>/...).")
    if len(images.classes) != num_classes:
        raise ConfigError(f"{str(data)!r} has {len(images.classes)} classes but the model predicts {num_classes}; "
                          "give a data folder with the model's classes.")
    if classes is not None and images.classes != classes:
        raise ConfigError(f"the class folders of {str(data)!r} differ from those of the training data.")
    return load_array_set(images, size, progress=progress)
