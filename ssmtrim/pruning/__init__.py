"""Token pruning for vision SSMs: scoring, selection, alignment, calibration, in-place patches per family.

``apply_pruning`` / ``remove_pruning`` dispatch on the model's family; ``prune`` calibrates on images and patches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor, nn

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.config import ARRANGEMENTS, GAP_ESTIMATES, MODES, SCORES, PruneConfig, PruneStats, kept_count

__all__ = [
    "ARRANGEMENTS", "GAP_ESTIMATES", "MODES", "SCORES", "PruneConfig", "PruneResult", "PruneStats", "apply_pruning",
    "is_pruned", "kept_count", "prune", "remove_pruning",
]  # fmt: skip


def _family_module(model: nn.Module):
    family = getattr(getattr(model, "config", None), "family", None)
    if family == "vim":
        from ssmtrim.pruning import vim

        return vim
    if family == "plainmamba":
        from ssmtrim.pruning import plainmamba

        return plainmamba
    raise ConfigError(f"cannot prune a {type(model).__name__}; load a Vim or PlainMamba model with ssmtrim.load_model.")


def is_pruned(model: nn.Module) -> bool:
    return getattr(model, "prune_config", None) is not None


def apply_pruning(model: nn.Module, config: PruneConfig) -> nn.Module:
    """Patch ``model`` in place so that it prunes tokens as ``config`` says (:mod:`ssmtrim.pruning.vim`,
    :mod:`ssmtrim.pruning.plainmamba`)."""
    if is_pruned(model):
        raise ConfigError("this model is already pruned; prune the dense model it came from instead.")
    return _family_module(model).apply_pruning(model, config)


def remove_pruning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_pruning`; the dense model again, same object and weights."""
    return _family_module(model).remove_pruning(model) if is_pruned(model) else model


@dataclass
class PruneResult:
    model: nn.Module
    config: PruneConfig
    calibration: object | None  # CalibrationResult when images were given


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
    (N 3 H W)) and patch ``model``.

    Without ``data`` the model is patched in count mode with no thresholds (threshold mode then needs calibration).
    """
    from ssmtrim.data import scan_folder
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.pruning.calibrate import calibrate, load_images

    if is_pruned(model):
        raise ConfigError("this model is already pruned; prune the dense model it came from instead.")
    config.validate_for(model.config.depth)
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    calibration = None
    if isinstance(data, Tensor):
        calibration = calibrate(model, config, data, batch_size, progress)
        config = config.replace(thresholds=calibration.thresholds)
    elif data is not None:
        images = scan_folder(data).subset(num_images, seed)
        data_config = data_config_of(model)
        x, _, bad = load_images(images, data_config, batch_size, progress, workers)
        calibration = calibrate(model, config, x, batch_size, progress, bad)
        config = config.replace(thresholds=calibration.thresholds)
    elif config.mode == "threshold":
        raise ConfigError("--mode threshold needs calibration images; pass --data DIR.")
    return PruneResult(apply_pruning(model, config), config, calibration)
