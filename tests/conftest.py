"""Shared fixtures: checkpoints written in the official layouts (random weights, exact keys and shapes), a Hugging
Face Hub cache filled by the test with no network, and a table of bad sources that must fail with a typed error."""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ssmtrim
from ssmtrim.errors import CheckpointError, SourceNotFoundError, StateDictMismatchError, UnknownModelError


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every tensor so that none keeps a constant init (D = 1, norms = 1, BN running stats 0 / 1...):
    a tensor that failed to load would then change the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 2.0, generator=gen)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)
    return model.eval()


def vim_training_checkpoint(sd: dict[str, torch.Tensor]) -> dict:
    """What hustvl/Vim's main.py saves (DeiT style): the weights under ``model`` next to the training state."""
    params = list(sd)
    ema = dict(sd)  # shares storage with `model` (torch.save stores it once) except the head, so a loader that read
    ema["head.weight"] = sd["head.weight"] + 1.0  # model_ema instead of model would give other logits
    return {
        "model": sd,
        "optimizer": {
            "state": {0: {"step": torch.tensor(300.0), "exp_avg": torch.zeros_like(sd[params[0]]),
                          "exp_avg_sq": torch.zeros_like(sd[params[0]])}},
            "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
                              "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                              "fused": None, "params": list(range(len(params)))}],
        },
        "lr_scheduler": {"t_initial": 300, "lr_min": 1e-5, "cycle_mul": 1.0, "warmup_t": 5, "warmup_lr_init": 1e-6,
                         "t_in_epochs": True, "noise_range_t": None, "base_values": [5e-4], "metric": None,
                         "warmup_steps": [9.98e-05]},
        "epoch": 299,
        "model_ema": ema,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 17},
        "args": argparse.Namespace(
            model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
            batch_size=128, epochs=300, input_size=224, drop=0.0, drop_path=0.0, model_ema=True,
            model_ema_decay=0.99996, opt="adamw", opt_betas=None, clip_grad=None, lr=5e-4, sched="cosine",
            smoothing=0.1, mixup=0.8, cutmix=1.0,
            data_path="/data/imagenet", data_set="IMNET", output_dir="./output/vim_tiny", device="cuda", seed=0,
            resume="", eval=False, dist_eval=True, num_workers=10, pin_mem=True, world_size=8, rank=0, gpu=0,
            distributed=True, dist_url="env://", if_amp=True, color_jitter=0.3, aa="rand-m9-mstd0.5-inc1",
        ),  # fmt: skip
    }


def plainmamba_mmcls_checkpoint(ours: dict[str, torch.Tensor], ema: bool = False) -> dict:
    """What mmcv's save_checkpoint writes for the mmcls PlainMamba: ``meta`` and an OrderedDict ``state_dict`` with
    ``backbone.`` keys and the head under ``head.fc.`` (EMAHook buffers ``ema_*`` optionally)."""
    sd = collections.OrderedDict()
    for key, value in ours.items():
        sd["head.fc." + key[len("head."):] if key.startswith("head.") else "backbone." + key] = value
    if ema:  # PlainMamba's EMACheckpointHook registers one buffer per parameter at the top level of the classifier
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        for key in [k for k in sd if not k.endswith(buffers)]:
            sd["ema_" + key.replace(".", "_")] = torch.zeros_like(sd[key])
    meta = {"mmcls_version": "0.25.0", "mmcv_version": "1.7.1", "epoch": 300, "iter": 375300, "seed": 42,
            "exp_name": "plain_mamba_l1.py", "time": "Thu Mar 14 10:00:00 2024", "config": "model = dict(...)\n",
            "env_info": "sys.platform: linux", "CLASSES": ("tench", "goldfish"),
            "hook_msgs": {"last_ckpt": "work_dirs/epoch_300.pth", "best_score": 77.9}}
    return {"meta": meta, "state_dict": sd}


def official_checkpoint(model: torch.nn.Module) -> dict:
    sd = model.state_dict()
    return vim_training_checkpoint(sd) if model.config.family == "vim" else plainmamba_mmcls_checkpoint(sd)


@pytest.fixture
def write_official(tmp_path) -> Callable[..., tuple[torch.nn.Module, Path]]:
    """``write_official(name, filename=None) -> (model, path)``: a randomised ``create_model(name)`` saved in its
    family's official checkpoint layout."""

    def write(name: str, filename: str | None = None, seed: int = 0) -> tuple[torch.nn.Module, Path]:
        torch.manual_seed(seed)
        model = randomize(ssmtrim.create_model(name), seed)
        path = tmp_path / (filename or f"{name}.pth")
        torch.save(official_checkpoint(model), path)
        return model, path

    return write


class HubCache:
    """A huggingface_hub cache folder, filled the way ``hf_hub_download`` leaves it: ``blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` (a symlink to the blob) and ``refs/main`` holding the commit."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, repo_id: str, filename: str, src: Path, commit: str | None = None, ref: str | None = "main") -> str:
        commit = commit or os.urandom(20).hex()
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        pointer = repo / "snapshots" / commit / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        if ref is not None:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        return commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty Hub cache with HF_HUB_OFFLINE=1. huggingface_hub reads both variables into
    ``huggingface_hub.constants`` at import time (and reads the constants at call time), so both are patched."""
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return HubCache(root)


# ---------------------------------------------------------------------------------------------------------------
# bad sources: each must fail with a typed error (library) and one line + exit code 1 (CLI)


class Arbitrary:
    """A class the loader has never heard of: unpickling it would run its module's code."""

    def __init__(self) -> None:
        self.payload = 1


