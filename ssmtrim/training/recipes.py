"""Training recipes: a registered architecture from scratch (the bundled CIFAR-10 models) and the short fine-tune of
a pruned model with pruning active and distillation from its dense teacher. Each writes an ssmtrim folder (weights,
``config.json`` with the recipe and the curve, a model card) beside the loop's log and resumable state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssmtrim.devices import check_device
from ssmtrim.errors import ConfigError
from ssmtrim.outputs import (
    LOG_NAME,
    RUN,
    STATE_NAME,
    Inputs,
    clear_own_output,
    inspect_output,
    not_own_output,
)  # fmt: skip
from ssmtrim.training.config import Log, Progress, TrainConfig
from ssmtrim.training.data import check_labelled_eval_data, load_folder
from ssmtrim.training.distributed import barrier, dist_info, init_distributed
from ssmtrim.training.loop import evaluate_set, fit


def train_from_scratch(
    model_name: str,
    data: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    eval_data: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
    log: Log | None = None,
    init: str | os.PathLike | None = None,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train a registered architecture (e.g. ``vim_cifar``) on a class-folder image set and write an ssmtrim folder
    to ``output`` (weights, config with the recipe and curve, model card, log, state).

    The weights start random, or from ``init``: a dense checkpoint of the same architecture whose training this run
    continues with a fresh schedule (its own training record is kept in the new config under ``previous``).
    ``img_size`` (N or (H, W)) trains the architecture at another input size (its token grid follows; an ``init``
    checkpoint is resized to it as ``load_model(..., img_size=...)`` does)."""
    from ssmtrim.checkpoint import save_model_into
    from ssmtrim.models.registry import create_model, get_spec
    from ssmtrim.models.resize import resize_model, size_text

    check_device(device)
    spec = get_spec(model_name)
    out = Path(output)
    rank, _ = init_distributed(device)
    inputs = {"the --data folder": data, "the --eval-data folder": eval_data, "the --init checkpoint": init}
    clear = _prepare_output(output, resume, force, "training", inputs)
    torch.manual_seed(cfg.seed)
    model = create_model(model_name)
    model.data_config = spec.data
    if img_size is not None:  # checked (whole patches, ...) before any image is read
        model = resize_model(model, img_size).train()
    data_cfg = model.data_config
    size = tuple(data_cfg.input_size[-2:])  # (H, W)
    shown = progress if rank == 0 else None
    check_labelled_eval_data(eval_data)
    train_set = load_folder(data, spec.arch.num_classes, size, shown)
    eval_set = load_folder(eval_data, spec.arch.num_classes, size, shown, train_set.classes, eval_data=data_cfg) \
        if eval_data is not None else None
    model.class_names = list(train_set.classes)  # recorded in config.json: later commands match folders by name
    previous = _init_from(model, init, img_size) if init is not None else None
    with _run_folder(out, clear):
        result = fit(model, train_set, cfg, out, data_cfg, eval_set=eval_set, resume=resume, device=device,
                     progress=progress, log=log)
    model.to("cpu")
    final = result["history"][-1] if result["history"] else {}
    extra = {"training": {"from": "scratch" if init is None else str(init), "architecture": model_name,
                          "data": str(data),
                          "eval_data": None if eval_data is None else str(eval_data), "classes": train_set.classes,
                          "train_images": len(train_set), "recipe": cfg.to_dict(), "curve": result["history"]}}
    if previous is not None:
        extra["training"]["previous"] = previous
    if rank == 0:
        card = _training_card(model_name if img_size is None else f"{model_name} at {size_text(img_size)}", init,
                              data, eval_data, cfg, len(train_set), None if eval_set is None else len(eval_set),
                              final, result["history"])
        save_model_into(model, out, extra_config=extra, readme=card)
    return {"output": str(out), **final, "history": result["history"]}


def _training_card(model_name: str, init: str | os.PathLike | None, data: str | os.PathLike,
                   eval_data: str | os.PathLike | None, cfg: TrainConfig, train_images: int, eval_images: int | None,
                   final: dict[str, Any], history: list[dict[str, Any]]) -> str:
    origin = "from scratch" if init is None else f"from `{init}`"
    lines = [f"# {model_name} trained {origin} with ssmtrim", "",
             f"{train_images} training images from `{data}`, {cfg.epochs} epochs "
             f"(batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, label smoothing "
             f"{cfg.label_smoothing:g}, augmentation `{cfg.augment}`).", ""]
    if "eval_top1" in final:
        lines += [f"Top-1 on `{eval_data}` ({eval_images} images): {final['eval_top1']:.2f}% "
                  f"(top-5 {final['eval_top5']:.2f}%).", ""]
    lines += ["| epoch | wall (s) | eval top-1 |", "|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['wall_s']:.0f} | {r.get('eval_top1', float('nan')):.2f} |" for r in history]
    return "\n".join(lines) + "\n"


