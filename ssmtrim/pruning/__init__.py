"""Token reduction for vision SSMs: the plan (:mod:`.config`), the family-agnostic driver (:mod:`.engine`), registered
strategies (:mod:`.strategies`) and scores (:mod:`.scores`), calibration (:mod:`.calibrate`) and schedules
(:mod:`.schedule`). ``prune`` calibrates on images and patches the model in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.config import GAP_ESTIMATES, MODES, PruneConfig, describe_options
from ssmtrim.pruning.engine import (
    DensePrefix,
    ReducedOutput,
    apply_pruning,
    dense_of,
    dense_prefix,
    feature_maps,
    is_pruned,
    kept_count,
    reduced_forward,
    remove_pruning,
)  # fmt: skip
from ssmtrim.pruning.scores import score_names
from ssmtrim.pruning.state import PruneStats
from ssmtrim.pruning.strategies import strategy_names

__all__ = [
    "DensePrefix", "GAP_ESTIMATES", "MODES", "PruneConfig", "PruneResult", "PruneStats", "ReducedOutput",
    "apply_pruning", "dense_of", "dense_prefix", "describe_options", "feature_maps", "is_pruned", "kept_count",
    "prune", "reduce_on", "reduced_forward", "remove_pruning", "score_names", "strategy_names",
]  # fmt: skip


@dataclass
class PruneResult:
    model: nn.Module
    config: PruneConfig
    calibration: object | None  # CalibrationResult when images were given
    compensation: object | None = None  # CompensationResult when the plan asks for one


def prune(
    model: nn.Module,
    config: PruneConfig,
    data: str | os.PathLike | Tensor | None = None,
    num_images: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    progress=None,
    workers: int | None = None,
) -> PruneResult:
    """Calibrate thresholds on ``num_images`` images of ``data`` (a folder, seeded subset; or transformed images
    (N 3 H W)) and patch ``model`` in place (``result.model`` is the same object; :func:`dense_of` gives a dense
    copy, :func:`remove_pruning` undoes the patch).

    Without ``data`` the model is patched in count mode with no thresholds (threshold mode then needs calibration).
    """
    from ssmtrim.data import scan_folder
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning.calibrate import load_images

    if is_pruned(model):
        raise ConfigError("this model is already pruned; prune the dense model it came from instead.")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(f"the model's weights are {names}; ssmtrim reduces float32 models, so pass model.float() "
                          "(the command line converts half-precision weights when it loads them).")
    config.validate_for(family_of(model).depth(model.config))
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}.")
    if data is not None and not isinstance(data, (Tensor, str, os.PathLike)):
        raise ConfigError(f"data must be a folder path or a tensor of transformed images (N, C, H, W), got "
                          f"{type(data).__name__}.")
    if data is None:
        if config.mode == "threshold" or config.compensate != "none":
            flag = "--mode threshold" if config.mode == "threshold" else f"--compensate {config.compensate}"
            raise ConfigError(f"{flag} needs calibration images; pass --data DIR.")
        apply_pruning(model, config)
        return PruneResult(model, config, None, None)
    bad = 0
    if isinstance(data, Tensor):
        x = data
    else:
        x, _, bad = load_images(scan_folder(data).subset(num_images, seed), data_config_of(model), batch_size,
                                progress, workers)
    calibration, compensation = reduce_on(model, config, x, batch_size, progress, bad)
    return PruneResult(model, model.prune_config, calibration, compensation)


def reduce_on(model: nn.Module, config: PruneConfig, images: Tensor, batch_size: int = 32, progress=None,
              unreadable: int = 0):
    """The one way from a plan and calibration images (N 3 H W, transformed) to a reduced model, shared by
    :func:`prune`, ``ssmtrim prune`` (:func:`ssmtrim.api.prune_and_save`) and ``report --sweep``: calibrate
    (threshold mode's thresholds), patch ``model`` in place, fit the plan's compensation. Returns (the calibration,
    the compensation or None)."""
    from ssmtrim.pruning.calibrate import calibrate
    from ssmtrim.pruning.compensation import compensate

    calibration = calibrate(model, config, images, batch_size, progress, unreadable)
    apply_pruning(model, config.replace(thresholds=calibration.thresholds))
    return calibration, compensate(model, images, batch_size)
