"""High-level library calls that the CLI commands wrap one to one."""

from __future__ import annotations

import os
from typing import Any

import torch

from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig


def gflops(model: torch.nn.Module, images: torch.Tensor | None = None) -> dict[str, float]:
    """GFLOPs per image in the two conventions (see :mod:`ssmtrim.flops`), from one trace; pass real ``images``
    when the token counts depend on them (threshold mode)."""
    from ssmtrim.flops import count_flops_all

    return {c: r.gflops for c, r in count_flops_all(model, images=images).items()}


def prune_and_save(
    source: str | os.PathLike,
    config: PruneConfig,
    data: str | os.PathLike,
    output: str | os.PathLike | None,
    num_images: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    arch: str | None = None,
    revision: str | None = None,
    force: bool = False,
    progress=None,
    count_flops: bool = True,
    flops_target: float | None = None,
    flops_convention: str = "full",
    search_images: int = 64,
    layers_given: bool = False,
    eval_data: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load ``source``, calibrate ``config`` on images of ``data``, prune, compare with dense on those images, and
    write the pruned checkpoint folder ``output`` (nothing is written when it is None). Returns the summary that the
    CLI prints.

    With ``flops_target`` (a fraction of the dense FLOPs) the layers and keep ratio of ``config`` are replaced by the
    schedule :func:`ssmtrim.pruning.schedule.search_schedule` finds on the first ``search_images`` images; with
    ``layers_given`` too, the layers stay and only the keep ratio that meets the target is solved for. With
    ``eval_data`` (a labelled folder) dense and pruned are also evaluated there (``summary["evaluation"]``)."""
    from ssmtrim.checkpoint import check_output, save_pruned
    from ssmtrim.data import scan_folder
    from ssmtrim.evaluate import compare_logits, predict
    from ssmtrim.models.loading import data_config_of, load_model
    from ssmtrim.pruning import apply_pruning, is_pruned
    from ssmtrim.pruning.calibrate import calibrate, load_images

    if output is not None:
        check_output(output, force)
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}.")
    images_set = scan_folder(data).subset(num_images, seed)
    model = load_model(source, arch=arch, revision=revision)
    if is_pruned(model):
        raise ConfigError(f"{source} is already pruned; prune the dense model it came from instead.")
    if flops_target is None:
        config.validate_for(model.config.depth)
    images, labels, unreadable = load_images(images_set, data_config_of(model), batch_size, progress)
    if images_set.labelled and len(images_set.classes) != getattr(model.config, "num_classes", -1):
        labels = None  # folder classes do not match the head: agreement with dense only
    dense_logits = predict(model, images, batch_size, progress, "dense forward")
    dense_flops = gflops(model) if count_flops else {}
    search = None
    if flops_target is not None and layers_given:
        from ssmtrim.pruning.schedule import FlopsModel, keep_for

        config.validate_for(model.config.depth)
        keep = keep_for(FlopsModel(model, flops_convention), config.layers, flops_target)
        if keep is None:
            raise ConfigError(f"--flops {flops_target:g} cannot be reached by pruning after blocks "
                              f"{','.join(map(str, config.layers))}; prune earlier or ask for fewer savings.")
        config = config.replace(keep=(keep,) * len(config.layers))
    elif flops_target is not None:
        from ssmtrim.pruning.schedule import search_schedule

        n = min(search_images, images.shape[0])
        search = search_schedule(model, config, flops_target, images[:n], dense_logits[:n], flops_convention,
                                 batch_size, progress)
        config = config.replace(layers=search.chosen.layers, keep=(search.chosen.keep,))
    calibration = calibrate(model, config, images, batch_size, progress, unreadable)
    config = config.replace(thresholds=calibration.thresholds)
    apply_pruning(model, config)
    pruned_logits = predict(model, images, batch_size, progress, "pruned forward")
    comparison = compare_logits(dense_logits, pruned_logits, labels)
    summary: dict[str, Any] = {
        "source": str(source),
        "plan": config.to_dict(),
        "tokens_per_block": model.last_stats.tokens_per_block if model.last_stats else [],
        "comparison": comparison.to_dict(),
        "calibration": calibration.to_dict(),
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