def _init_from(model: nn.Module, init: str | os.PathLike,
               img_size: int | tuple[int, int] | None = None) -> dict[str, Any] | None:
    """Copy the weights of the dense checkpoint ``init`` (resized to ``img_size`` when given) into ``model`` (same
    architecture); return its training record, if it has one."""
    from ssmtrim.checkpoint import load_model
    from ssmtrim.pruning import is_pruned

    source = load_model(init, img_size=img_size)
    if is_pruned(source):
        raise ConfigError(f"{str(init)!r} is pruned; --init takes a dense checkpoint (use ssmtrim finetune for "
                          "pruned ones).")
    if source.config != model.config:
        raise ConfigError(f"{str(init)!r} is a different architecture from the one being trained; give a checkpoint "
                          "of the same architecture, or no --init.")
    model.load_state_dict(source.state_dict())
    return source.source.folder_config.get("training")


def _prepare_output(output: str | os.PathLike, resume: bool, force: bool, what: str, inputs: Inputs) -> bool:
    """Check the run folder before any work (nothing is written here): clear of the ``inputs``, writable, and
    either new or empty, or ssmtrim's own run to continue (``resume``) or to start over (``force``). Returns whether
    it must be cleared first, which :func:`_run_folder` does once the run starts."""
    out, text, occupied = inspect_output(output, inputs, replacing=not resume, kind=RUN)  # a resume deletes nothing
    if resume and not (out / STATE_NAME).is_file():
        # a run stopped before its first saved state left a folder: starting over must replace it (--force)
        how = "run again with --force instead of --resume to start over" if occupied else "drop --resume to start a " \
              "new run"
        raise ConfigError(f"--resume: {text!r} holds no training state ({STATE_NAME}) to continue; {how}.")
    if occupied and not (resume or force):
        again = f"pass --resume to continue its {what}, " if (out / STATE_NAME).is_file() else ""
        raise ConfigError(f"output folder {text!r} already exists; {again}pass --force to start over, or choose "
                          "another -o.")
    return occupied and not resume


@contextlib.contextmanager
def _run_folder(out: Path, clear: bool) -> Iterator[None]:
    """The run: the folder cleared first when ``clear`` (--force on ssmtrim's own run); if the run fails before it
    saved any state, what it wrote is removed again, so no folder is left behind that only asks for --resume."""
    main = dist_info()[0] == 0
    if main and clear:
        clear_own_output(out)
    barrier()
    before = set(os.listdir(out)) if out.is_dir() else None
    try:
        yield
    except BaseException:
        if main and out.is_dir() and not (out / STATE_NAME).exists():
            if before is None and not_own_output(out) is None:
                shutil.rmtree(out, ignore_errors=True)
            elif before is not None:
                for name in set(os.listdir(out)) - before:
                    if name == LOG_NAME:
                        (out / name).unlink(missing_ok=True)
        raise


def teacher_for(model: nn.Module, teacher: str | os.PathLike | None = None) -> nn.Module:
    """The distillation teacher of a pruned model: ``teacher`` if given; else the dense weights the pruned folder
    holds (pruning never changes weights, so they are its dense source's), unless it was already fine-tuned, in
    which case its recorded dense source is loaded. Either is loaded at the pruned model's input size (a square
    dense source of a model pruned at (H, W) has its position embedding interpolated)."""
    from ssmtrim.checkpoint import load_model
    from ssmtrim.evaluate import check_compatible, dense_of

    size = model.config.img_size
    if teacher is not None:
        found = load_model(teacher, img_size=size)
        check_compatible(model, found, "--teacher")
        return found
    source = getattr(model, "source", None)
    config = getattr(source, "folder_config", None) or {}
    if "finetune" not in config:
        return dense_of(model)
    origin = (config.get("finetune") or {}).get("dense_source")
    if origin:
        try:
            found = load_model(origin, img_size=size)
            check_compatible(model, found)
            return found
        except Exception as exc:  # noqa: BLE001 - reported as one clear sentence below
            raise ConfigError(f"{source.path!r} was fine-tuned from {origin!r}, which cannot be loaded ({exc}); pass "
                              "the dense model with --teacher.") from exc
    raise ConfigError(f"{source.path!r} was fine-tuned and records no dense source; pass the dense model with "
                      "--teacher, or --distill-weight 0.")


