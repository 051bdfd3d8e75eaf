"""Accuracy and faithfulness: top-1/top-5 against labels, agreement and KL against the dense model, over in-memory
images or an image folder read by a DataLoader (unreadable images counted, never fatal)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.data import ImageSet
from ssmtrim.errors import ConfigError, SourceNotFoundError


@dataclass
class Comparison:
    num_images: int
    agreement: float  # fraction of images where pruned top-1 == dense top-1
    kl: float  # mean KL(dense || pruned) of the softmax outputs, nats
    top1: float | None = None  # against labels, when given
    top5: float | None = None
    dense_top1: float | None = None
    dense_top5: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def topk_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean())


def compare_logits(dense: Tensor, pruned: Tensor, labels: Tensor | None = None) -> Comparison:
    """Logits (N classes) of both models on the same images; inside :func:`ssmtrim.distributed.sharded` each rank
    passes its own images' logits and the comparison covers all of them."""
    from ssmtrim.distributed import all_ranks

    labelled = all_ranks(labels is not None and bool((labels >= 0).all()))
    tally = _Tally()
    tally.add(pruned, labels if labelled else torch.full((pruned.shape[0],), -1), dense)
    t = tally.reduce()
    result = Comparison(t.n, t.agree / t.n, t.kl / t.n)
    if labelled:
        result.top1, result.top5, result.dense_top1, result.dense_top5 = (v / t.n for v in (t.c1, t.c5, t.dc1, t.dc5))
    return result


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 32, progress=None, stage: str = "evaluating") -> Tensor:
    """Logits of ``model`` on in-memory images (N 3 H W), in batches."""
    model.eval()
    outs = []
    for lo in range(0, images.shape[0], batch_size):
        outs.append(model(images[lo : lo + batch_size]).float())
        if progress:
            progress(stage, min(lo + batch_size, images.shape[0]), images.shape[0])
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------- evaluating on a folder


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in the standard class-index order (sorted)."""
    path = Path(__file__).with_name("assets") / "imagenet_wnids.txt"
    return path.read_text(encoding="utf-8").split()


def read_labels_file(path: str | os.PathLike, num_classes: int | None = None) -> dict[str, int]:
    """``name label`` per line (whitespace or comma separated; ``#`` comments); name is a file name or a path
    relative to the data folder. Labels are checked against ``num_classes`` (when given) line by line, and a file
    listed twice must carry the same label both times."""
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SourceNotFoundError(f"cannot read the labels file {where!r} ({exc.strerror}).") from None
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"the labels file {where!r} is not UTF-8 text; give a text file of 'file label' lines.") \
            from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        try:
            name, value = " ".join(parts[:-1]), int(parts[-1])
        except (ValueError, IndexError):
            raise ConfigError(f"line {n} of {where!r} is not 'file label' with an integer label: {line!r}.") from None
        if not name:
            raise ConfigError(f"line {n} of {where!r} has a label but no file name: {line!r}.")
        if value < 0 or (num_classes is not None and value >= num_classes):
            allowed = f"the model's {num_classes} classes (0..{num_classes - 1})" if num_classes is not None else \
                "the class indices (0 or more)"
            raise ConfigError(f"line {n} of {where!r} gives {name!r} the label {value}, outside {allowed}; fix the "
                              "line.")
        if name in labels and labels[name] != value:
            raise ConfigError(f"{where!r} lists {name!r} twice with different labels ({labels[name]} on line "
                              f"{first_line[name]}, {value} on line {n}); keep one.")
        labels[name], first_line[name] = value, first_line.get(name, n)
    if not labels:
        raise ConfigError(f"the labels file {where!r} has no 'file label' lines.")
    return labels


def label_images(images: ImageSet, num_classes: int, labels_file: str | os.PathLike | None = None,
                 classes: list[str] | None = None, skip_unknown: bool = False) -> ImageSet:
    """Map the folder's labels onto the model's class indices (see ``ssmtrim eval --help``), or refuse clearly.
    ``classes``: the model's recorded class names; class folders are then matched by name (a folder not among them
    is an error, or left out with ``skip_unknown``), never by their sorted position."""
    from ssmtrim.data import map_to_classes

    if labels_file is not None:
        table = read_labels_file(labels_file, num_classes)
        root = Path(images.root)
        found, missing = [], 0
        for p in images.paths:
            rel = str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else Path(p).name
            value = table.get(rel, table.get(Path(p).name))
            missing += value is None
            found.append(-1 if value is None else value)
        if missing:
            raise ConfigError(f"{missing} of the {len(images)} images are not in the labels file {str(labels_file)!r}; "
                              "list every image (by file name) or drop --labels.")
        labels = found
    elif images.layout == "class-folders" and classes:
        images = map_to_classes(images, classes, skip_unknown)
        labels = list(images.labels)
    elif images.layout == "class-folders":
        if len(images.classes) != num_classes:
            raise ConfigError(f"{images.root!r} has {len(images.classes)} class folders but the model predicts "
                              f"{num_classes} classes; give a labels file with --labels, or a matching folder.")
        labels = list(images.labels)
    elif images.layout == "wnid-files":
        if num_classes != 1000:
            raise ConfigError(f"{images.root!r} holds ImageNet files named by WordNet id, but the model predicts "
                              f"{num_classes} classes, not 1000; give a labels file with --labels.")
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        wnids = [images.classes[v] for v in images.labels]
        unknown = sorted({w for w in wnids if w not in index})
        if unknown:
            raise ConfigError(f"{len(unknown)} WordNet ids in {images.root!r} (e.g. {unknown[0]}) are not ImageNet-1k "
                              "classes; give a labels file with --labels.")
        labels = [index[w] for w in wnids]
    else:
        labels = [-1] * len(images)
    bad = [v for v in labels if not -1 <= v < num_classes]
    if bad:
        raise ConfigError(f"label {bad[0]} is outside the model's {num_classes} classes (0..{num_classes - 1}).")
    return dataclasses.replace(images, labels=labels)


@dataclass
class EvalResult:
    """Accuracy of a model over an image folder, and how closely it follows the dense model (when given)."""

    num_images: int
    unreadable: int
    top1: float | None  # percent, None when the images are unlabelled
    top5: float | None
    agreement: float | None = None  # percent of images where top-1 equals the dense model's
    kl: float | None = None  # mean KL(dense || model) of the softmax outputs, nats
    dense_top1: float | None = None
    dense_top5: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Tally:
    def __init__(self) -> None:
        self.n = self.c1 = self.c5 = self.dc1 = self.dc5 = self.agree = 0
        self.kl = 0.0

    def reduce(self) -> _Tally:
        """Summed over the ranks inside :func:`ssmtrim.distributed.sharded` (counts exactly); itself otherwise."""
        from ssmtrim.distributed import sum_counts, sum_floats

        self.n, self.c1, self.c5, self.dc1, self.dc5, self.agree = sum_counts(
            self.n, self.c1, self.c5, self.dc1, self.dc5, self.agree)
        self.kl = sum_floats(self.kl)[0]
        return self

    def add(self, logits: Tensor, labels: Tensor, dense: Tensor | None) -> None:
        logits = logits.float()
        self.n += logits.shape[0]
        if bool((labels >= 0).all()):
            top = logits.topk(min(5, logits.shape[1]), 1).indices
            self.c1 += int((top[:, 0] == labels).sum())
            self.c5 += int((top == labels[:, None]).any(1).sum())
            if dense is not None:
                dtop = dense.float().topk(min(5, dense.shape[1]), 1).indices
                self.dc1 += int((dtop[:, 0] == labels).sum())
                self.dc5 += int((dtop == labels[:, None]).any(1).sum())
        if dense is not None:
            dense = dense.float()
            self.agree += int((dense.argmax(1) == logits.argmax(1)).sum())
            self.kl += float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(dense, 1), log_target=True,
                                      reduction="sum"))


_Batch = tuple[Tensor | None, Tensor, Tensor | None, int]  # images (or None), labels, dense logits (or None), skipped


def _run(model: nn.Module, batches: Iterable[_Batch], total: int | None, dense: nn.Module | None,
         device: torch.device | str | None, progress) -> tuple[_Tally, int, bool]:
    """The one evaluation loop: each batch's images (B 3 H W, transformed) through ``model`` (and ``dense`` when its
    logits are not given) on ``device``; returns the tally, the skipped count and whether every label was known,
    summed over the ranks inside :func:`ssmtrim.distributed.sharded` (each rank passing its own share)."""
    tally, skipped, done, labelled = _Tally(), 0, 0, True
    for x, y, ref, bad in batches:
        skipped += bad
        done += bad + (0 if x is None else x.shape[0])
        if x is not None:
            if device is not None:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                ref = None if ref is None else ref.to(device)
            labelled = labelled and bool((y >= 0).all())
            tally.add(model(x), y, ref if ref is not None else (dense(x) if dense is not None else None))
        if progress:
            progress("evaluating", done, done if total is None else total)
    from ssmtrim.distributed import all_ranks, sum_counts

    return tally.reduce(), sum_counts(skipped)[0], all_ranks(labelled)


def _place(device: torch.device | str | None, *models: nn.Module | Tensor | None) -> None:
    """Move the models to ``device``, in place (None: leave them where they are)."""
    if device is not None:
        for m in models:
            if isinstance(m, nn.Module):
                m.to(device)


def check_counts(batch_size: int, num_images: int | None = None, workers: int | None = None) -> None:
    """A :class:`ConfigError` naming the option unless ``batch_size`` and ``num_images`` are whole numbers of at least
    1 (``num_images`` None: all) and ``workers`` of at least 0 (None: chosen)."""
    for flag, value, low in (("--batch-size", batch_size, 1), ("--num-images", num_images, 1),
                             ("--workers", workers, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ConfigError(f"{flag} must be a whole number of at least {low}, got {value!r}.")


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], total: int | None = None,
                     dense: nn.Module | None = None, device: torch.device | str | None = None,
                     progress=None) -> EvalResult:
    """Evaluate on batches of transformed images and labels ``(x (B 3 H W), y (B))`` from any iterable (e.g. images
    normalised batch by batch from memory); ``total`` is the image count, for progress. The images are moved to
    ``device`` (None: they are used where they are; the models are never moved here)."""
    start = time.perf_counter()
    model.eval()
    if dense is not None:
        dense.eval()
    tally, _, labelled = _run(model, ((x, y, None, 0) for x, y in batches), total, dense, device, progress)
    return _result(tally, 0, dense is not None, labelled, time.perf_counter() - start)


@torch.no_grad()
def evaluate_tensors(model: nn.Module, images: Tensor, labels: Tensor, dense: nn.Module | Tensor | None = None,
                     batch_size: int = 64, progress=None, device: torch.device | str | None = None) -> EvalResult:
    """Evaluate on images already transformed (N 3 H W); ``dense`` is a model or its logits on the same images.
    ``device``: move the model(s) there and run there (None: where the model is)."""
    check_counts(batch_size)
    n = images.shape[0]
    if labels.shape[:1] != (n,):
        raise ConfigError(f"{n} images but labels of shape {tuple(labels.shape)}; give one label per image.")
    classes = getattr(getattr(model, "config", None), "num_classes", None)
    if classes and n and not bool(((labels >= -1) & (labels < classes)).all()):
        raise ConfigError(f"labels must be class indices 0 to {classes - 1} (-1: unlabelled), got "
                          f"{int(labels.min())} to {int(labels.max())}.")
    start = time.perf_counter()
    _place(device, model, dense)
    model.eval()
    batches = ((images[lo:lo + batch_size], labels[lo:lo + batch_size],
                dense[lo:lo + batch_size] if isinstance(dense, Tensor) else None, 0) for lo in range(0, n, batch_size))
    module = dense if isinstance(dense, nn.Module) else None
    tally, _, labelled = _run(model, batches, n, module, device or _device_of(model), progress)
    return _result(tally, 0, dense is not None, labelled, time.perf_counter() - start)


def evaluate_logits(logits: Tensor, labels: Tensor, dense: Tensor | None = None, seconds: float = 0.0) -> EvalResult:
    """The same figures from logits already computed (N classes), e.g. by several plans run from one
    :class:`~ssmtrim.pruning.engine.DensePrefix`; ``dense``: the dense model's logits on the same images."""
    if labels.shape[:1] != logits.shape[:1]:
        raise ConfigError(f"{logits.shape[0]} rows of logits but labels of shape {tuple(labels.shape)}; give one "
                          "label per image.")
    tally = _Tally()
    tally.add(logits, labels, dense)
    return _result(tally, 0, dense is not None, bool((labels >= 0).all()), seconds)


