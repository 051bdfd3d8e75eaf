"""Training: from scratch (the bundled CIFAR-10 models) and the short fine-tune of a pruned model.

One loop serves both. It holds the whole image set in memory as uint8 arrays (decoded once with Pillow and cached),
augments on the fly with tensor ops (random crop with padding or random resized crop, horizontal flip), and
optimises with AdamW under a linear warm-up and cosine schedule, label smoothing, optional distillation from a
teacher's logits, and gradient clipping.

Nothing is lost on interruption: the full training state (weights, optimizer, schedule, step, RNG, the data order's
seed) is written atomically to ``OUT/train_state.pt`` every ``checkpoint_every`` steps and at each epoch end, and
``resume=True`` continues from it with the same data order. Metrics stream to ``OUT/train_log.jsonl``. The state file
holds tensors and plain values only, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.data import ImageSet, load_rgb
from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.registry import DataConfig

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. ``distill_weight`` > 0 needs a teacher."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    augment: str = "crop"  # "crop": pad 4 + random crop + flip (small images); "rrc": random resized crop + flip
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    amp: bool = True  # bf16 autocast on CUDA (never on CPU, where it measured no faster)
    seed: int = 0
    checkpoint_every: int = 200  # steps

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be at least 1.")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("lr must be > 0 and min_lr, weight_decay, warmup_epochs >= 0.")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.distill_weight <= 1:
            raise ConfigError("label smoothing must be in [0, 1) and the distillation weight in [0, 1].")
        if self.distill_temperature <= 0:
            raise ConfigError("the distillation temperature must be > 0.")
        if self.augment not in ("crop", "rrc", "none"):
            raise ConfigError(f"unknown augmentation {self.augment!r}; use crop, rrc or none.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class ArraySet:
    """Images held in memory: ``images`` uint8 (N H W 3), ``labels`` int64 (N)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    unreadable: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def _fit_square(img, size: int):
    """Resize the short side to ``size`` and center-crop a square (a no-op for images already size x size)."""
    from PIL import Image

    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def load_array_set(images: ImageSet, size: int, cache_dir: str | os.PathLike | None = None,
                   progress: Progress | None = None) -> ArraySet:
    """Decode a labelled image set into memory at ``size`` x ``size``; cached by file list and mtimes."""
    if not images.labelled:
        raise ConfigError(f"training needs labelled images (class sub-folders); {images.root!r} has none.")
    key = hashlib.sha256(json.dumps([size, images.paths, [os.path.getmtime(p) for p in images.paths]]).encode())
    cache = Path(cache_dir or Path.home() / ".cache" / "ssmtrim" / "arrays") / f"{key.hexdigest()[:20]}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return ArraySet(z["images"], z["labels"], list(images.classes), int(z["unreadable"]))
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    keep = np.zeros(len(images), dtype=bool)
    for i, path in enumerate(images.paths):
        try:
            out[i] = np.asarray(_fit_square(load_rgb(path), size))
            keep[i] = True
        except (OSError, ValueError, SyntaxError):
            pass
        if progress is not None and (i % 500 == 0 or i == len(images) - 1):
            progress("decoding images", i + 1, len(images))
    labels = np.asarray(images.labels, dtype=np.int64)[keep]
    result = ArraySet(out[keep], labels, list(images.classes), int((~keep).sum()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=result.images, labels=result.labels, unreadable=result.unreadable)
    os.replace(tmp, cache)
    return result


def normalise(batch_u8: Tensor, data: DataConfig) -> Tensor:
    """uint8 (B H W 3) -> normalised float (B 3 H W)."""
    x = batch_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(data.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(data.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(x: Tensor, kind: str, generator: torch.Generator, rrc_scale: tuple[float, float] = (0.35, 1.0)) -> Tensor:
    """Random crop (pad 4, reflect) or random resized crop (3/4..4/3 aspect), then a random horizontal flip."""
    b, _, h, w = x.shape
    if kind == "crop":
        pad = 4
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
        xp = xp.gather(2, rows)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
        x = xp.gather(3, cols)
    elif kind == "rrc":
        area = torch.empty(b).uniform_(*rrc_scale, generator=generator)
        log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        ratio = log_ratio.exp()
        sw = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        sh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sw)
        cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sh)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)