class RunsCommand:
    """Pickles as ``os.system(command)``: loading it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@dataclass
class BadSource:
    source: str
    error: type[Exception]
    match: str  # a regular expression the message must contain
    arch: str | None = None
    marker: Path | None = None  # a file that must not exist afterwards (nothing was executed)


@pytest.fixture(scope="session")
def tiny_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return {name: randomize(ssmtrim.create_model(name)).state_dict() for name in ("vim_test", "plainmamba_test")}


BAD_CASES = ("unknown_name", "missing_file", "empty_file", "truncated_pth", "truncated_safetensors", "random_bytes_pth",
             "random_pickle_bytes", "random_bytes_safetensors", "runs_command", "arbitrary_class", "no_tensors",
             "unknown_model", "missing_key", "unexpected_key", "wrong_shape", "wrong_size_arch", "other_family_arch",
             "other_family_arch_vim", "nan_weight", "inf_weight")  # fmt: skip


@pytest.fixture(params=BAD_CASES)
def bad_source(request, tmp_path, tiny_state_dicts) -> BadSource:
    from safetensors.torch import save_file

    vim = dict(tiny_state_dicts["vim_test"])
    plain = dict(tiny_state_dicts["plainmamba_test"])
    rng = random.Random(0)
    case = request.param
    path = tmp_path / f"{case}.pth"

    def truncated(data: bytes, suffix: str) -> Path:
        p = path.with_suffix(suffix)
        p.write_bytes(data[: len(data) // 2])
        return p

    if case == "unknown_name":
        return BadSource("vim_enormous", UnknownModelError, "unknown model 'vim_enormous'")
    if case == "missing_file":
        return BadSource(str(path), SourceNotFoundError, "no such file")
    if case == "empty_file":
        path.write_bytes(b"")
        return BadSource(str(path), CheckpointError, "is empty")
    if case == "truncated_pth":
        torch.save({"model": vim, "epoch": 3}, path)
        return BadSource(str(truncated(path.read_bytes(), ".pth")), CheckpointError, "truncated")
    if case == "truncated_safetensors":
        full = tmp_path / "full.safetensors"
        save_file(vim, str(full))
        return BadSource(str(truncated(full.read_bytes(), ".safetensors")), CheckpointError, "truncated")
    if case == "random_bytes_pth":
        path.write_bytes(b"\x13" + rng.randbytes(4095))
        return BadSource(str(path), CheckpointError, "not a PyTorch checkpoint")
    if case == "random_pickle_bytes":  # starts like a pickle, then garbage
        path.write_bytes(b"\x80\x02" + rng.randbytes(4094))
        return BadSource(str(path), CheckpointError, "truncated or corrupt")
    if case == "random_bytes_safetensors":
        p = path.with_suffix(".safetensors")
        p.write_bytes(rng.randbytes(4096))
        return BadSource(str(p), CheckpointError, "not a readable safetensors file")
    if case == "runs_command":
        marker = tmp_path / "EXECUTED"
        torch.save({"model": vim, "args": RunsCommand(f"touch {marker}")}, path)
        return BadSource(str(path), CheckpointError, r"refuses.*safety|safety", marker=marker)
    if case == "arbitrary_class":
        torch.save({"model": vim, "args": Arbitrary()}, path)
        return BadSource(str(path), CheckpointError, r"Arbitrary.*refuses")
    if case == "no_tensors":
        torch.save({"epoch": 3, "args": {"lr": 0.1}}, path)
        return BadSource(str(path), CheckpointError, "holds no tensors")
    if case == "unknown_model":
        torch.save({"state_dict": {"encoder.weight": torch.ones(3, 3)}}, path)
        return BadSource(str(path), CheckpointError, "not a checkpoint of a supported family")
    if case == "missing_key":
        del vim["layers.1.mixer.D_b"]
        torch.save({"model": vim}, path)
        return BadSource(str(path), StateDictMismatchError, r"missing: layers\.1\.mixer\.D_b")
    if case == "unexpected_key":
        vim["layers.1.mixer.extra"] = torch.ones(3)
        torch.save({"model": vim}, path)
        return BadSource(str(path), StateDictMismatchError, r"not in the architecture: layers\.1\.mixer\.extra")
    if case == "wrong_shape":
        vim["layers.2.mixer.D"] = torch.ones(7)
        torch.save({"model": vim}, path)
        return BadSource(str(path), StateDictMismatchError, r"wrong shape: layers\.2\.mixer\.D \(7,\) vs \(64,\)")
    if case == "wrong_size_arch":  # the right family, the wrong size
        torch.save({"model": vim}, path)
        shapes = r"patch_embed\.proj\.weight \(32, 3, 8, 8\) vs \(192, 3, 16, 16\)"
        return BadSource(str(path), StateDictMismatchError, "wrong shape: .*" + shapes, arch="vim_tiny")
    if case == "other_family_arch":
        torch.save(plainmamba_mmcls_checkpoint(plain), path)
        return BadSource(str(path), CheckpointError, "is a plainmamba checkpoint but .* is vim", arch="vim_tiny")
    if case == "other_family_arch_vim":
        torch.save({"model": vim}, path)
        return BadSource(str(path), CheckpointError, "is a vim checkpoint but .* is plainmamba", arch="plainmamba_l1")
    if case in ("nan_weight", "inf_weight"):
        vim["layers.3.mixer.x_proj.weight"] = vim["layers.3.mixer.x_proj.weight"].clone()
        vim["layers.3.mixer.x_proj.weight"][1, 2] = float("nan") if case == "nan_weight" else float("inf")
        p = path.with_suffix(".safetensors")
        save_file(vim, str(p))
        return BadSource(str(p), CheckpointError, r"non-finite values in layers\.3\.mixer\.x_proj\.weight")
    raise AssertionError(case)

