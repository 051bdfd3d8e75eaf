"""``ssmtrim train ARCH --data DIR -o OUT``: train a registered architecture from scratch (e.g. the CIFAR-10 models)."""

from __future__ import annotations

from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import (
    AugmentOpt,
    BatchSizeOpt,
    CheckpointEveryOpt,
    DeviceOpt,
    EpochsOpt,
    EvalDataOpt,
    ForceOpt,
    JsonOpt,
    LabelSmoothingOpt,
    LrOpt,
    QuietOpt,
    ResumeOpt,
    RunOutputOpt,
    SeedOpt,
    TrainDataOpt,
    WarmupEpochsOpt,
    WeightDecayOpt,
    parse_img_size,
    train_config,
)
from ssmtrim.cli._render import ProgressRenderer, console, epoch_printer, print_json


@handle_errors
def train(
    arch: Annotated[str, typer.Argument(help="Registered architecture to train, e.g. vim_cifar.")],
    data: TrainDataOpt,
    output: RunOutputOpt,
    eval_data: EvalDataOpt = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 128,
    lr: LrOpt = 1e-3,
    weight_decay: WeightDecayOpt = 0.05,
    warmup_epochs: WarmupEpochsOpt = 1.0,
    label_smoothing: LabelSmoothingOpt = 0.1,
    augment: AugmentOpt = "crop",
    seed: SeedOpt = 0,
    checkpoint_every: CheckpointEveryOpt = 200,
    resume: ResumeOpt = False,
    init: Annotated[str | None, typer.Option("--init", help="Start from this dense checkpoint of the same "
                                             "architecture (continue its training on a fresh schedule).")] = None,
    img_size: Annotated[str | None, typer.Option(
        "--img-size", help="Train at this input size: N (square) or H,W (pixels, height first); the token grid "
        "follows (and an --init checkpoint's position embedding is interpolated to it). Default: the "
        "architecture's own size.")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model from random weights (or --init weights); the state is saved atomically so --resume loses at
    most one interval."""
    from ssmtrim.training import train_from_scratch

    cfg = train_config(locals())
    size = parse_img_size(img_size)
    with ProgressRenderer(quiet=quiet or json_out) as progress:
        result = train_from_scratch(arch, data, output, cfg, eval_data=eval_data, resume=resume, force=force,
                                    device=device, progress=progress, log=epoch_printer(not (quiet or json_out)),
                                    init=init, img_size=size)
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {result['output']}")