def finetune(
    pruned: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    cfg: TrainConfig,
    eval_data: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    progress: Progress | None = None,
    log: Log | None = None,
    skip_unknown_classes: bool = False,
    img_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Fine-tune a pruned checkpoint folder with pruning active, distilling from its dense teacher; write a pruned
    folder in the format ``ssmtrim prune`` writes (plus the recipe and metrics), the log and the resumable state.
    ``img_size`` (N or (H, W)) checks the size the folder was pruned at (a pruned model keeps its size)."""
    from ssmtrim.checkpoint import load_model, save_model_into
    from ssmtrim.models.loading import class_names_of, data_config_of
    from ssmtrim.pruning import is_pruned

    check_device(device)
    out = Path(output)
    inputs = {"the pruned model": pruned, "the --data folder": data, "the --eval-data folder": eval_data,
              "the --teacher model": teacher}
    clear = _prepare_output(output, resume, force, "fine-tune", inputs)
    model = load_model(pruned, img_size=img_size)
    if not is_pruned(model):
        raise ConfigError(f"{str(pruned)!r} is not pruned; prune it first (ssmtrim prune) or train it with "
                          "ssmtrim train.")
    rank, world = init_distributed(device)
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    teach = teacher_for(model, teacher) if cfg.distill_weight > 0 else None
    data_cfg = data_config_of(model)
    size = tuple(data_cfg.input_size[-2:])  # (H, W): non-square models train on non-square images
    shown = progress if rank == 0 else None
    classes = class_names_of(model)  # folders matched to the model's recorded classes by name
    check_labelled_eval_data(eval_data, classes, skip_unknown_classes)
    train_set = load_folder(data, model.config.num_classes, size, shown, classes, skip_unknown_classes)
    eval_set = load_folder(eval_data, model.config.num_classes, size, shown, classes or train_set.classes,
                           skip_unknown_classes, eval_data=data_cfg) if eval_data is not None else None
    model.to(device)  # where fit trains it; the accuracy before fine-tuning is measured there too
    before = evaluate_set(model, eval_set, data_cfg, device=device) if eval_set is not None and rank == 0 else None
    torch.manual_seed(cfg.seed)
    with _run_folder(out, clear):
        result = fit(model, train_set, cfg, out, data_cfg, eval_set=eval_set, teacher=teach, resume=resume,
                     device=device, progress=progress, log=log)
    model.to("cpu")
    final = result["history"][-1] if result["history"] else {}
    source_cfg = getattr(getattr(model, "source", None), "folder_config", None) or {}
    origin = (source_cfg.get("finetune") or {}).get("dense_source") or (source_cfg.get("source") or {}).get("source")
    info = {"from": str(pruned), "dense_source": origin, "teacher": str(teacher) if teacher else "dense weights of "
            "the pruned folder", "data": str(data), "eval_data": None if eval_data is None else str(eval_data),
            "train_images": len(train_set), "world_size": world, "recipe": cfg.to_dict(),
            "before": before, "curve": result["history"]}
    if rank == 0:
        save_model_into(model, out, extra_config={"calibration": source_cfg.get("calibration"), "finetune": info},
                        readme=_finetune_card(model, info, final))
    return {"output": str(out), "before": before, **final, "history": result["history"], "world_size": world}


def _finetune_card(model: nn.Module, info: dict[str, Any], final: dict[str, Any]) -> str:
    plan = model.prune_config
    r = info["recipe"]
    lines = [
        f"# {model.config.family} pruned and fine-tuned with ssmtrim", "",
        f"From `{info['from']}` (dense source `{info['dense_source']}`): token pruning after blocks "
        f"{', '.join(map(str, plan.layers))} keeping {', '.join(f'{k:.3f}' for k in plan.keep)}, `{plan.arrangement}`, "
        f"then {r['epochs']} epochs of fine-tuning with pruning active on {info['train_images']} images "
        f"(AdamW lr {r['lr']:g}, batch {r['batch_size']}, label smoothing {r['label_smoothing']:g}, distillation "
        f"weight {r['distill_weight']:g} at temperature {r['distill_temperature']:g} from {info['teacher']}, "
        f"augmentation `{r['augment']}`, {info['world_size']} process(es)).", "",
    ]
    if info["before"] is not None and "eval_top1" in final:
        lines += [f"Top-1 on `{info['eval_data']}`: {info['before']['top1']:.2f}% before, {final['eval_top1']:.2f}% "
                  "after.", ""]
    lines += ["Load it with `ssmtrim.load_model(\"<this folder>\")`.", ""]
    return "\n".join(lines)
