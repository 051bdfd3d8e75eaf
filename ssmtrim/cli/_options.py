"""Options shared by several commands, declared once."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ssmtrim.errors import ConfigError

if TYPE_CHECKING:
    from ssmtrim.training import TrainConfig

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit of the model repository.")
]
ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Force the architecture (a name from `ssmtrim models`); default: inferred.")
]
BackendOpt = Annotated[
    str | None,
    typer.Option("--backend", help="Selective-scan backend: auto, ref, cpu, cuda or portable (default: "
                 "$SSMTRIM_SCAN_BACKEND or auto)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device to run on, e.g. cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists and ssmtrim wrote "
                                         "it (a folder holding anything else is never replaced).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SkipUnknownClassesOpt = Annotated[
    bool,
    typer.Option("--skip-unknown-classes", help="Leave out class folders whose names are not among the model's "
                 "recorded classes (default: refuse them, naming the folder)."),
]
ImgSizeOpt = Annotated[
    str | None,
    typer.Option("--img-size", help="Load the model for this input size: N (square) or H,W (pixels, height first); "
                 "the position embedding is interpolated to the new token grid. Also the size a checkpoint file "
                 "whose position embedding is not square was trained at. Default: the model's own size."),
]


def parse_img_size(text: str | None) -> int | tuple[int, int] | None:
    """``--img-size``: ``N`` -> N, ``H,W`` (or ``HxW``) -> (H, W), a square ``N,N`` -> N; None stays None."""
    if text is None:
        return None
    parts = [p.strip() for p in text.lower().replace("x", ",").split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        sizes = [int(p) for p in parts]
        return sizes[0] if len(sizes) == 1 or sizes[0] == sizes[1] else (sizes[0], sizes[1])
    raise ConfigError(f"--img-size takes N or H,W in pixels (height first), e.g. 224 or 224,320; got {text!r}.")


# ---------------------------------------------------------------------------------------------------------------
# the scan backend, applied for one command


def backend_scope(backend: str | None) -> contextlib.AbstractContextManager:
    """The ``--backend`` choice as a block: scoped, not ``set_backend``, so that it never outlives the command when
    the app runs inside another process (tests, notebooks)."""
    if backend is None:
        return contextlib.nullcontext()
    from ssmtrim.ops import use_backend
    from ssmtrim.ops.backend import backend_names

    if backend.strip().lower() not in backend_names():  # named as the option the user typed
        raise ConfigError(f"--backend {backend!r} is not a scan backend; choose one of {', '.join(backend_names())}.")
    return use_backend(backend)


# ---------------------------------------------------------------------------------------------------------------
# the training recipe (ssmtrim train, ssmtrim finetune): each option named as the TrainConfig field it sets

TrainDataOpt = Annotated[Path, typer.Option("--data", help="Training images in class sub-folders.")]
RunOutputOpt = Annotated[  # text, not Path: Path("") would turn an empty -o into the current folder
    str, typer.Option("-o", "--output", metavar="DIR", help="Run folder: model, config, log, training state.")
]
EvalDataOpt = Annotated[Path | None, typer.Option("--eval-data", help="Held-out images, evaluated each epoch.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", help="Epochs.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Images per step (over all processes).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay")]
WarmupEpochsOpt = Annotated[float, typer.Option("--warmup-epochs")]
LabelSmoothingOpt = Annotated[float, typer.Option("--label-smoothing")]
AugmentOpt = Annotated[
    str, typer.Option("--augment", help="crop (pad + random crop + flip), rrc (random resized crop + flip) or none.")
]
SeedOpt = Annotated[int, typer.Option("--seed")]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Save the state every N steps.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run saved in the output folder.")]


def train_config(options: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """The recipe from a command's parsed options: each option whose name is a :class:`TrainConfig` field sets it
    (pass the command's ``locals()``), then ``overrides``; fields the command does not declare keep their defaults."""
    import dataclasses

    from ssmtrim.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in options.items() if k in names}, **overrides})
