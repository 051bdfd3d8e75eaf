"""``ssmtrim finetune PRUNED --data DIR --epochs N -o OUT``: a short fine-tune with pruning active and distillation."""

from __future__ import annotations

import os
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
    ImgSizeOpt,
    JsonOpt,
    LabelSmoothingOpt,
    LrOpt,
    QuietOpt,
    ResumeOpt,
    RunOutputOpt,
    SeedOpt,
    SkipUnknownClassesOpt,
    TrainDataOpt,
    WarmupEpochsOpt,
    WeightDecayOpt,
    parse_img_size,
    train_config,
)
from ssmtrim.cli._render import ProgressRenderer, console, epoch_printer, print_json


@handle_errors
def finetune(
    pruned: Annotated[str, typer.Argument(help="A pruned checkpoint folder (what `ssmtrim prune -o` writes).")],
    data: TrainDataOpt,
    output: RunOutputOpt,
    epochs: EpochsOpt = 1,
    eval_data: EvalDataOpt = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="Dense teacher (default: the dense weights the "
                                                "pruned folder came from).")] = None,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Weight of the distillation loss (0..1).")]
    = 0.5,
    distill_temperature: Annotated[float, typer.Option("--distill-temperature")] = 1.0,
    batch_size: BatchSizeOpt = 128,
    lr: LrOpt = 2e-4,
    weight_decay: WeightDecayOpt = 0.05,
    warmup_epochs: WarmupEpochsOpt = 0.1,
    label_smoothing: LabelSmoothingOpt = 0.1,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="Gradient-norm clip (0: none).")] = 1.0,
    augment: AugmentOpt = "rrc",
    seed: SeedOpt = 0,
    checkpoint_every: CheckpointEveryOpt = 200,
    resume: ResumeOpt = False,
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    skip_unknown_classes: SkipUnknownClassesOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a pruned model (pruning stays active) with label smoothing and distillation from the dense model;
    AdamW, cosine schedule with warm-up, gradient clipping, bf16 on GPU. Runs data-parallel under torchrun."""
    from ssmtrim.training import dist_info
    from ssmtrim.training import finetune as run

    cfg = train_config(locals(), min_lr=lr / 100, clip_grad=clip_grad or None)
    size = parse_img_size(img_size)
    silent = quiet or json_out or int(os.environ.get("RANK", "0")) > 0  # one progress display: rank 0's
    with ProgressRenderer(quiet=silent) as progress:
        result = run(pruned, data, output, cfg, eval_data=eval_data, teacher=teacher, resume=resume, force=force,
                     device=device, progress=progress, log=epoch_printer(not (quiet or json_out)),
                     skip_unknown_classes=skip_unknown_classes, img_size=size)
    if dist_info()[0] > 0:
        return
    if json_out:
        print_json(result)
    else:
        console.print(f"wrote {result['output']}")
