"""``ssmtrim prune SOURCE --data DIR --layers 5,10,15 --keep 0.8 -o OUT``: calibrate, prune, write a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ssmtrim.cli._errors import handle_errors
from ssmtrim.cli._options import (
    ArchOpt,
    ForceOpt,
    ImgSizeOpt,
    JsonOpt,
    QuietOpt,
    RevisionOpt,
    SkipUnknownClassesOpt,
    parse_img_size,
)
from ssmtrim.cli._prune_options import (
    ArrangementOpt,
    CompensateAlphaOpt,
    CompensateOpt,
    ConvOpt,
    DropFractionOpt,
    GapOpt,
    KeepOpt,
    LayersOpt,
    MetricOpt,
    ModeOpt,
    OptionOpt,
    ScoreOpt,
    TaskOpt,
    parse_floats,
    parse_layers,
    parse_options,
    strategy_fields,
)  # fmt: skip
from ssmtrim.cli._render import ProgressRenderer, console, key_value_table, print_json
from ssmtrim.errors import ConfigError


@handle_errors
def prune(
    source: Annotated[str | None, typer.Argument(help="Dense model: registered name, Hub id[:file], file or folder. "
                                                 "Default: the bundled CIFAR-10 Vim with its bundled images.")]
    = None,
    data: Annotated[Path | None, typer.Option("--data", help="Calibration images: a folder (class sub-folders or "
                                              "flat).")] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", metavar="DIR", help="Folder to write the pruned "
                                               "checkpoint to (default: write nothing, print the summary).")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Labelled held-out images: top-1 of dense "
                                                   "and pruned.")] = None,
    layers: LayersOpt = None,
    keep: KeepOpt = None,
    score: ScoreOpt = None,
    arrangement: ArrangementOpt = None,
    task: TaskOpt = None,
    gap: GapOpt = None,
    conv: ConvOpt = None,
    metric: MetricOpt = None,
    drop_fraction: DropFractionOpt = None,
    compensate: CompensateOpt = None,
    compensate_alpha: CompensateAlphaOpt = None,
    mode: ModeOpt = "count",
    option: OptionOpt = None,
    flops: Annotated[float | None, typer.Option("--flops", help="Instead of --layers/--keep: target fraction of the "
                     "dense FLOPs (e.g. 0.7); ssmtrim searches the schedule closest to dense on the images.")] = None,
    flops_convention: Annotated[str | None, typer.Option("--flops-convention", help="FLOPs convention of --flops: "
                                "paper (the published figures' convention, as report --sweep flops= uses) or full. "
                                "[default: paper]")] = None,
    allocate_keeps: Annotated[bool, typer.Option("--allocate-keeps", help="With --flops: a keep ratio per step, "
                                                 "chosen by measured sensitivity (KL to dense on the images) instead "
                                                 "of one for all steps.")] = False,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="Leave the FLOPs counts out of the summary (they need "
                                           "fvcore).")] = False,
    num_images: Annotated[int, typer.Option("--num-images", help="Calibration images (seeded subset).")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration subset.")] = 0,
    arch: ArchOpt = None,
    revision: RevisionOpt = None,
    img_size: ImgSizeOpt = None,
    force: ForceOpt = False,
    skip_unknown_classes: SkipUnknownClassesOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Calibrate token-importance thresholds, prune the model and write OUT/ (model.safetensors, config.json,
    README.md) that `ssmtrim.load_model(OUT)` rebuilds."""
    from ssmtrim import bundled
    from ssmtrim.api import prune_and_save
    from ssmtrim.checkpoint import check_output
    from ssmtrim.distributed import sharded
    from ssmtrim.pruning.config import CalibrationSettings, FlopsTarget

    if source is None:  # the bundled example, offline
        source = str(bundled.bundled_model())
        data = data or bundled.calibration_images()
        eval_data = eval_data or bundled.validation_images()
        if flops is None and not layers:
            layers, flops, flops_convention = ",".join(map(str, bundled.DEFAULT_LAYERS)), bundled.DEFAULT_FLOPS, \
                bundled.DEFAULT_CONVENTION
    if data is None:
        raise ConfigError("give the calibration images with --data DIR (a folder of images).")
    size = parse_img_size(img_size)
    if output is not None:  # before any long work
        check_output(output, force, {"the source model": source, "the --data folder": data,
                                     "the --eval-data folder": eval_data})
    if flops_convention is not None and flops is None:
        raise ConfigError("--flops-convention says how --flops counts, and there is no --flops; leave it out or add "
                          "--flops.")
    flops_convention = flops_convention or "paper"
    if allocate_keeps and flops is None:
        raise ConfigError("--allocate-keeps shares a FLOPs budget between the steps, and there is no --flops; add "
                          "--flops (e.g. --flops 0.7) or leave it out.")
    if flops is not None and keep is not None:
        raise ConfigError("--flops and --keep conflict: with --flops and --layers ssmtrim solves the keep ratio.")
    if flops is None and not layers:
        raise ConfigError("say where to prune with --layers, e.g. --layers 5,10,15 --keep 0.8, or give --flops 0.7.")
    # the options given; the model family's recommended plan fills the rest once the model is loaded. With --flops
    # (and no --layers) the search replaces layers and keep.
    config = {"layers": parse_layers(layers), "keep": parse_floats(keep, "--keep") if keep else None, "seed": seed,
              "mode": mode, "metric": metric, "drop_fraction": drop_fraction, "compensate": compensate,
              "compensate_alpha": compensate_alpha, "options": parse_options(option),
              **strategy_fields(score, arrangement, gap, conv)}
    if task is not None:
        from ssmtrim.models.registry import check_task

        check_task(task)
        config["task"] = task
    # under torchrun the ranks split the images (gloo: pruning runs on the CPU) and rank 0 alone prints and writes
    with sharded("cpu") as (rank, _), ProgressRenderer(quiet or json_out or rank != 0) as progress:
        summary = prune_and_save(
            source, config, data, output, calibration=CalibrationSettings(num_images, batch_size, seed),
            target=FlopsTarget(flops, flops_convention, keep_layers=bool(layers), allocate=allocate_keeps)
            if flops is not None else None,
            eval_data=eval_data, arch=arch, revision=revision, img_size=size, force=force, progress=progress,
            skip_unknown_classes=skip_unknown_classes, count_flops=not no_flops)
    if rank != 0:
        return
    if json_out:
        print_json(summary)
        return
    cmp, plan = summary["comparison"], summary["plan"]
    rows = [
        ("model", summary["source"]),
        ("output", summary["output"] or "nothing written (no -o)"),
        ("plan", _plan_text(plan)),
        ("tokens per block", " ".join(f"{t:g}" for t in summary["tokens_per_block"])),
        ("calibration images", f"{cmp['num_images']} ({summary['unreadable']} unreadable)"),
        ("agreement with dense top-1, calibration images", f"{100 * cmp['agreement']:.1f}%"),
        ("KL(dense || pruned), calibration images", f"{cmp['kl']:.4f}"),
    ]
    if summary.get("compensation"):
        comp = summary["compensation"]
        rows.append(("compensation", f"{comp['kind']} (α {comp['alpha']:g}, {comp['num_images']} images, "
                     f"{comp['seconds']:.1f} s): feature error {comp['feature_error_before']:.3f} -> "
                     f"{comp['feature_error_after']:.3f}" + (f"; {comp['note']}" if comp["note"] else "")))
    if "schedule_search" in summary:
        found = summary["schedule_search"]
        rows.append(("schedule search", f"{len(found['candidates'])} candidates for {found['target']:g} x dense "
                     f"({found['convention']}); chosen: layers {found['chosen']['layers']} keep "
                     f"{found['chosen']['keep']:.3f}, KL {found['chosen']['kl']:.4f}"))
    if cmp.get("top1") is not None:
        rows.append(("top-1 dense -> pruned, calibration images",
                     f"{100 * cmp['dense_top1']:.1f}% -> {100 * cmp['top1']:.1f}%"))
    for conv, f in summary.get("flops", {}).items():
        saved = 100 * (1 - f["ratio"])
        rows.append((f"GFLOPs ({conv})", f"{f['dense']:.3f} -> {f['pruned']:.3f} ({saved:.1f}% fewer)"))
    for entry in summary["calibration"]["layers"] if plan["mode"] == "threshold" else ():  # count mode uses none
        kept = 100 * entry["kept_fraction"]
        rows.append((f"layer {entry['layer']} threshold",
                     f"{entry['threshold']:.4g} (kept {kept:.1f}% in threshold mode, "
                     f"target {100 * entry['keep']:.0f}%)"))
    console.print(key_value_table("ssmtrim prune", rows))
    if "evaluation" in summary:
        console.print(_eval_table(summary))


