"""``ssmtrim train ARCH --data DIR -o OUT``: train a registered architecture from scratch (e.g. the CIFAR-10 models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import DeviceOpt, ForceOpt, JsonOpt, QuietOpt
from ssmtrim.cli._render import ProgressRenderer, console, print_json


@handle_errors
def train(
    arch: Annotated[str, typer.Argument(help="Registered architecture to train, e.g. vim_cifar.")],
    data: Annotated[Path, typer.Option("--data", help="Training images in class sub-folders.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder: model, config, log, training state.")],
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Held-out images, evaluated each epoch.")]
    = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs")] = 1.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.1,
    augment: Annotated[str, typer.Option("--augment", help="crop (pad + random crop + flip), rrc or none.")] = "crop",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save the state every N steps.")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in the output folder.")] = False,
    init: Annotated[str | None, typer.Option("--init", help="Start from this dense checkpoint of the same "
                                             "architecture (continue its training on a fresh schedule).")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model from random weights (or --init weights); the state is saved atomically so --resume loses at
    most one interval."""
    from ssmtrim.training import TrainConfig, train_from_scratch

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, augment=augment, seed=seed,
                      checkpoint_every=checkpoint_every)

    def log(record: dict) -> None:
        if "eval_top1" in record and not quiet and not json_out:
            console.print(f"epoch {record['epoch']}: eval top-1 {record['eval_top1']:.2f}% "
                          f"({record['wall_s']:.0f} s)")

    with ProgressRenderer(quiet=quiet or json_out) as progress:
        result = train_from_scratch(arch, data, output, cfg, eval_data=eval_data, resume=resume, force=force,
                                    device=device, progress=progress, log=log, init=init)
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {result['output']}")