def _device_of(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def _result(t: _Tally, unreadable: int, with_dense: bool, labelled: bool, seconds: float) -> EvalResult:
    if t.n == 0:
        raise ConfigError("none of the images could be read; check the --data folder.")
    pct = lambda v: 100.0 * v / t.n  # noqa: E731
    return EvalResult(
        num_images=t.n, unreadable=unreadable, top1=pct(t.c1) if labelled else None,
        top5=pct(t.c5) if labelled else None, agreement=pct(t.agree) if with_dense else None,
        kl=t.kl / t.n if with_dense else None, dense_top1=pct(t.dc1) if labelled and with_dense else None,
        dense_top5=pct(t.dc5) if labelled and with_dense else None, seconds=seconds,
    )  # fmt: skip


def dense_of(model: nn.Module) -> nn.Module | None:
    """The dense model a reduced one came from (:func:`ssmtrim.pruning.engine.dense_of`: the reduction removed and
    weights a recovery step changed restored), or None for a dense model."""
    from ssmtrim.pruning.engine import dense_of as engine_dense_of

    return engine_dense_of(model)


def dense_reference(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """What a reduced model is compared with, and its name. A folder that was pruned (and not fine-tuned) holds its
    dense weights: "dense". A fine-tuned folder's weights are no longer the dense model's, so its recorded dense
    source is loaded ("dense original"); where that cannot be, the comparison is with its own weights without the
    reduction, named so (and said once on stderr). (None, None) for a dense model."""
    from ssmtrim.errors import SsmtrimError
    from ssmtrim.notices import notice

    dense = dense_of(model)
    if dense is None:
        return None, None
    config = getattr(getattr(model, "source", None), "folder_config", None) or {}
    finetune = config.get("finetune")
    if not finetune:
        return dense, "dense"
    origin = finetune.get("dense_source") if isinstance(finetune, dict) else None
    why = "it records no dense source"
    if origin:
        from ssmtrim.checkpoint import load_model

        try:
            original = load_model(origin, img_size=model.config.img_size)  # at the size it was pruned at
            check_compatible(model, original)
            return original, "dense original"
        except (SsmtrimError, OSError) as exc:
            why = f"its dense source {origin!r} cannot be loaded ({exc})"
    notice(f"reference:{model.source.path}", f"{model.source.path!r} was fine-tuned and {why}, so it is compared "
           "with its own weights without pruning (not the dense original); pass the dense model with --dense.")
    return dense, "unpruned (fine-tuned weights)"


def check_compatible(model: nn.Module, dense: nn.Module, flag: str = "--dense") -> None:
    """Refuse a dense model to compare with (given as ``flag``) that is pruned, or takes other images or classes."""
    from ssmtrim.models.loading import class_names_of, data_config_of
    from ssmtrim.pruning import is_pruned

    if is_pruned(dense):
        raise ConfigError(f"the dense model to compare with ({flag}) is pruned; give the dense model the pruned one "
                          "came from.")
    a, b = data_config_of(model), data_config_of(dense)
    if a.input_size != b.input_size:
        raise ConfigError(f"the model takes {a.input_size[1]}x{a.input_size[2]} images but the dense model "
                          f"{b.input_size[1]}x{b.input_size[2]}; compare models of the same input size.")
    if model.config.num_classes != dense.config.num_classes:
        raise ConfigError(f"the model predicts {model.config.num_classes} classes but the dense model "
                          f"{dense.config.num_classes}; compare models with the same classes.")
    names, dense_names = class_names_of(model), class_names_of(dense)
    if names and dense_names and names != dense_names:
        raise ConfigError("the model and the dense model record different class names (or orders); compare models "
                          "with the same classes.")
    _check_same_base(model, dense, flag)


def _check_same_base(model: nn.Module, dense: nn.Module, flag: str) -> None:
    """A reduced model is compared with the dense model it came from: another family or architecture is refused;
    the same architecture with other weights (when the reduced model still holds its dense weights) is said."""
    import dataclasses

    from ssmtrim.notices import notice
    from ssmtrim.pruning import is_pruned

    if not is_pruned(model):
        return
    a, b = model.config, dense.config
    same = {**dataclasses.asdict(a), "img_size": None} == {**dataclasses.asdict(b), "img_size": None}
    if a.family != b.family or not same:
        raise ConfigError(f"the dense model to compare with ({flag}) is a {b.family} of another architecture than the "
                          f"reduced {a.family}, so it is not the model that was reduced; give the dense model it came "
                          "from.")
    config = getattr(getattr(model, "source", None), "folder_config", None) or {}
    if config.get("finetune"):
        return  # its own weights are no longer the dense ones
    kept = getattr(model, "dense_tensors", None) or {}
    own = model.state_dict()
    for name, value in dense.state_dict().items():
        mine = kept.get(name, own.get(name))
        if mine is None or mine.shape != value.shape or not torch.equal(mine.to(value.dtype), value):
            notice(f"other-dense:{flag}", f"the dense model given ({flag}) has other weights than the ones the reduced "
                   f"model was pruned from ({name} differs): agreement and KL compare two different models.")
            return


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: str | os.PathLike | ImageSet,
    dense: nn.Module | None = None,
    labels_file: str | os.PathLike | None = None,
    num_images: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    workers: int | None = None,
    progress=None,
    device: torch.device | str | None = None,
    skip_unknown_classes: bool = False,
) -> EvalResult:
    """Top-1 / top-5 of ``model`` over an image folder (class sub-folders, ImageNet files named by WordNet id, or any
    folder with ``labels_file``), and agreement / KL against ``dense`` when given. Images are read by a DataLoader
    with workers and the model's own eval transform; unreadable images are counted, never fatal. ``device``: move the
    model (and ``dense``) there and run there; None runs where the model is. Inside
    :func:`ssmtrim.distributed.sharded` each rank reads its block of the images and every rank gets the whole
    result. A model that records its class names has class folders matched by name (``skip_unknown_classes``: leave
    out the folders that are not among them instead of refusing)."""
    from ssmtrim.data import make_loader, scan_folder
    from ssmtrim.devices import check_device
    from ssmtrim.distributed import shard_images
    from ssmtrim.models.loading import class_names_of, data_config_of

    device = None if device is None else check_device(device)  # before the images are read
    check_counts(batch_size, num_images, workers)
    start = time.perf_counter()
    images = data if isinstance(data, ImageSet) else scan_folder(data)
    images = label_images(images, model.config.num_classes, labels_file, class_names_of(model),
                          skip_unknown_classes).subset(num_images, seed)
    labelled = images.labelled
    if not labelled:
        from ssmtrim.notices import notice

        notice(f"unlabelled:{images.root}", f"{images.root!r} has no class sub-folders and no --labels, so top-1 "
               "and top-5 are not measured; put the images in class folders or give --labels.")
    images = shard_images(images)  # this rank's block inside ssmtrim.distributed.sharded, else all of them
    if dense is not None:
        check_compatible(model, dense)
        dense.eval()
    model.eval()
    _place(device, model, dense)
    if len(images):
        from ssmtrim.memory import check_batch_fits

        check_batch_fits(model, data_config_of(model).input_size, min(batch_size, len(images)))
    batches = ((x, y, None, len(bad)) for x, y, bad in make_loader(images, data_config_of(model), batch_size, workers))
    tally, unreadable, _ = _run(model, batches, len(images), dense, device or _device_of(model), progress)
    return _result(tally, unreadable, dense is not None, labelled, time.perf_counter() - start)