def _eval_table(summary: dict):
    from rich.table import Table

    ev, flops = summary["evaluation"], summary.get("flops", {})
    same = os.path.realpath(str(ev["data"])) == os.path.realpath(str(summary.get("data", "")))
    which = "calibration images (--eval-data is --data: not held out)" if same else "held-out images"
    table = Table(title=f"dense vs pruned on {ev['num_images']} {which} ({ev['data']})", title_justify="left")
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right" if col else "left")
    for conv, f in flops.items():
        table.add_row(f"GFLOPs ({conv})", f"{f['dense']:.4f}", f"{f['pruned']:.4f}", f"{100 * (f['ratio'] - 1):+.1f}%")
    if ev.get("top1") is not None:
        for k in ("top1", "top5"):
            dense = ev["dense_" + k]
            table.add_row(f"top-{k[-1]}", f"{dense:.2f}%", f"{ev[k]:.2f}%", f"{ev[k] - dense:+.2f}")
    table.add_row("agreement with dense top-1", "100%", f"{ev['agreement']:.2f}%", "")
    return table


def _plan_text(plan: dict) -> str:
    """One line for a plan: where, how much, and the options its strategy reads."""
    from ssmtrim.pruning.strategies import get_strategy

    strategy = get_strategy(plan["arrangement"])
    read = {o.name for o in strategy.options}
    details = [f"Δ̃ {plan['gap']}"] if "gap" in read else []
    details.append(f"conv {plan.get('conv', 'original')}")
    if "metric" in read:
        details.append(f"similarity {plan['metric']}")
    details += [f"{name.replace('_', ' ')} {value}" for name, value in dict(plan.get("options") or {}).items()]
    return (f"prune after blocks {', '.join(map(str, plan['layers']))} keeping "
            f"{', '.join(f'{k:.3f}' for k in plan['keep'])} {strategy.keeps_what}; {plan['score']} score, "
            f"{plan['arrangement']} ({', '.join(details)}), {plan['mode']} mode")
