"""The training loop shared by training from scratch and fine-tuning.

AdamW under a linear warm-up and cosine schedule, label smoothing, optional distillation from a teacher's logits,
gradient clipping, bf16 autocast on CUDA, data-parallel under ``torchrun``. Nothing is lost on interruption: the full
training state (weights, optimizer, schedule, step, the data order's seed) is written atomically to
``OUT/train_state.pt`` every ``checkpoint_every`` steps and at each epoch end, and ``resume=True`` continues from it
with the same data order and augmentation draws. Metrics stream to ``OUT/train_log.jsonl``. The state file holds
tensors and plain values only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError, SsmtrimError
from ssmtrim.evaluate import evaluate_batches
from ssmtrim.models.registry import DataConfig
from ssmtrim.notices import notice
from ssmtrim.outputs import LOG_NAME, STATE_NAME, output_error
from ssmtrim.training.config import Log, Progress, TrainConfig
from ssmtrim.training.data import ArraySet, augment, normalise
from ssmtrim.training.distributed import dist_info, weights_checksum


def _version() -> str:
    from ssmtrim import __version__

    return __version__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings and the SSM's A_log / D (Mamba's convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf.startswith(("A_", "A_log", "D")) or "pos_embed" in name or "cls_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def loss_fn(logits: Tensor, labels: Tensor, cfg: TrainConfig, teacher_logits: Tensor | None) -> Tensor:
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.distill_weight == 0:
        return loss
    t = cfg.distill_temperature
    kd = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd


@torch.no_grad()
def evaluate_set(model: nn.Module, data: ArraySet, data_cfg: DataConfig, batch_size: int = 256,
                 device: str | torch.device = "cpu", progress: Progress | None = None) -> dict[str, float]:
    """Top-1 / top-5 (percent) of ``model`` on an in-memory set by :func:`ssmtrim.evaluate.evaluate_batches`, the
    images normalised batch by batch (they are already at the model's size, so normalising is the whole eval
    transform); the model's train/eval mode is restored after."""
    was_training = model.training
    batches = ((normalise(torch.from_numpy(data.images[lo:lo + batch_size]), data_cfg),
                torch.from_numpy(data.labels[lo:lo + batch_size])) for lo in range(0, len(data), batch_size))
    result = evaluate_batches(model, batches, total=len(data), device=device, progress=progress)
    model.train(was_training)
    return {"top1": result.top1, "top5": result.top5}