# -------------------------------------------------------------------------------------------------------- helpers


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
def evaluate_arrays(model: nn.Module, data: ArraySet, data_cfg: DataConfig, batch_size: int = 256,
                    device: str | torch.device = "cpu", progress: Progress | None = None) -> dict[str, float]:
    """Top-1 / top-5 of ``model`` on an in-memory set (eval transform = normalisation only: images are at size)."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    n = len(data)
    for start in range(0, n, batch_size):
        x = normalise(torch.from_numpy(data.images[start:start + batch_size]), data_cfg).to(device)
        y = torch.from_numpy(data.labels[start:start + batch_size]).to(device)
        logits = model(x).float()
        top = logits.topk(min(5, logits.shape[-1]), -1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(-1).sum())
        if progress is not None:
            progress("evaluating", min(n, start + batch_size), n)
    model.train(was_training)
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def run_id(cfg: TrainConfig, model: nn.Module, data: ArraySet) -> str:
    """Identifies a run: the recipe, the architecture and the data. A resume file must carry the same id."""
    arch = model.config.to_dict() if hasattr(model, "config") else type(model).__name__
    plan = getattr(model, "prune_config", None)
    blob = json.dumps([cfg.to_dict(), arch, plan.to_dict() if plan is not None else None, len(data),
                       int(data.labels.sum())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable resume file
        raise CheckpointError(f"cannot read the training state {str(path)!r} ({exc}); delete it or drop --resume.") \
            from exc


# ---------------------------------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torchrun``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA); no-op otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def weights_checksum(model: nn.Module) -> float:
    """A float64 checksum of every parameter and buffer, for checking that ranks hold the same weights."""
    with torch.no_grad():
        return float(sum(t.detach().double().abs().sum() + t.detach().double().sum() * (i % 7 + 1)
                         for i, t in enumerate(model.state_dict().values()) if t.is_floating_point()))


# ------------------------------------------------------------------------------------------------------------ fit


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
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; returns the final metrics. See the module docstring for what is written to
    ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out / STATE_NAME, out / LOG_NAME
    if cfg.distill_weight > 0 and teacher is None:
        raise ConfigError("distillation needs a teacher model; give one or set the distillation weight to 0.")
    device = torch.device(device)
    rank, world = dist_info()
    main = rank == 0
    model.to(device).train()
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{len(train)} training images are fewer than one batch of {cfg.batch_size}.")
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    ident = run_id(cfg, model, train)
    step, history = 0, []
    if resume and state_path.exists():
        state = load_state(state_path)
        if state.get("run_id") != ident:
            raise CheckpointError(f"{str(state_path)!r} belongs to another run (different recipe, model or data); "
                                  "use another output folder or drop --resume.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
    elif state_path.exists() and not resume:
        raise ConfigError(f"{str(state_path)!r} exists; pass --resume to continue it, or --force to start over.")
    if cfg.batch_size % world:
        raise ConfigError(f"the batch size {cfg.batch_size} does not split evenly over {world} processes.")
    amp = cfg.amp and device.type == "cuda"

    def checkpoint() -> None:
        if not main:
            return
        _save_state(state_path, {"run_id": ident, "step": step, "model": model.state_dict(),
                                 "optimizer": opt.state_dict(), "history": json.dumps(history),
                                 "config": json.dumps(cfg.to_dict())})

    def emit(record: dict[str, Any]) -> None:
        if not main:
            return
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if log is not None:
            log(record)

    t_start, seen, loss_sum, loss_n = time.perf_counter(), 0, 0.0, 0
    while step < total:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        for i in range(in_epoch, steps_per_epoch):
            # the augmentation draws depend on (seed, step) only, so a resumed run sees the same batches
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
            # every rank draws the same global batch and augmentation, then keeps its share of the images
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size].numpy()
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
            record.update({f"eval_{k}": v for k, v in evaluate_arrays(model, eval_set, data_cfg,
                                                                      device=device).items()})
        history.append(record)
        emit(record)
        checkpoint()
    model.eval()
    return {"steps": step, "history": history, "run_id": ident, "rank": rank, "world_size": world}


# ------------------------------------------------------------------------------------------------ from scratch


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
    log: Callable[[dict[str, Any]], None] | None = None,
    init: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train a registered architecture (e.g. ``vim_cifar``) on a class-folder image set and write an ssmtrim folder
    to ``output`` (weights, config with the recipe and curve, model card, log, state).

    The weights start random, or from ``init``: a dense checkpoint of the same architecture whose training this run
    continues with a fresh schedule (its own training record is kept in the new config under ``previous``)."""
    from ssmtrim.checkpoint import save_model_into
    from ssmtrim.models.registry import create_model, get_spec

    spec = get_spec(model_name)
    out = Path(output)
    rank, _ = init_distributed(device)
    _prepare_output(out, resume, force, "training")
    size = spec.data.input_size[-1]
    train_set = _load_set(data, spec.arch.num_classes, size, progress)
    eval_set = _load_set(eval_data, spec.arch.num_classes, size, progress, train_set.classes) \
        if eval_data is not None else None
    torch.manual_seed(cfg.seed)
    model = create_model(model_name)
    model.data_config = spec.data
    previous = _init_from(model, init) if init is not None else None
    result = fit(model, train_set, cfg, out, spec.data, eval_set=eval_set, resume=resume, device=device,
                 progress=progress, log=log)
    model.to("cpu")
    final = result["history"][-1] if result["history"] else {}
    extra = {"training": {"from": "scratch" if init is None else str(init), "architecture": model_name,
                          "data": str(data),
                          "eval_data": None if eval_data is None else str(eval_data), "classes": train_set.classes,
                          "train_images": len(train_set), "recipe": cfg.to_dict(), "curve": result["history"]}}
    if previous is not None:
        extra["training"]["previous"] = previous
    origin = "from scratch" if init is None else f"from `{init}`"
    lines = [f"# {model_name} trained {origin} with ssmtrim", "",
             f"{len(train_set)} training images from `{data}`, {cfg.epochs} epochs "
             f"(batch {cfg.batch_size}, AdamW lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, label smoothing "
             f"{cfg.label_smoothing:g}, augmentation `{cfg.augment}`).", ""]
    if "eval_top1" in final:
        lines += [f"Top-1 on `{eval_data}` ({len(eval_set)} images): {final['eval_top1']:.2f}% "
                  f"(top-5 {final['eval_top5']:.2f}%).", ""]
    lines += ["| epoch | wall (s) | eval top-1 |", "|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['wall_s']:.0f} | {r.get('eval_top1', float('nan')):.2f} |"
              for r in result["history"]]
    if rank == 0:
        save_model_into(model, out, extra_config=extra, readme="\n".join(lines) + "\n")
    return {"output": str(out), **final, "history": result["history"]}


