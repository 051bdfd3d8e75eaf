"""Image folders and the eval transform, with Pillow and NumPy only (there is no CPU torchvision).

Folder layouts:
- class sub-folders (``DIR/<class>/<image>``, ImageFolder order: sorted class names);
- a flat folder of ImageNet files named by WordNet id (``n01440764_xxx.JPEG``): the label is the rank of the wnid
  among the sorted wnids, which needs all 1000 present or ``num_classes`` wnids known (see :func:`scan_folder`);
- a flat folder of unlabelled images (label -1), enough for calibration.

The eval transform follows the model's data config (timm's ``transforms_imagenet_eval``): resize the short side to
``size / crop_pct`` (bicubic by default), center-crop ``size``, scale to [0, 1], normalise. Unreadable images are
skipped and counted, never fatal.
"""

from __future__ import annotations

import math
import os
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from ssmtrim.errors import ConfigError, LoaderFailed, SourceNotFoundError, SsmtrimError
from ssmtrim.models.registry import DataConfig
from ssmtrim.notices import notice

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
_WNID = re.compile(r"^(n\d{8})[_.-]")
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an unreadable image, counted as such


@dataclass
class ImageSet:
    """A list of images with optional labels."""

    root: str
    paths: list[str]
    labels: list[int]  # -1 when unlabelled
    classes: list[str] = field(default_factory=list)
    layout: str = "unlabelled"  # "class-folders", "wnid-files" or "unlabelled"

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and all(v >= 0 for v in self.labels)

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """A seeded random subset of ``n`` images (all of them if ``n`` is None or larger)."""
        if n is None or n >= len(self.paths):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self.paths)), n))
        return ImageSet(self.root, [self.paths[i] for i in idx], [self.labels[i] for i in idx], self.classes,
                        self.layout)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def scan_folder(root: str | os.PathLike) -> ImageSet:
    """Find the images under ``root`` and their labels (see the module docstring for the layouts)."""
    root_p = Path(root).expanduser()
    if not root_p.exists():
        raise SourceNotFoundError(f"data folder {str(root)!r} does not exist; give a folder of images with --data.")
    if not root_p.is_dir():
        raise ConfigError(f"--data {str(root)!r} is a file; give a folder of images (class sub-folders or flat).")
    subdirs = sorted(d for d in root_p.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in subdirs if any(_is_image(p) for p in d.iterdir())]
    if class_dirs:
        paths, labels = [], []
        for label, d in enumerate(class_dirs):
            for p in sorted(d.iterdir()):
                if _is_image(p):
                    paths.append(str(p))
                    labels.append(label)
        _note_skipped_folders(root_p, subdirs, class_dirs)
        return ImageSet(str(root_p), paths, labels, [d.name for d in class_dirs], "class-folders")
    files = sorted(p for p in root_p.iterdir() if _is_image(p))
    if not files:
        raise ConfigError(f"data folder {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); put "
                          "images in it or in class sub-folders.")
    wnids = [m.group(1) if (m := _WNID.match(p.name)) else None for p in files]
    if all(wnids):
        classes = sorted(set(wnids))
        return ImageSet(str(root_p), [str(p) for p in files], [classes.index(w) for w in wnids], classes, "wnid-files")
    return ImageSet(str(root_p), [str(p) for p in files], [-1] * len(files), [], "unlabelled")


