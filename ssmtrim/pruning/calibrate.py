"""Calibration: token-importance thresholds per pruning layer from a small image set.

Layer by layer, the model runs in threshold mode with the thresholds found so far (each image keeps its own tokens)
and stops at the next pruning layer, whose candidate scores are pooled over the images; that layer's threshold is the
pooled (1 - keep) quantile. So in threshold mode each layer keeps, on average over the calibration images, the
fraction its keep ratio asks for. A last pass checks it and records the mean kept fraction per layer.

Inside :func:`ssmtrim.distributed.sharded` each rank runs its block of the images and the per-image scores are
gathered in the images' global order, so every rank finds the thresholds one process would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ssmtrim.data import ImageSet, make_loader
from ssmtrim.errors import ConfigError
from ssmtrim.pruning.config import PruneConfig

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _StopForward(Exception):
    """Raised by the score observer once the layer being calibrated has been seen."""


@dataclass
class LayerCalibration:
    layer: int  # 1-based block after which tokens are pruned
    keep: float
    threshold: float
    score_mean: float
    score_std: float
    quantiles: dict[str, float]  # q05 q25 q50 q75 q95 of the candidate scores
    kept_fraction: float | None = None  # mean kept fraction in threshold mode on the calibration images


@dataclass
class CalibrationResult:
    thresholds: tuple[float, ...]
    layers: list[LayerCalibration]
    num_images: int
    unreadable: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_images(images: ImageSet, data_config, batch_size: int = 32, progress: Progress | None = None,
                workers: int | None = None) -> tuple[Tensor, Tensor, int]:
    """Read and transform every image once: (images (B 3 H W), labels (B), number unreadable)."""
    xs, ys, bad = [], [], 0
    done = 0
    for x, y, unreadable in make_loader(images, data_config, batch_size, workers):
        bad += len(unreadable)
        if x is not None:
            xs.append(x)
            ys.append(y)
        done += (0 if x is None else x.shape[0]) + len(unreadable)
        if progress:
            progress("reading images", done, len(images))
    if not xs:
        raise ConfigError(f"none of the {len(images)} images in {images.root!r} could be read; check the --data "
                          "folder.")
    return torch.cat(xs), torch.cat(ys), bad


def _mean_fraction_threshold(per_image: list[Tensor], keep: float) -> float:
    """The threshold at which images keep, on average, ``keep`` of their candidate tokens. Each token weighs
    1 / (its image's candidates); a pooled quantile would instead hit the pooled fraction, which drifts from the mean
    per-image fraction after the first pruning layer, where images bring different numbers of candidates."""
    scores = torch.cat(per_image).double()
    weights = torch.cat([torch.full((len(s),), 1.0 / max(len(s), 1), dtype=torch.float64) for s in per_image])
    order = torch.argsort(scores, descending=True)
    cumulative = torch.cumsum(weights[order], 0) / len(per_image)
    i = int(torch.searchsorted(cumulative, torch.tensor([keep], dtype=torch.float64)).item())
    return float(scores[order][min(i, len(scores) - 1)])


def check_images(images: object, channels: int | None, batch_size: int) -> None:
    """A :class:`ConfigError` in one sentence unless ``images`` is a non-empty float tensor (N C H W) of finite values
    with ``channels`` channels and ``batch_size`` a whole number of at least 1."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}.")
    if not isinstance(images, Tensor):
        raise ConfigError(f"calibration images must be a tensor (N, C, H, W) or a folder path, got "
                          f"{type(images).__name__}.")
    if images.ndim != 4 or images.shape[0] == 0 or (channels is not None and images.shape[1] != channels):
        raise ConfigError(f"calibration images must be a non-empty (N, {channels or 'C'}, H, W) tensor, got shape "
                          f"{tuple(images.shape)}.")
    if not images.is_floating_point():
        raise ConfigError(f"calibration images are {images.dtype}; give them transformed (float, normalised as the "
                          "model's eval transform does).")
    if not bool(torch.isfinite(images).all()):
        raise ConfigError("calibration images hold NaN or infinite values; check how they were made.")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    config: PruneConfig,
    images: Tensor,
    batch_size: int = 32,
    progress: Progress | None = None,
    unreadable: int = 0,
) -> CalibrationResult:
    """Thresholds for ``config`` on ``images`` (N 3 H W, already transformed) with the dense ``model``; inside
    :func:`ssmtrim.distributed.sharded`, this rank's block of the images (``unreadable`` then counts all ranks')."""
    from ssmtrim.distributed import gather_list, sum_counts, sum_floats
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning.engine import is_pruned, reduced_forward

    if is_pruned(model):
        raise ConfigError("this model is already pruned; calibrate the dense model it came from instead.")
    check_images(images, getattr(model.config, "in_chans", None), batch_size)
    family = family_of(model)
    config.validate_for(family.depth(model.config))
    family.check_plan(config)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    thresholds: list[float] = []
    layers: list[LayerCalibration] = []
    n = images.shape[0]
    for j, (layer, keep) in enumerate(zip(config.layers, config.keep, strict=True)):
        partial = config.replace(layers=config.layers[: j + 1], keep=config.keep[: j + 1], mode="threshold",
                                 thresholds=(*thresholds, float("-inf")))
        pooled: list[Tensor] = []

        def observe(block: int, scores: Tensor, candidates: Tensor, target: int = layer - 1, pooled=pooled) -> None:
            if block == target:
                pooled.append(scores[candidates].float().cpu())
                raise _StopForward

        for i in range(n):  # threshold mode runs image by image anyway
            try:
                reduced_forward(model, images[i : i + 1], partial, observe)
            except _StopForward:
                pass
            if progress:
                progress(f"calibrating layer {layer}", i + 1, n)
        pooled[:] = gather_list(pooled)  # every rank's images, in their global order
        scores = torch.cat(pooled)
        threshold = _mean_fraction_threshold(pooled, keep) if keep < 1.0 else float("-inf")
        thresholds.append(threshold)
        qs = torch.quantile(scores.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64))
        layers.append(LayerCalibration(layer, keep, threshold, float(scores.mean()), float(scores.std()),
                                       {f"q{int(q * 100):02d}": float(v) for q, v in zip((0.05, 0.25, 0.5, 0.75, 0.95),
                                                                                          qs, strict=True)}))
    # check: the mean kept fraction of the threshold mode on the same images
    final = config.replace(mode="threshold", thresholds=tuple(thresholds))
    fractions = []
    for lo in range(0, n, batch_size):
        stats = reduced_forward(model, images[lo : lo + batch_size], final).stats
        fractions.append((stats.kept_fraction, min(batch_size, n - lo)))
        if progress:
            progress("checking thresholds", min(lo + batch_size, n), n)
    total = sum_counts(n)[0]
    kept = sum_floats(*(sum(f[j] * w for f, w in fractions) for j in range(len(layers))))
    for entry, k in zip(layers, kept, strict=True):
        entry.kept_fraction = k / total
    model.train(was_training)
    return CalibrationResult(tuple(thresholds), layers, total, unreadable, time.perf_counter() - start)
