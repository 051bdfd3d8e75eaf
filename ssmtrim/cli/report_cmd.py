"""``ssmtrim report DENSE [PRUNED ...] --data DIR`` or ``--sweep``: FLOPs, accuracy, speed and memory, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import (
    DeviceOpt,
    ForceOpt,
    ImgSizeOpt,
    JsonOpt,
    QuietOpt,
    SkipUnknownClassesOpt,
    parse_img_size,
)
from ssmtrim.cli._prune_options import (
    ConvOpt,
    GapOpt,
    LayersOpt,
    OptionOpt,
    ScoreOpt,
    TaskOpt,
    parse_layers,
    parse_options,
    strategy_fields,
)
from ssmtrim.cli._render import ProgressRenderer, console, print_json
from ssmtrim.errors import ConfigError


@handle_errors
def report(
    models: Annotated[list[str], typer.Argument(help="The dense model, then pruned folders to compare with it.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled images to evaluate on (see `ssmtrim eval`).")],
    output: Annotated[str, typer.Option("-o", "--output", metavar="DIR", help="Folder for report.json, report.md and "
                                        "the plots.")] = "ssmtrim-report",
    sweep: Annotated[str | None, typer.Option("--sweep", help="Prune the dense model at each value, for each "
                                              "arrangement: keep=0.9,0.8,0.7 or flops=0.8,0.7,0.6 (paper).")]
    = None,
    layers: LayersOpt = None,
    arrangements: Annotated[str | None, typer.Option("--arrangements", help="Strategies in a sweep, comma-separated "
                                                     "(default: every registered one).")] = None,
    score: ScoreOpt = None,
    task: TaskOpt = None,
    option: OptionOpt = None,
    gap: GapOpt = None,
    conv: ConvOpt = None,
    calib: Annotated[Path | None, typer.Option("--calib", help="Calibration images for a sweep (default: the first "
                                               "evaluation images).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="File of 'name label' lines.")] = None,
    num_images: Annotated[int | None, typer.Option("--num-images", help="Seeded subset of the images.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch of the throughput measurement.")] = 8,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats (the median is reported).")] = 3,
    no_speed: Annotated[bool, typer.Option("--no-speed", help="Skip the speed and memory measurements.")] = False,
    runtime: Annotated[str, typer.Option("--runtime", help="Where speed is measured: torch (eager), compiled "
                                         "(torch.compile, fullgraph, a graph per batch size; compiling takes minutes "
                                         "on a deep model), or onnxruntime (each model exported to ONNX and checked "
                                         "first; needs the export extra).")]
    = "torch",
    img_size: ImgSizeOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    skip_unknown_classes: SkipUnknownClassesOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compare a dense model with pruned ones: GFLOPs (both conventions), top-1/top-5, agreement and KL with dense,
    throughput, batch-1 latency and peak memory, the speed-up and how much of the FLOPs saving it realises."""
    import ssmtrim
    from ssmtrim.checkpoint import check_output
    from ssmtrim.devices import check_device
    from ssmtrim.distributed import sharded
    from ssmtrim.outputs import REPORT
    from ssmtrim.report import build_report, fit_columns, table_rows, write_report

    check_device(device)
    inputs = {**{f"the model {m!r}": m for m in models}, "the --data folder": data, "the --calib folder": calib,
              "the --labels file": labels}
    check_output(output, force, inputs, kind=REPORT)
    if calib is not None and not Path(calib).is_dir():
        what = "does not exist" if not Path(calib).exists() else "is not a folder"
        raise ConfigError(f"--calib {str(calib)!r} {what}; give a folder of calibration images, or leave --calib out "
                          "(the sweep then calibrates on the first images of --data).")
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be at least 1.")
    if sweep is None and len(models) < 2:
        raise ConfigError("give the dense model and at least one pruned folder, or --sweep keep=... / flops=....")
    layer_list = parse_layers(layers)
    size = parse_img_size(img_size)  # every model at that size (a pruned folder only at its own)
    dense = ssmtrim.load_model(models[0], img_size=size)
    pruned = [(m, ssmtrim.load_model(m, img_size=size)) for m in models[1:]]
    # under torchrun the ranks split the images, rank 0 alone measures speed, prints and writes
    with sharded(device) as (rank, _), ProgressRenderer(quiet or json_out or rank != 0) as progress:
        result = build_report(dense, data, pruned, sweep=sweep, layers=layer_list,
                              arrangements=tuple(a for a in arrangements.split(",") if a) if arrangements else None,
                              strategy={k: v for k, v in {**strategy_fields(score, None, gap, conv),
                                                          "options": parse_options(option)}.items()
                                        if v is not None}, task=task, calib=calib,
                              num_images=num_images, batch_size=batch_size, speed=not no_speed, repeats=repeats,
                              device=device, labels_file=labels, progress=progress, dense_name=models[0],
                              skip_unknown_classes=skip_unknown_classes, runtime=runtime)
    if rank != 0:
        return
    folder = write_report(result, output, force=force, inputs=inputs)
    if json_out:
        print_json({**result, "output": str(folder)})
        return
    header, rows = fit_columns(*table_rows(result, compact=True), console.width)
    table = Table(title=f"ssmtrim report: {result['num_images']} images, batch {result['batch_size']} on "
                  f"{result['device']}", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(f"wrote {folder}/report.json, report.md (all columns) and plots")
