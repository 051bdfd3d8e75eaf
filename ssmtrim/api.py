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
    skip_unknown_classes: bool = False,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Load ``source``, calibrate ``config`` on images of ``data``, prune, compare with dense on those images, and
    write the pruned checkpoint folder ``output`` (nothing is written when it is None). Returns the summary that the
    CLI prints.

    ``config`` is a plan, or a dict of the PruneConfig fields the user gave (None: not given), completed by the
    model family's recommended plan once the model is loaded (for the dict's optional ``"task"``: "classify", the
    default, or "dense"; see :meth:`PruneConfig.recommended`). With a FLOPs ``target`` the plan's layers and keep
    ratio are replaced by the schedule :func:`ssmtrim.pruning.schedule.search_schedule` finds (or, with
    ``target.keep_layers``, only the keep ratio is solved for); a target the plan cannot reach takes the plan its
    strategy offers to reach further (:func:`ssmtrim.pruning.schedule.reachable_plan`, said in a note) unless that
    changes an option the user set (the dict's ``"options"``, or every option of a PruneConfig given). With
    ``eval_data`` (a labelled folder) dense and pruned are also evaluated there (``summary["evaluation"]``). A model
    that records its class names has the class folders of ``data`` and ``eval_data`` matched by name
    (``skip_unknown_classes``: leave out the folders that are not among them instead of refusing). Inside
    :func:`ssmtrim.distributed.sharded` each rank reads and runs its block of the images, every rank gets the
    one-process summary, and rank 0 alone writes. ``img_size`` (N or (H, W)) prunes the model loaded for that input
    size (see :func:`ssmtrim.load_model`)."""
    from ssmtrim.checkpoint import check_output, load_model, save_pruned
    from ssmtrim.data import check_eval_data, map_to_classes, scan_folder
    from ssmtrim.distributed import is_main, leading, local_prefix, shard_images, sum_counts, work_split
    from ssmtrim.evaluate import compare_logits, label_images, predict
    from ssmtrim.models.loading import class_names_of, data_config_of
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning import is_pruned, reduce_on
    from ssmtrim.pruning.calibrate import load_images
    from ssmtrim.pruning.engine import check_plan_for

    inputs = {"the source model": source, "the --data folder": data, "the --eval-data folder": eval_data}
    if output is not None:
        check_output(output, force, inputs)
    if count_flops or target is not None:  # the counts trace with fvcore: missing, it is said before the work
        from ssmtrim.flops import require_fvcore

        require_fvcore("" if target is not None else " or pass --no-flops (count_flops=False) to leave the counts out")
    num_images, batch_size = calibration.num_images, calibration.batch_size
    images_set = scan_folder(data).subset(num_images, calibration.seed)
    world = work_split()[1]
    if len(images_set) < world:
        raise ConfigError(f"{len(images_set)} calibration images for {world} processes; give at least one image per "
                          "process (--num-images, --data) or start fewer processes.")
    model = load_model(source, arch=arch, revision=revision, img_size=img_size)
    if is_pruned(model):
        raise ConfigError(f"{source} is already pruned; prune the dense model it came from instead.")
    classes = class_names_of(model)
    if classes is not None:  # class folders matched by name, never by their sorted position
        images_set = map_to_classes(scan_folder(data), classes, skip_unknown_classes).subset(num_images,
                                                                                          calibration.seed)
    if eval_data is not None:  # a bad --eval-data is one sentence now, not after the calibration
        check_eval_data(eval_data, lambda images: label_images(images, model.config.num_classes, None, classes,
                                                                skip_unknown_classes))
    # the options the user set are held as given (a FLOPs target they cannot reach is refused, not worked around)
    held = set(dict(config.get("options") or {})) if isinstance(config, dict) else set(dict(config.options))
    if isinstance(config, dict):
        config = PruneConfig.recommended(model, **config)
    if target is None or target.keep_layers:
        config.validate_for(family_of(model).depth(model.config))
    check_plan_for(model, config, runnable=False)  # what the plan asks of the model: one sentence before the work
    if target is not None:  # a FLOPs target the plan cannot reach: one sentence before the work too
        from ssmtrim.pruning.schedule import FlopsModel, fitted_plan, keep_for, reachable_plan, refuse_unreachable
        from ssmtrim.pruning.strategies import get_strategy

        dense_estimate = FlopsModel(model, target.convention)
        config = reachable_plan(model, config, target.ratio, target.convention,
                                config.layers if target.keep_layers else None, held, dense_estimate)
        estimate = dense_estimate.for_plan(config)
        if target.keep_layers:
            keep = keep_for(estimate, config.layers, target.ratio)
            if keep is None:
                hint = get_strategy(config.arrangement).reach_hint(config)
                raise ConfigError(f"--flops {target.ratio:g} cannot be reached by pruning after blocks "
                                  f"{','.join(map(str, config.layers))}{hint}; prune earlier or ask for fewer savings.")
            config = fitted_plan(dense_estimate, config, config.layers, keep, target.ratio, held)
            config = config.replace(keep=(keep,) * len(config.layers))
        else:
            refuse_unreachable(estimate, config, target.ratio, target.convention)
    images, labels, unreadable = load_images(shard_images(images_set), data_config_of(model), batch_size, progress,
                                             calibration.workers)
    unreadable = sum_counts(unreadable)[0]
    if config.compensate != "none" and len(images_set) - unreadable < 2:  # compensate() would say so after calibrating
        raise ConfigError(f"--compensate {config.compensate} needs at least 2 calibration images, got "
                          f"{len(images_set) - unreadable}; give more with --data or --num-images, or pass "
                          "--compensate none.")
    if images_set.labelled and len(images_set.classes) != getattr(model.config, "num_classes", -1):
        labels = None  # folder classes do not match the head: agreement with dense only
    dense_logits = predict(model, images, batch_size, progress, "dense forward")
    dense_flops = gflops(model) if count_flops else {}
    search = None
    if target is not None and not target.keep_layers:
        from ssmtrim.pruning.schedule import search_schedule

        n = local_prefix(images.shape[0], target.search_images)  # (this rank's share of) the first search images
        search = search_schedule(model, config, target.ratio, images[:n], dense_logits[:n], target.convention,
                                 batch_size, progress, held)
        config = search.plan(config)
    allocation = None
    if target is not None and target.allocate and len(config.layers) > 1:
        from ssmtrim.pruning.schedule import allocate_keeps

        n = local_prefix(images.shape[0], target.search_images)
        keeps, tried = allocate_keeps(model, config, target.ratio, images[:n], dense_logits[:n], target.convention,
                                      batch_size, progress=progress)
        config, allocation = config.replace(keep=keeps), {"keep": list(keeps), "candidates": tried}
    calibrated, compensation = reduce_on(model, config, images, batch_size, progress, unreadable)
    config = model.prune_config
    pruned_logits = predict(model, images, batch_size, progress, "pruned forward")
    comparison = compare_logits(dense_logits, pruned_logits, labels)
    summary: dict[str, Any] = {
        "source": str(source),
        "data": str(data),
        "plan": config.to_dict(),
        # mean tokens entering each block, over the first batch of images
        "tokens_per_block": _tokens_per_block(model, images, batch_size),
        "comparison": comparison.to_dict(),
        "calibration": calibrated.to_dict(),
        "compensation": None if compensation is None else compensation.to_dict(),
        "unreadable": unreadable,
    }
    if search is not None:
        summary["schedule_search"] = search.to_dict()
    if allocation is not None:
        summary["keep_allocation"] = allocation
    if count_flops:
        flop_images = leading(images, 16) if config.mode == "threshold" else None  # the first 16 of all ranks
        summary["flops"] = {c: {"dense": d, "pruned": p, "ratio": p / d}
                            for (c, d), p in zip(dense_flops.items(), gflops(model, flop_images).values(), strict=True)}
    if eval_data is not None:
        from ssmtrim.evaluate import dense_of, evaluate

        summary["evaluation"] = {"data": str(eval_data), **evaluate(
            model, eval_data, dense=dense_of(model), batch_size=batch_size, progress=progress,
            skip_unknown_classes=skip_unknown_classes).to_dict()}
    written = output is not None and is_main()
    summary["output"] = str(save_pruned(model, output, summary, force=force, inputs=inputs)) if written else None
    return summary


def _tokens_per_block(model: torch.nn.Module, images: torch.Tensor, first: int) -> list[float]:
    """Mean tokens entering each block over the ``first`` images (over every rank's share of them inside
    :func:`ssmtrim.distributed.sharded`)."""
    from ssmtrim.distributed import local_prefix, sum_counts, sum_tensor
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning import reduced_forward

    k = local_prefix(images.shape[0], first)
    tokens = torch.zeros(family_of(model).depth(model.config), dtype=torch.float64)
    if k:
        tokens = torch.tensor(reduced_forward(model, images[:k]).stats.tokens_per_block, dtype=torch.float64) * k
    return (sum_tensor(tokens) / sum_counts(k)[0]).tolist()




def export_model(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 1,
    dynamic_batch: bool = False,
    check_data: str | os.PathLike | None = None,
    check_images: int | None = None,
    force: bool = False,
    optimize: bool = False,
    arch: str | None = None,
    revision: str | None = None,
    img_size: int | tuple[int, int] | None = None,
    progress=None,
) -> dict[str, Any]:
    """Load ``source`` (dense, or a reduced ssmtrim folder with a count-mode plan), export it to the ONNX file
    ``output`` for ``batch_size`` images (``dynamic_batch``: any number per call), and check it in onnxruntime
    against PyTorch on ``check_images`` images (default 200) of ``check_data`` (default: the bundled held-out
    CIFAR-10 images), transformed by the model's preprocessing; ``check_images=0`` skips the check. See
    :func:`ssmtrim.export.export_onnx`."""
    from ssmtrim.bundled import validation_images
    from ssmtrim.checkpoint import load_model
    from ssmtrim.data import scan_folder
    from ssmtrim.export import (
        DEFAULT_CHECK_IMAGES,
        check_exportable,
        check_output_file,
        export_onnx,
        require_export_packages,
    )
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.pruning.calibrate import load_images

    require_export_packages()
    count = DEFAULT_CHECK_IMAGES if check_images is None else check_images
    if count < 0:
        raise ConfigError(f"--check-images must be 0 or more, got {count}.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}.")
    folder = check_data if check_data is not None else validation_images()
    if count and not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise ConfigError(f"--check-data {os.fspath(folder)!r} {what}; give a folder of images, or leave --check-data "
                          "out (the bundled held-out images).")
    inputs = {"the source model": os.fspath(source), "the check images": os.fspath(folder)}
    check_output_file(output, force, inputs)  # before loading: a bad -o fails at once
    images = scan_folder(folder) if count else None  # a bad folder too
    model = load_model(source, arch=arch, revision=revision, img_size=img_size)
    check_exportable(model)
    x = None
    if images is not None:
        x = load_images(images.subset(count, seed=0), data_config_of(model), progress=progress)[0]
    summary = export_onnx(model, output, batch_size=batch_size, dynamic_batch=dynamic_batch, check_images=x,
                          force=force, optimize=optimize, inputs=inputs, progress=progress)
    return {"model": os.fspath(source), **summary}
