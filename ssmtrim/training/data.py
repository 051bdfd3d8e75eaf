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

from ssmtrim.data import ImageSet, check_eval_data, load_rgb, map_to_classes, resize_crop, scan_folder
from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import DataConfig
from ssmtrim.notices import notice
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


def _fit_square(img, size: int | tuple[int, int]):
    """Resize the image to cover ``size`` (N, or (H, W) for a non-square model) keeping its aspect ratio, and
    center-crop it (a no-op for images already that size)."""
    from PIL import Image

    out_h, out_w = (size, size) if isinstance(size, int) else size
    w, h = img.size
    if (w, h) != (out_w, out_h):
        scale = max(out_w / w, out_h / h)
        img = img.resize((max(out_w, round(w * scale)), max(out_h, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - out_w) // 2, (h - out_h) // 2
        img = img.crop((left, top, left + out_w, top + out_h))
    return img


def load_array_set(images: ImageSet, size: int, cache_dir: str | os.PathLike | None = None,
                   progress: Progress | None = None, eval_data: DataConfig | None = None) -> ArraySet:
    """Decode a labelled image set into memory at ``size`` x ``size``; cached by file list, mtimes and labels.
    ``eval_data``: decode with the eval transform's geometry (:func:`ssmtrim.data.resize_crop`: short side to
    size / crop_pct, center crop, the config's interpolation), so that evaluation during training sees what
    ``ssmtrim eval`` sees; without, the short side is resized to ``size`` (the training images)."""
    if not images.labelled:
        raise ConfigError(f"training needs labelled images (class sub-folders); {images.root!r} has none.")
    fit = _fit_square if eval_data is None else (lambda img, _: resize_crop(img, eval_data))
    geometry = None if eval_data is None else [eval_data.crop_pct, eval_data.interpolation, list(eval_data.input_size)]
    key = hashlib.sha256(json.dumps([size, images.paths, [os.path.getmtime(p) for p in images.paths], images.labels,
                                     geometry]).encode())
    cache = Path(cache_dir or Path.home() / ".cache" / "ssmtrim" / "arrays") / f"{key.hexdigest()[:20]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return ArraySet(z["images"], z["labels"], list(images.classes), int(z["unreadable"]))
    hw = (size, size) if isinstance(size, int) else size  # N, or (H, W) for a non-square model
    height, width = hw if eval_data is None else eval_data.input_size[-2:]
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    keep = np.zeros(len(images), dtype=bool)
    for i, path in enumerate(images.paths):
        try:
            out[i] = np.asarray(fit(load_rgb(path), size))
            keep[i] = True
        except (OSError, ValueError, SyntaxError):
            pass
        if progress is not None and (i % 500 == 0 or i == len(images) - 1):
            progress("decoding images", i + 1, len(images))
    labels = np.asarray(images.labels, dtype=np.int64)[keep]
    result = ArraySet(out[keep], labels, list(images.classes), int((~keep).sum()))
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=result.images, labels=result.labels, unreadable=result.unreadable)
        os.replace(tmp, cache)
    except OSError as exc:  # the cache only saves time: a full or read-only disk is said, not fatal
        tmp.unlink(missing_ok=True)
        notice("array-cache", f"could not cache the decoded images in {str(cache.parent)!r} "
               f"({exc.strerror or exc}); they will be decoded again next time.")
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


def check_labelled_eval_data(eval_data: str | os.PathLike | None, classes: list[str] | None = None,
                             skip_unknown: bool = False) -> None:
    """A bad ``--eval-data`` (missing, no class sub-folders, classes not the model's, nothing readable) refused in one
    sentence naming it, before the training images are decoded."""
    if eval_data is None:
        return

    def label(images: ImageSet) -> ImageSet:
        if images.layout != "class-folders":
            raise ConfigError("it has no class sub-folders (DIR/<class>/...)")
        return map_to_classes(images, classes, skip_unknown) if classes else images

    check_eval_data(eval_data, label)


def load_folder(data: str | os.PathLike, num_classes: int, size: int, progress: Progress | None = None,
                classes: list[str] | None = None, skip_unknown: bool = False,
                eval_data: DataConfig | None = None) -> ArraySet:
    """The labelled images of ``data`` (class sub-folders) in memory. With ``classes`` (the model's recorded class
    names, or the training data's for an evaluation set) the folders are matched to them by name: one that is not
    among them is an error, or left out with ``skip_unknown``; without, their count must be the model's.
    ``eval_data``: decoded as ``ssmtrim eval`` reads images (see :func:`load_array_set`)."""
    images = scan_folder(data)
    if images.layout != "class-folders":
        raise ConfigError(f"{str(data)!r} has no class sub-folders; training needs labelled images (DIR/<class>/...).")
    if classes is not None:
        images = map_to_classes(images, classes, skip_unknown)
    elif len(images.classes) != num_classes:
        raise ConfigError(f"{str(data)!r} has {len(images.classes)} classes but the model predicts {num_classes}; "
                          "give a data folder with the model's classes.")
    return load_array_set(images, size, progress=progress, eval_data=eval_data)
