"""``ssmtrim finetune PRUNED --data DIR --epochs N -o OUT``: a short fine-tune with pruning active and distillation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import DeviceOpt, ForceOpt, JsonOpt, QuietOpt
from ssmtrim.cli._render import ProgressRenderer, console, print_json


@handle_errors
def finetune(
    pruned: Annotated[str, typer.Argument(help="A pruned checkpoint folder (what `ssmtrim prune -o` writes).")],
    data: Annotated[Path, typer.Option("--data", help="Training images in class sub-folders.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder: pruned model, config, log, state.")],
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs.")] = 1,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Held-out images, evaluated each epoch.")]
    = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Dense teacher (default: the dense weights the "
                                                "pruned folder came from).")] = None,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Weight of the distillation loss (0..1).")]
    = 0.5,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step (over all processes).")] = 128,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 2e-4,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs")] = 0.1,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.1,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="Gradient-norm clip (0: none).")] = 1.0,
    augment: Annotated[str, typer.Option("--augment", help="rrc (random resized crop + flip), crop (pad + random "
                                         "crop + flip) or none.")] = "rrc",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save the state every N steps.")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in the output folder.")] = False,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a pruned model (pruning stays active) with label smoothing and distillation from the dense model;
    AdamW, cosine schedule with warm-up, gradient clipping, bf16 on GPU. Runs data-parallel under torchrun."""
    from ssmtrim.training import TrainConfig, dist_info
    from ssmtrim.training import finetune as run

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, min_lr=lr / 100, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, clip_grad=clip_grad or None,
                      augment=augment, distill_weight=distill_weight, distill_temperature=distill_temperature,
                      seed=seed, checkpoint_every=checkpoint_every)

    def log(record: dict) -> None:
        if "eval_top1" in record and not quiet and not json_out:
            console.print(f"epoch {record['epoch']}: eval top-1 {record['eval_top1']:.2f}% ({record['wall_s']:.0f} s)")

    with ProgressRenderer(quiet=quiet or json_out or int(os.environ.get("RANK", "0")) > 0) as progress:
        result = run(pruned, data, output, cfg, eval_data=eval_data, teacher=teacher, resume=resume, force=force,
                     device=device, progress=progress, log=log)
    if dist_info()[0] > 0:
        return
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {result['output']}")