def _note_skipped_folders(root: Path, subdirs: list[Path], class_dirs: list[Path]) -> None:
    """Say once what a class-folder layout does not read: folders inside class folders (only the images directly in
    a class folder count), and folders beside the classes that hold no images (they are not classes)."""
    nested = sorted(e.path for d in class_dirs for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    if nested:
        shown = ", ".join(repr(os.path.relpath(n, root)) for n in nested[:3])
        notice(f"nested:{root}", f"{len(nested)} folder(s) inside the class folders of {str(root)!r} are not read "
               f"({shown}{', ...' if len(nested) > 3 else ''}); move their images into the class folder to use them.")
    empty = [d.name for d in subdirs if d not in class_dirs]
    if empty:
        notice(f"empty:{root}", f"folder(s) {_preview(empty)} of {str(root)!r} hold no images directly and are not "
               f"classes here ({len(class_dirs)} class folders found).")


def map_to_classes(images: ImageSet, classes: Sequence[str], skip_unknown: bool = False) -> ImageSet:
    """Relabel a class-folder set by folder name onto ``classes`` (a model's recorded class names; the index is the
    class index). A folder that is not among them is an error naming it, or, with ``skip_unknown``, its images are
    left out (said once on stderr); other layouts are returned unchanged."""
    if images.layout != "class-folders":
        return images
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in images.classes if c not in index]
    if unknown and not skip_unknown:
        shown = ", ".join(repr(c) for c in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise ConfigError(f"class folder(s) {shown} of {images.root!r} are not among the model's {len(classes)} "
                          f"classes ({_preview(classes)}); rename them, pass --skip-unknown-classes to leave them "
                          "out, or give --labels.")
    keep = [i for i, v in enumerate(images.labels) if images.classes[v] in index]
    if not keep:
        raise ConfigError(f"none of the class folders of {images.root!r} is among the model's classes "
                          f"({_preview(classes)}); give a folder with the model's classes.")
    if unknown:
        notice(f"skip-classes:{images.root}", f"left out {len(images) - len(keep)} images in {len(unknown)} class "
               f"folder(s) of {images.root!r} that are not among the model's classes ({', '.join(unknown[:5])}).")
    labels = [index[images.classes[images.labels[i]]] for i in keep]
    return ImageSet(images.root, [images.paths[i] for i in keep], labels, list(classes), "class-folders")


def _preview(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def load_rgb(path: str) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, palette, CMYK, alpha (composited on white) and 16-bit included."""
    with warnings.catch_warnings(record=True) as caught:  # Pillow's warning about a huge image, said as a note
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        img_file = Image.open(path)
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            width, height = img_file.size
            notice("huge-image", f"{path!r} is a very large image ({width}x{height} pixels); it is read, but slowly "
                   "and with much memory.")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    with img_file as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def resample_filter(interpolation: str) -> Image.Resampling:
    """The Pillow filter of a data config's ``interpolation``; an unknown name is an error, never bicubic in
    silence."""
    try:
        return _RESAMPLE[interpolation]
    except (KeyError, TypeError):
        raise ConfigError(f"interpolation {interpolation!r} is not one of {', '.join(_RESAMPLE)}; fix the model's "
                          "data config (config.json \"data\").") from None


def resize_crop(img: Image.Image, data: DataConfig) -> Image.Image:
    """The geometry of the eval transform (timm's ``transforms_imagenet_eval``): for a square ``size``, resize the
    short side to ``size / crop_pct``; for a non-square (H, W), resize to (H / crop_pct, W / crop_pct), the aspect
    ratio not kept, as timm does; then center-crop (H, W)."""
    size_h, size_w = data.input_size[-2:]
    w, h = img.size
    if size_h == size_w:
        scale = int(math.floor(size_w / data.crop_pct))
        if w <= h:
            new_w, new_h = scale, int(round(scale * h / w))
        else:
            new_w, new_h = int(round(scale * w / h)), scale
    else:
        new_w, new_h = int(math.floor(size_w / data.crop_pct)), int(math.floor(size_h / data.crop_pct))
    img = img.resize((new_w, new_h), resample_filter(data.interpolation))
    left, top = int(round((new_w - size_w) / 2.0)), int(round((new_h - size_h) / 2.0))
    return img.crop((left, top, left + size_w, top + size_h))


def eval_transform(img: Image.Image, data: DataConfig) -> torch.Tensor:
    """PIL RGB image -> normalised tensor (3 H W) as the model's data config says."""
    arr = np.asarray(resize_crop(img, data), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(data.mean, dtype=np.float32)) / np.asarray(data.std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class EvalDataset(torch.utils.data.Dataset):
    """(image tensor or None, label, index); None marks an unreadable image."""

    def __init__(self, images: ImageSet, data: DataConfig) -> None:
        self.images, self.data = images, data

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            x = eval_transform(load_rgb(self.images.paths[i]), self.data)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            x = None
        return x, self.images.labels[i], i


def collate_skip_unreadable(batch):
    """Stack the readable images; report the indices of unreadable ones."""
    good = [(x, y, i) for x, y, i in batch if x is not None]
    bad = [i for x, _, i in batch if x is None]
    if not good:
        return None, None, bad
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad


def make_loader(images: ImageSet, data: DataConfig, batch_size: int = 32, workers: int | None = None):
    """A DataLoader over ``images`` that yields (images (B 3 H W) or None, labels (B), unreadable indices)."""
    resample_filter(data.interpolation)  # a bad data config is one error now, not every image "unreadable"
    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    if workers and not _workers_can_share(batch_size, data):
        notice("workers-fsize", "the file-size limit (ulimit -f) is below one batch of images, which DataLoader "
                                "workers pass through shared-memory files: reading the images in this process")
        workers = 0
    # a worker whose batch is lost (its queue's feeder thread failed) would leave the loop waiting for ever: a
    # batch that takes longer than this ends the command with one sentence (LoaderStalled) instead
    extra = {"timeout": LOADER_TIMEOUT_S} if workers else {}
    return _Loader(torch.utils.data.DataLoader(
        EvalDataset(images, data), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=collate_skip_unreadable, persistent_workers=False, **extra,
    ))  # fmt: skip


LOADER_TIMEOUT_S = 600


def _workers_can_share(batch_size: int, data: DataConfig) -> bool:
    """Whether a batch of images fits under the file-size limit: workers hand their batches over in shared-memory
    files, which that limit caps (a worker that meets it dies without a word to the main process)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return True
    c, h, w = data.input_size
    return soft >= 2 * batch_size * c * h * w * 4


class _Loader:
    """A DataLoader whose stalls and dead workers end in one sentence (:class:`LoaderFailed`)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as exc:
                text = str(exc)
                if "DataLoader timed out" in text:
                    raise LoaderFailed(f"reading the images stalled (no batch in {LOADER_TIMEOUT_S} s: a "
                                       "DataLoader worker failed or the disk hangs); run again with --workers 0 "
                                       "to read them in this process") from None
                if "DataLoader worker" in text and ("killed" in text or "exited unexpectedly" in text):
                    raise LoaderFailed("a DataLoader worker died while reading the images (out of memory, a "
                                       "limit such as ulimit, or a signal); run again with --workers 0 or fewer "
                                       "--workers") from None
                raise
            yield batch


def check_eval_data(eval_data: str | os.PathLike, label: Callable[[ImageSet], ImageSet]) -> None:
    """Refuse, naming --eval-data, held-out images that cannot be evaluated: a missing folder, no images, labels
    that do not fit the model (``label``: the evaluation's own labelling, called on the scanned images) or no image
    that can be read."""
    text = os.fspath(eval_data)
    if not Path(text).is_dir():
        what = "is a file" if Path(text).exists() else "does not exist"
        raise ConfigError(f"--eval-data {text!r} {what}; give a folder of labelled held-out images (class "
                          "sub-folders).")
    try:
        images = label(scan_folder(text))
    except SsmtrimError as exc:
        raise ConfigError(f"--eval-data {text!r} cannot be evaluated: {str(exc).rstrip('.')}.") from None
    for path in images.paths:
        try:
            load_rgb(path)
            return
        except Exception:  # noqa: BLE001 - any decoding failure is an unreadable image
            continue
    raise ConfigError(f"none of the {len(images)} images in --eval-data {text!r} could be read; give a folder of "
                      "readable images.")