def _init_from(model: nn.Module, init: str | os.PathLike) -> dict[str, Any] | None:
    """Copy the weights of the dense checkpoint ``init`` into ``model`` (same architecture); return its training
    record, if it has one."""
    from ssmtrim.models.loading import load_model
    from ssmtrim.pruning import is_pruned

    source = load_model(init)
    if is_pruned(source):
        raise ConfigError(f"{str(init)!r} is pruned; --init takes a dense checkpoint (use ssmtrim finetune for "
                          "pruned ones).")
    if source.config != model.config:
        raise ConfigError(f"{str(init)!r} is a different architecture from the one being trained; give a checkpoint "
                          "of the same architecture, or no --init.")
    model.load_state_dict(source.state_dict())
    return source.source.folder_config.get("training")


# ---------------------------------------------------------------------------------------------------- fine-tune


def _prepare_output(out: Path, resume: bool, force: bool, what: str) -> None:
    import shutil

    rank, world = dist_info()
    if out.exists() and not (resume or force):
        raise ConfigError(f"output folder {str(out)!r} already exists; pass --resume to continue its {what}, --force "
                          "to start over, or choose another -o.")
    if rank == 0 and out.exists() and force and not resume:
        shutil.rmtree(out)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _load_set(data: str | os.PathLike, num_classes: int, size: int, progress: Progress | None,
              classes: list[str] | None = None) -> ArraySet:
    from ssmtrim.data import scan_folder

    images = scan_folder(data)
    if images.layout != "class-folders":
        raise ConfigError(f"{str(data)!r} has no class sub-folders; training needs labelled images (DIR/<class>/...).")
    if len(images.classes) != num_classes:
        raise ConfigError(f"{str(data)!r} has {len(images.classes)} classes but the model predicts {num_classes}; "
                          "give a data folder with the model's classes.")
    if classes is not None and images.classes != classes:
        raise ConfigError(f"the class folders of {str(data)!r} differ from those of the training data.")
    return load_array_set(images, size, progress=progress if dist_info()[0] == 0 else None)


def teacher_for(model: nn.Module, teacher: str | os.PathLike | None = None) -> nn.Module:
    """The distillation teacher of a pruned model: ``teacher`` if given; else the dense weights the pruned folder
    holds (pruning never changes weights, so they are its dense source's), unless it was already fine-tuned, in
    which case its recorded dense source is loaded."""
    from ssmtrim.evaluate import check_compatible, dense_of
    from ssmtrim.models.loading import load_model

    if teacher is not None:
        found = load_model(teacher)
        check_compatible(model, found)
        return found
    source = getattr(model, "source", None)
    config = getattr(source, "folder_config", None) or {}
    if "finetune" not in config:
        return dense_of(model)
    origin = (config.get("finetune") or {}).get("dense_source")
    if origin:
        try:
            found = load_model(origin)
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
    log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a pruned checkpoint folder with pruning active, distilling from its dense teacher; write a pruned
    folder in the format ``ssmtrim prune`` writes (plus the recipe and metrics), the log and the resumable state."""
    from ssmtrim.checkpoint import save_model_into
    from ssmtrim.models.loading import data_config_of, load_model
    from ssmtrim.pruning import is_pruned

    model = load_model(pruned)
    if not is_pruned(model):
        raise ConfigError(f"{str(pruned)!r} is not pruned; prune it first (ssmtrim prune) or train it with "
                          "ssmtrim train.")
    out = Path(output)
    rank, world = init_distributed(device)
    if world > 1 and str(device).startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    _prepare_output(out, resume, force, "fine-tune")
    teach = teacher_for(model, teacher) if cfg.distill_weight > 0 else None
    data_cfg = data_config_of(model)
    size = data_cfg.input_size[-1]
    train_set = _load_set(data, model.config.num_classes, size, progress)
    eval_set = _load_set(eval_data, model.config.num_classes, size, progress, train_set.classes) \
        if eval_data is not None else None
    before = evaluate_arrays(model, eval_set, data_cfg, device=device) if eval_set is not None and rank == 0 else None
    torch.manual_seed(cfg.seed)
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
