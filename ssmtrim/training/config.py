"""The training recipe (:class:`TrainConfig`) and the callback types the training modules share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ssmtrim.errors import ConfigError

Progress = Callable[[str, int, int], None]  # (stage, done, total)
Log = Callable[[dict[str, Any]], None]  # one metrics record, as written to the log


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. ``distill_weight`` > 0 needs a teacher."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    augment: str = "crop"  # "crop": pad 4 + random crop + flip (small images); "rrc": random resized crop + flip
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA (never on CPU, where it measured no faster)
    seed: int = 0
    checkpoint_every: int = 200  # steps

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1.")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("lr must be > 0 and min_lr, weight_decay, warmup_epochs >= 0.")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.distill_weight <= 1:
            raise ConfigError("label smoothing must be in [0, 1) and the distillation weight in [0, 1].")
        if self.distill_temperature <= 0:
            raise ConfigError("the distillation temperature must be > 0.")
        if self.augment not in ("crop", "rrc", "none"):
            raise ConfigError(f"unknown augmentation {self.augment!r}; use crop, rrc or none.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
