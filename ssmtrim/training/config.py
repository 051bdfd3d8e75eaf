"""The training recipe (:class:`TrainConfig`) and the callback types the training modules share."""

from __future__ import annotations

import dataclasses
import math
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
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                 ("checkpoint_every", self.checkpoint_every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{_flag(name)} must be a whole number of at least {low}, got {value!r}.")
        _check_range("lr", self.lr, 0, None, low_open=True)
        for name in ("min_lr", "weight_decay", "warmup_epochs", "distill_weight"):
            _check_range(name, getattr(self, name), 0, 1 if name == "distill_weight" else None)
        _check_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        _check_range("distill_temperature", self.distill_temperature, 0, None, low_open=True)
        if self.clip_grad is not None:
            _check_range("clip_grad", self.clip_grad, 0, None)
        if self.augment not in ("crop", "rrc", "none"):
            raise ConfigError(f"--augment {self.augment!r} is not one of crop, rrc, none.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(field: str) -> str:
    return field.replace("_", "-")


def _check_range(field: str, value: float, low: float, high: float | None, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A :class:`ConfigError` naming the option unless ``value`` is a finite number in the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if low_open else value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open or high is None else "]"
        span = f"{left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"
        raise ConfigError(f"--{_flag(field)} {value!r} is outside {span}; give a finite number in that range.")
