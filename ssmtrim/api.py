"""High-level library calls that the CLI commands wrap one to one."""

from __future__ import annotations

import os
from typing import Any

import torch

from ssmtrim.errors import ConfigError
from ssmtrim.pruning.config import CalibrationSettings, FlopsTarget, PruneConfig


def gflops(model: torch.nn.Module, images: torch.Tensor | None = None) -> dict[str, float]:
    """GFLOPs per image in the two conventions (see :mod:`ssmtrim.flops`), from one trace; pass real ``images``
    when the token counts depend on them (threshold mode)."""
    from ssmtrim.flops import count_flops_all

    return {c: r.gflops for c, r in count_flops_all(model, images=images).items()}


def prune_and_save(
    source: str | os.PathLike,
    config: PruneConfig | dict[str, Any],
    data: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    target: FlopsTarget | None = None,
    calibration: CalibrationSettings = CalibrationSettings(),
    eval_data: str | os.PathLike | None = None,
    arch: str | None = None,
    revision: str | None = None,
    force: bool = False,
    count_flops: bool = True,
    progress=None,
) -> dict[str, Any]:
    """Load ``source``, calibrate ``config`` on images of ``data``, prune, compare with dense on those images, and
    write the pruned checkpoint folder ``output`` (nothing is written when it is None). Returns the summary that the
    CLI prints.

    ``config`` is a plan, or a dict of the PruneConfig fields the user gave (None: not given), completed by the
    model family's recommended plan once the model is loaded. With a FLOPs ``target`` the plan's layers and keep
    ratio are replaced by the schedule :func:`ssmtrim.pruning.schedule.search_schedule` finds (or, with
    ``target.keep_layers``, only the keep ratio is solved for). With ``eval_data`` (a labelled folder) dense and
    pruned are also evaluated there (``summary["evaluation"]``)."""
    from ssmtrim.checkpoint import check_output, load_model, save_pruned
    from ssmtrim.data import scan_folder
    from ssmtrim.evaluate import compare_logits, predict
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning import apply_pruning, is_pruned, reduced_forward
    from ssmtrim.pruning.calibrate import calibrate, load_images
    from ssmtrim.pruning.compensation import compensate

    if output is not None:
        check_output(output, force)
    num_images, batch_size = calibration.num_images, calibration.batch_size
    images_set = scan_folder(data).subset(num_images, calibration.seed)
    model = load_model(source, arch=arch, revision=revision)
    if is_pruned(model):
        raise ConfigError(f"{source} is already pruned; prune the dense model it came from instead.")
    if isinstance(config, dict):
        config = PruneConfig.recommended(model, **config)
    if target is None:
        config.validate_for(family_of(model).depth(model.config))
    images, labels, unreadable = load_images(images_set, data_config_of(model), batch_size, progress,
                                             calibration.workers)
    if images_set.labelled and len(images_set.classes) != getattr(model.config, "num_classes", -1):
        labels = None  # folder classes do not match the head: agreement with dense only
    dense_logits = predict(model, images, batch_size, progress, "dense forward")
    dense_flops = gflops(model) if count_flops else {}
    search = None
    if target is not None and target.keep_layers:
        from ssmtrim.pruning.schedule import FlopsModel, keep_for

        config.validate_for(family_of(model).depth(model.config))
        keep = keep_for(FlopsModel(model, target.convention), config.layers, target.ratio)
        if keep is None:
            raise ConfigError(f"--flops {target.ratio:g} cannot be reached by pruning after blocks "
                              f"{','.join(map(str, config.layers))}; prune earlier or ask for fewer savings.")
        config = config.replace(keep=(keep,) * len(config.layers))
    elif target is not None:
        from ssmtrim.pruning.schedule import search_schedule

        n = min(target.search_images, images.shape[0])
        search = search_schedule(model, config, target.ratio, images[:n], dense_logits[:n], target.convention,
                                 batch_size, progress)
        config = config.replace(layers=search.chosen.layers, keep=(search.chosen.keep,))
    calibrated = calibrate(model, config, images, batch_size, progress, unreadable)
    config = config.replace(thresholds=calibrated.thresholds)
    apply_pruning(model, config)
    compensation = compensate(model, images, batch_size)
    pruned_logits = predict(model, images, batch_size, progress, "pruned forward")
    comparison = compare_logits(dense_logits, pruned_logits, labels)
    summary: dict[str, Any] = {
        "source": str(source),
        "plan": config.to_dict(),
        # mean tokens entering each block, over the first batch of images
        "tokens_per_block": reduced_forward(model, images[:batch_size]).stats.tokens_per_block,
        "comparison": comparison.to_dict(),
        "calibration": calibrated.to_dict(),
        "compensation": None if compensation is None else compensation.to_dict(),
        "unreadable": unreadable,
    }
    if search is not None:
        summary["schedule_search"] = search.to_dict()
    if count_flops:
        flop_images = images[: min(len(images), 16)] if config.mode == "threshold" else None
        summary["flops"] = {c: {"dense": d, "pruned": p, "ratio": p / d}
                            for (c, d), p in zip(dense_flops.items(), gflops(model, flop_images).values(), strict=True)}
    if eval_data is not None:
        from ssmtrim.evaluate import dense_of, evaluate

        summary["evaluation"] = {"data": str(eval_data), **evaluate(
            model, eval_data, dense=dense_of(model), batch_size=batch_size, progress=progress).to_dict()}
    summary["output"] = None if output is None else str(save_pruned(model, output, summary, force=force))
    return summary