def run_id(cfg: TrainConfig, model: nn.Module, data: ArraySet) -> str:
    """Identifies a run: the recipe, the architecture and the data. A resume file must carry the same id."""
    arch = model.config.to_dict() if hasattr(model, "config") else type(model).__name__
    plan = getattr(model, "prune_config", None)
    blob = json.dumps([cfg.to_dict(), arch, plan.to_dict() if plan is not None else None, len(data),
                       int(data.labels.sum())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def batch_for(num_images: int, batch_size: int, world: int = 1) -> int:
    """Images per step: ``batch_size``, or all ``num_images`` (a multiple of the ``world`` processes) when there are
    fewer, said once on stderr."""
    if num_images >= batch_size:
        return batch_size
    batch = num_images - num_images % world
    if batch < 1:
        raise ConfigError(f"{num_images} training images cannot be split over {world} processes; give more images "
                          "or start fewer processes.")
    notice("small-batch", f"{num_images} training images are fewer than a batch of {batch_size}; every step trains "
           f"on {batch} of them.")
    return batch


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the training state atomically (a temporary file renamed into place); the temporary file is removed on
    every failure path, and a full disk or a permission problem is one sentence naming ``path``."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, SsmtrimError):
            raise output_error(str(path), exc, "the training state") from exc
        if isinstance(exc, RuntimeError) and "write" in str(exc).lower():  # torch's zip writer on a full disk
            raise output_error(str(path), OSError("the write failed; the disk may be full"), "the training state") \
                from exc
        raise


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable resume file
        raise CheckpointError(f"cannot read the training state {str(path)!r} ({exc}); delete it or drop --resume.") \
            from exc


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global random streams a step may draw from beyond its own seeded generator (stochastic depth draws from
    torch's global generator), saved with the state so that a resumed run continues them exactly."""
    state = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], device)


def fit(
    model: nn.Module,
    train: ArraySet,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    data_cfg: DataConfig,
    eval_set: ArraySet | None = None,
    teacher: nn.Module | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; returns the final metrics. See the module docstring for what is written to
    ``out_dir`` (created only once the run is known to start). With fewer images than ``cfg.batch_size`` every step
    takes all of them (said once on stderr). ``resume`` needs a state in ``out_dir``."""
    out = Path(out_dir)
    state_path, log_path = out / STATE_NAME, out / LOG_NAME
    if cfg.distill_weight > 0 and teacher is None:
        raise ConfigError("distillation needs a teacher model; give one or set the distillation weight to 0.")
    if resume and not state_path.is_file():
        raise ConfigError(f"--resume: {str(out)!r} holds no training state ({STATE_NAME}) to continue; drop --resume "
                          "to start a new run.")
    if state_path.exists() and not resume:
        raise ConfigError(f"{str(state_path)!r} exists; pass --resume to continue it, or --force to start over.")
    device = torch.device(device)
    rank, world = dist_info()
    main = rank == 0
    if cfg.batch_size % world:
        raise ConfigError(f"the batch size {cfg.batch_size} does not split evenly over {world} processes.")
    batch = batch_for(len(train), cfg.batch_size, world)
    model.to(device).train()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    steps_per_epoch = len(train) // batch
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ident = run_id(cfg, model, train)
    step, history = 0, []
    if resume:
        state = load_state(state_path)
        if state.get("run_id") != ident:
            raise CheckpointError(f"{str(state_path)!r} belongs to another run (different recipe, model or data); "
                                  "use another output folder or drop --resume.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
        _restore_rng(state, device)
    amp = cfg.amp and device.type == "cuda"

    def checkpoint() -> None:
        if not main:
            return
        save_state(state_path, {"run_id": ident, "step": step, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "history": json.dumps(history),
                                 "config": json.dumps(cfg.to_dict()), **_rng_state(device)})

    def emit(record: dict[str, Any]) -> None:
        if not main:
            return
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if log is not None:
            log(record)

    if main:  # the run folder's first record says who wrote it (ssmtrim replaces only folders it wrote)
        out.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"ssmtrim_version": _version(), "event": "resume" if resume else "start",
                                "step": step, "batch_size": batch}) + "\n")
    t_start, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        for i in range(in_epoch, steps_per_epoch):
            # the augmentation draws depend on (seed, step) only, so a resumed run sees the same batches
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
            # every rank draws the same global batch and augmentation, then keeps its share of the images
            idx = order[i * batch:(i + 1) * batch].numpy()
            x = normalise(torch.from_numpy(train.images[np.sort(idx)]), data_cfg)
            y = torch.from_numpy(train.labels[np.sort(idx)])
            if cfg.augment != "none":
                x = augment(x, cfg.augment, gen, cfg.rrc_scale)
            if world > 1:
                x, y = x[rank::world], y[rank::world]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = lr_at(step, total, warmup, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
                teacher_logits = None
                if teacher is not None and cfg.distill_weight > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
            loss = loss_fn(logits, y, cfg, teacher_logits)
            if not torch.isfinite(loss):
                raise ConfigError(f"the loss became {loss.item()} at step {step}; lower the learning rate.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            opt.step()
            step += 1
            seen += len(y) * world
            loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
            if progress is not None and main:
                progress(f"epoch {epoch + 1}/{cfg.epochs}", i + 1, steps_per_epoch)
            if step % 50 == 0:
                emit({"step": step, "epoch": step / steps_per_epoch, "lr": lr, "loss": loss_sum / loss_n,
                      "images_per_s": seen / (time.perf_counter() - t_start)})
                loss_sum, loss_n = 0.0, 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                checkpoint()
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "wall_s": time.perf_counter() - t_start}
        if world > 1:
            import torch.distributed as dist

            sums: list[Any] = [None] * world
            dist.all_gather_object(sums, weights_checksum(model))
            record.update({"world_size": world, "rank_checksums": sums, "ranks_agree": len(set(sums)) == 1})
        if eval_set is not None and main:
            record.update({f"eval_{k}": v for k, v in evaluate_set(model, eval_set, data_cfg, device=device).items()})
        history.append(record)
        emit(record)
        checkpoint()
    model.eval()
    return {"steps": step, "history": history, "run_id": ident, "rank": rank, "world_size": world}
