"""The GPU check: one command that proves ssmtrim's GPU paths on a fresh machine, in under 8 minutes on one H200.

    python benchmarks/gpu_check.py                  # on the GPU machine, from the repository root
    bash benchmarks/gpu_check.sh                    # the same, after installing carried wheels (.whl/, below)
    python benchmarks/gpu_check.py --dry-run        # any machine: CPU, tiny models and steps, every section's plumbing

Sections (each runs on its own: a failure is recorded with its error and the next section still runs):

1. ``cuda_tests``: ``pytest -m requires_cuda`` over the test files that carry the marker (the mamba-ssm comparisons
   skip, with their reason, where mamba-ssm is not installed).
2. ``scan``: the portable scan (backend ``portable``, looked up in the backend table by name; skipped with a note where
   it is not registered) against ``ref`` on the GPU, fp32, with and without gaps: outputs, final states and the
   gradients of every input, as max absolute errors against the tolerances of the project's CUDA test; a bf16
   forward; and forward / forward+backward times of both at Vim-T's per-layer shape (batch 128, 384 channels,
   197 tokens, 16 states). With mamba-ssm installed, ``cuda`` is compared and timed beside them.
3. ``throughput``: dense against pruned Vim-T, Vim-S and PlainMamba-L1 at their official configurations with random
   weights (a forward's speed does not depend on the weights' values), batch 128, bf16 autocast, 224x224, on the
   scan backend ``auto`` picks there (named in the output); the pruned plan is the family's recommended one at the
   schedules of ``benchmarks/bench_pruning.py``. Per row: GFLOPs (paper and full conventions, fvcore), images/s
   (median of repeats after warm-up), peak memory, the speed-up, the FLOPs ratio (full convention, dense / pruned)
   and ``realised`` = speed-up / FLOPs ratio, the share of the FLOPs saving that became saved time.
4. ``compile``: ``torch.compile(fullgraph=True)`` of the reduced Vim-T forward: compile time, the logits against
   eager (1e-4 of the largest), eager against compiled images/s.
5. ``finetune``: ``ssmtrim prune`` with no arguments (the bundled CIFAR-10 Vim with its default plan and images), then
   200 steps of ``ssmtrim finetune`` on the bundled images (batch 100, bf16 on the GPU), evaluated on the bundled
   calibration images before and after; wall time and training images/s.

Output: one table per section as it finishes, a summary table, and ``--json PATH`` (default ``gpu_check.json``, or
``$OUT/gpu_check.json`` where the variable ``OUT`` names a folder). Exit code 0 when no section failed.
``--budget-s`` (default 450) shortens the timed loops of the later sections when the earlier ones ran long, so that
the whole check stays inside 8 minutes; ``--sections`` runs a subset.

What the machine needs. PyTorch with CUDA, Triton, and ssmtrim's dependencies; no network, no install of ssmtrim
(the check runs from the checkout). GPU images usually hold typer, rich, safetensors, huggingface-hub, numpy,
pillow and pytest, but not fvcore (FLOPs counts) and its pure-Python needs. Build their wheels on a machine with a
network, in the repository root, and carry the folder ``.whl`` (list it in ``.git/info/exclude``)::

    python -m pip wheel --no-deps -w .whl fvcore iopath yacs termcolor

``benchmarks/gpu_check.sh`` installs every wheel in ``.whl/`` into ``/tmp/site`` (``pip --no-index``), puts it on
``PYTHONPATH`` and runs this check; the preflight at the top of the output names anything still missing.

Carrying mamba-ssm. Without it the ``cuda`` backend cannot run and its tests skip. Its wheel must match the GPU
machine's Python, PyTorch and CUDA (the wheels its releases publish cover particular versions only), so build it
there, from source carried in: on a machine with a network, ``python -m pip download --no-deps --no-binary :all: -d
.whl-src mamba-ssm causal-conv1d``; carry ``.whl-src`` and, on the GPU machine (nvcc there; naming the one target
architecture keeps the build short)::

    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \\
        python -m pip wheel --no-deps --no-build-isolation -w .whl .whl-src/causal*conv1d-* .whl-src/mamba*ssm-*

(their build needs ``packaging``, ``ninja`` and ``einops`` there). The wheels are large: build them on the machine
that runs the check, just before it, then run ``gpu_check.sh``, which installs them with the rest of ``.whl/``; the
preflight then reports mamba-ssm, the mamba-ssm tests run and the scan section compares ``cuda`` too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from the checkout, installed or not
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# the released Vim-S schedule, the Vim-T budget of the literature, an L1 schedule of our own (bench_pruning.py)
MODELS = {"vim_tiny": ((10,), 0.8), "vim_small": ((5, 10, 15), 0.8), "plainmamba_l1": ((6, 12, 18), 0.7)}
DRY_MODELS = {"vim_test": ((2,), 0.7), "plainmamba_test": ((1,), 0.7)}
NEEDED = ("typer", "rich", "safetensors", "huggingface_hub", "fvcore", "numpy", "PIL", "pytest")
SCAN_TOL = {"out": 1e-3, "grad": 1e-2, "bf16": 5e-2}  # the project's CUDA test: atol = rtol = 1e-3, gradients x10


@dataclass
class Check:
    """What every section is given: where it runs, how small, and the time left."""

    device: torch.device
    dry: bool
    deadline: float  # time.monotonic() by which the whole check should end
    work: Path  # a scratch folder

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ------------------------------------------------------------------------------------------------------- helpers


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table (no dependency)."""
    cells = [[str(h) for h in header]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def subprocess_env() -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH (``python -m ssmtrim`` without an install)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_cli(args: list[str]) -> dict[str, Any]:
    """``ssmtrim ARGS --json``, run in this process (as ``python -m ssmtrim`` would run it) -> its JSON output, or a
    RuntimeError with what it wrote to stderr."""
    from ssmtrim.cli.app import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = app([*args, "--json"], prog_name="ssmtrim", standalone_mode=False)
    if code:
        raise RuntimeError(f"ssmtrim {args[0]} exited {code}: {err.getvalue().strip()[-800:]}")
    return json.loads(out.getvalue())


def preflight() -> dict[str, Any]:
    """The machine, the versions, and what is missing."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": None, "triton": None, "mamba_ssm": None,
                            "causal_conv1d": None, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for name in ("triton", "mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(name) is not None:
            try:
                info[name] = getattr(__import__(name), "__version__", "installed")
            except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
                info[name] = f"broken: {type(exc).__name__}: {exc}"[:200]
    info["missing"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    import ssmtrim
    from ssmtrim.ops.backends import backend_names

    info["ssmtrim"] = ssmtrim.__version__
    info["scan_backends"] = list(backend_names())
    return info


# ------------------------------------------------------------------------------------------------- 1. CUDA tests


def cuda_tests(check: Check) -> dict[str, Any]:
    """``pytest -m requires_cuda`` over the test files that carry the marker."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "requires_cuda" in p.read_text(encoding="utf-8"))
    if not files:
        return {"ok": None, "note": "no test file carries the requires_cuda marker"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "requires_cuda", *files]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=max(60.0, min(300.0, check.left() - 180)))
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)",
                                                     summary)}
    skipped = sorted({m.group(1) for m in re.finditer(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)})
    ok = proc.returncode in (0, 5)  # 5: nothing selected (no test is marked in this checkout)
    result = {"ok": ok, "files": files, "counts": counts, "skip_reasons": skipped, "summary": summary}
    if not ok:
        result["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    if check.device.type == "cuda" and counts.get("passed", 0) == 0:
        result["note"] = "no CUDA test passed"
    print(table(["pytest -m requires_cuda", "count"], [[k, v] for k, v in counts.items()]))
    for reason in skipped:
        print(f"  skipped: {reason}")
    return result


# ------------------------------------------------------------------------------------------------ 2. portable scan


def scan_inputs(bsz: int, e: int, length: int, n: int, device: torch.device, gap: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = {"u": r(bsz, e, length), "delta": r(bsz, e, length) * 0.5 - 1.0, "A": -torch.exp(r(e, n) * 0.5),
              "B": r(bsz, n, length), "C": r(bsz, n, length), "D": r(e), "z": r(bsz, e, length),
              "delta_bias": r(e) * 0.1,
              "gap": torch.rand(bsz, e, length, generator=g) * 0.5 if gap else None}
    return {k: None if v is None else v.to(device).requires_grad_(True) for k, v in inputs.items()}


def run_scan(inputs: dict, backend: str, grads: bool = True, dtype: torch.dtype = torch.float32):
    """(out, last state, {input: gradient of a fixed weighted sum of out}) on ``backend``."""
    from ssmtrim.ops import selective_scan

    cast = {k: None if v is None else (v.to(dtype) if k not in ("A", "D", "delta_bias") else v)
            for k, v in inputs.items()}
    with torch.set_grad_enabled(grads):
        out, last = selective_scan(**cast, delta_softplus=True, return_last_state=True, backend=backend)
    if not grads:
        return out, last, {}
    weight = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    found = torch.autograd.grad((out.float() * weight).sum(), list(leaves.values()))
    return out.detach(), last.detach(), dict(zip(leaves, found, strict=True))


def time_ms(fn: Callable[[], Any], check: Check, budget_s: float) -> float:
    """Median milliseconds of ``fn`` after one warm-up, with as many repeats as ``budget_s`` allows (1 to 10)."""
    fn()
    check.sync()
    t0 = time.perf_counter()
    fn()
    check.sync()
    one = time.perf_counter() - t0
    times = [one]
    for _ in range(max(0, min(9, int(budget_s / max(one, 1e-6)) - 1))):
        t0 = time.perf_counter()
        fn()
        check.sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def scan_check(check: Check) -> dict[str, Any]:
    """The portable scan against ``ref`` (and ``cuda`` where mamba-ssm is installed): errors and times."""
    from ssmtrim.errors import ConfigError
    from ssmtrim.ops.backends import get_backend

    try:
        portable = get_backend("portable")
    except ConfigError:
        return {"ok": None, "note": "the scan backend 'portable' is not registered in this checkout; skipped"}
    available, reason = portable.available(check.device)
    if not available:
        return {"ok": None, "note": f"the portable scan cannot run on {check.device}: {reason}"}
    others = ["portable"]
    if check.device.type == "cuda" and get_backend("cuda").available(check.device)[0]:
        others.append("cuda")
    accuracy_shape = (2, 8, 13, 4) if check.dry else (8, 384, 197, 16)
    rows, errors, ok = [], {}, True
    for gap in (False, True):
        inputs = scan_inputs(*accuracy_shape, check.device, gap)
        out_r, last_r, grads_r = run_scan(inputs, "ref")
        for name in others:
            out, last, grads = run_scan(inputs, name)
            err = {"out": (out - out_r).abs().max().item(), "last_state": (last - last_r).abs().max().item()}
            err.update({f"grad_{k}": (g - grads_r[k]).abs().max().item() for k, g in grads.items()})
            # relative to the reference's scale, as assert_close's atol + rtol * |ref|
            scale = {"out": out_r.abs().max().item(), "last_state": last_r.abs().max().item(),
                     **{f"grad_{k}": grads_r[k].abs().max().item() for k in grads}}
            passed = all(v <= SCAN_TOL["grad" if k.startswith("grad") else "out"] * (1 + scale[k])
                         for k, v in err.items())
            ok &= passed
            errors[f"{name} fp32 gap={gap}"] = {"max_abs_error": err, "passed": passed}
            rows.append([f"{name} fp32 gap={gap}", f"{err['out']:.2e}", f"{err['last_state']:.2e}",
                         f"{max(v for k, v in err.items() if k.startswith('grad')):.2e}" if grads else "-",
                         "yes" if passed else "NO"])
    inputs = scan_inputs(*accuracy_shape, check.device, True, seed=1)
    out_r = run_scan(inputs, "ref", grads=False)[0]
    for name in others:
        out = run_scan(inputs, name, grads=False, dtype=torch.bfloat16)[0].float()
        err = (out - out_r).abs().max().item()
        passed = err <= SCAN_TOL["bf16"] * (1 + out_r.abs().max().item())
        ok &= passed
        errors[f"{name} bf16 gap=True"] = {"max_abs_error": {"out": err}, "passed": passed}
        rows.append([f"{name} bf16 gap=True (forward)", f"{err:.2e}", "-", "-", "yes" if passed else "NO"])
    print(table(["scan against ref", "out", "last state", "max grad", "within tol"], rows))
    timing_shape = (2, 16, 33, 4) if check.dry else (128, 384, 197, 16)
    inputs = scan_inputs(*timing_shape, check.device, True)
    per = 0.05 if check.dry else min(3.0, max(0.3, (check.left() - 300) / 12))
    times = {}
    for name in ["ref", *others]:
        times[name] = {"forward_ms": time_ms(lambda n=name: run_scan(inputs, n, grads=False), check, per),
                       "forward_backward_ms": time_ms(lambda n=name: run_scan(inputs, n), check, per)}
    print(table([f"scan B{timing_shape[0]} E{timing_shape[1]} L{timing_shape[2]} N{timing_shape[3]} fp32, gap",
                 "forward ms", "fwd+bwd ms", "fwd speed-up vs ref"],
                [[n, f"{t['forward_ms']:.2f}", f"{t['forward_backward_ms']:.2f}",
                  f"{times['ref']['forward_ms'] / t['forward_ms']:.1f}x"] for n, t in times.items()]))
    return {"ok": ok, "backends": ["ref", *others], "accuracy_shape": accuracy_shape, "errors": errors,
            "tolerances": SCAN_TOL, "timing_shape": timing_shape, "times": times}


# ---------------------------------------------------------------------------------------------------- 3. throughput


def images_per_s(model: torch.nn.Module, x: torch.Tensor, check: Check, budget_s: float) -> float:
    """Median images/s of repeated forwards under bf16 autocast (on CUDA), after warm-up."""
    amp = check.device.type == "cuda"

    def forward() -> None:
        with torch.no_grad(), torch.autocast(check.device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)

    forward()  # warm-up: allocations, kernel choices
    check.sync()
    t0 = time.perf_counter()
    forward()
    check.sync()
    one = time.perf_counter() - t0
    iters = max(1, min(10, int(budget_s / 3 / max(one, 1e-6))))
    rates = []
    for _ in range(3 if not check.dry else 1):
        t0 = time.perf_counter()
        for _ in range(iters):
            forward()
        check.sync()
        rates.append(iters * x.shape[0] / (time.perf_counter() - t0))
    return statistics.median(rates)


def throughput(check: Check) -> dict[str, Any]:
    """Dense against pruned per model: GFLOPs, images/s, peak memory, speed-up, FLOPs ratio, realised share."""
    import ssmtrim
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.ops import resolve_backend
    from ssmtrim.pruning import PruneConfig, apply_pruning

    models = DRY_MODELS if check.dry else MODELS
    batch = 2 if check.dry else 128
    backend = resolve_backend(check.device)
    rows, out = [], []
    for name, (layers, keep) in models.items():
        torch.manual_seed(0)
        dense = ssmtrim.create_model(name).eval()  # random weights at the official configuration
        plan = PruneConfig.recommended(dense, layers=layers, keep=(keep,))
        pruned = apply_pruning(copy.deepcopy(dense), plan)
        size = data_config_of(dense).input_size
        x = torch.randn(batch, *size, device=check.device)
        per = 0.05 if check.dry else min(8.0, max(1.0, (check.left() - 150) / (2 * len(models) + 2)))
        entry: dict[str, Any] = {"model": name, "batch": batch, "input_size": list(size), "backend": backend,
                                 "plan": {"layers": list(plan.layers), "keep": list(plan.keep),
                                          "arrangement": plan.arrangement}}
        for variant, model in (("dense", dense), ("pruned", pruned)):
            flops = gflops(model)
            model.to(check.device)
            if check.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(check.device)
            rate = images_per_s(model, x, check, per)
            peak = torch.cuda.max_memory_allocated(check.device) / 2**30 if check.device.type == "cuda" else None
            model.to("cpu")
            entry[variant] = {"gflops": flops, "images_per_s": rate, "peak_gib": peak}
        d, p = entry["dense"], entry["pruned"]
        entry["speedup"] = p["images_per_s"] / d["images_per_s"]
        counted = d["gflops"] is not None and p["gflops"] is not None
        entry["flops_ratio_full"] = d["gflops"]["full"] / p["gflops"]["full"] if counted else None
        entry["realised"] = entry["speedup"] / entry["flops_ratio_full"] if counted else None
        out.append(entry)
        for variant in ("dense", "pruned"):
            v, last = entry[variant], variant == "pruned"
            rows.append([name, variant, fmt(v["gflops"] and v["gflops"]["paper"], ".3f"),
                         fmt(v["gflops"] and v["gflops"]["full"], ".3f"), f"{v['images_per_s']:.1f}",
                         fmt(v["peak_gib"], ".2f"), f"{entry['speedup']:.2f}x" if last else None,
                         fmt(entry["flops_ratio_full"] if last else None, ".2f"),
                         fmt(entry["realised"] if last else None, ".2f")])
    amp = "bf16 autocast" if check.device.type == "cuda" else "fp32"
    print(table([f"batch {batch}, {amp}, scan {backend}", "variant", "GF paper", "GF full", "img/s", "peak GiB",
                 "speed-up", "FLOPs ratio", "realised"], rows))
    result = {"ok": True, "weights": "random, at the official configurations", "amp": amp, "models": out}
    if out and out[0]["realised"] is None:
        result["note"] = "fvcore is missing: FLOPs not counted (carry its wheel, see the docstring)"
    return result


def gflops(model: torch.nn.Module) -> dict[str, float] | None:
    """GFLOPs per image in both conventions (batch 1, on the CPU), or None without fvcore."""
    from ssmtrim.flops import count_flops_all

    try:
        return {c: r.gflops for c, r in count_flops_all(model).items()}
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------------ 4. finetune


def tiny_example(folder: Path) -> tuple[Path, Path]:
    """For the dry run: a tiny dense Vim of 3 classes and 24 images of 32x32 in class folders."""
    import numpy as np
    from PIL import Image

    import ssmtrim

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (folder / "images" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    return ssmtrim.save_model(ssmtrim.create_model("vim_test", num_classes=3), folder / "dense"), folder / "images"


def finetune_check(check: Check) -> dict[str, Any]:
    """``ssmtrim prune`` with the bundled defaults, then a short ``ssmtrim finetune`` of the result (the dry run:
    the same two commands on a tiny model and images)."""
    from ssmtrim.bundled import examples_dir
    from ssmtrim.data import scan_folder

    pruned, tuned = check.work / "pruned", check.work / "finetuned"
    if check.dry:
        dense, train = tiny_example(check.work)
        held_out = train
        prune_args = ["prune", str(dense), "--data", str(train), "--eval-data", str(train), "--layers", "2",
                      "--flops", "0.8", "-o", str(pruned), "--quiet"]
        steps, batch = 2, 12
    else:
        images = examples_dir() / "cifar10"
        train, held_out = images / "val", images / "calib"
        prune_args = ["prune", "-o", str(pruned), "--quiet"]  # the bundled model, plan and images
        steps, batch = 200, 100
    t0 = time.perf_counter()
    summary = run_cli(prune_args)
    prune_s = time.perf_counter() - t0
    per_epoch = len(scan_folder(train)) // batch
    epochs = math.ceil(steps / per_epoch)
    ft_args = ["finetune", str(pruned), "--data", str(train), "-o", str(tuned), "--epochs", str(epochs),
               "--batch-size", str(batch), "--device", str(check.device), "--eval-data", str(held_out), "--quiet"]
    t0 = time.perf_counter()
    result = run_cli(ft_args)
    wall = time.perf_counter() - t0
    history = result.get("history") or [{}]
    evaluation = summary.get("evaluation") or {}
    out = {
        "ok": True,
        "prune": {"plan": {k: summary["plan"][k] for k in ("layers", "keep", "arrangement")},
                  "flops": summary.get("flops"), "top1_dense": evaluation.get("dense_top1"),
                  "top1_pruned": evaluation.get("top1"), "held_out": evaluation.get("data"), "seconds": prune_s},
        "finetune": {"steps": per_epoch * epochs, "batch": batch, "epochs": epochs, "train_images": str(train),
                     "wall_s": wall, "train_images_per_s": per_epoch * epochs * batch / wall,
                     "top1_before": (result.get("before") or {}).get("top1"), "top1_after": result.get("eval_top1"),
                     "last_epoch": history[-1]},
    }
    f = out["finetune"]
    print(table(["bundled Vim, pruned then fine-tuned", "value"], [
        ["plan", f"layers {out['prune']['plan']['layers']} keep {out['prune']['plan']['keep']}"],
        ["top-1 dense -> pruned (held out)", f"{fmt(out['prune']['top1_dense'], '.2f')} -> "
                                            f"{fmt(out['prune']['top1_pruned'], '.2f')}"],
        ["fine-tune steps x batch", f"{f['steps']} x {batch}"],
        ["fine-tune wall s / images/s", f"{wall:.1f} / {f['train_images_per_s']:.1f}"],
        ["top-1 before -> after (held out)", f"{fmt(f['top1_before'], '.2f')} -> {fmt(f['top1_after'], '.2f')}"],
    ]))
    return out


# ---------------------------------------------------------------------------------------------------------- main

def compile_check(check: Check) -> dict[str, Any]:
    """``torch.compile(fullgraph=True)`` of a reduced Vim-T forward (the recommended plan at the throughput section's
    schedule; dry run: a two-block test Vim): compile time, the largest logit difference from eager (relative to the
    largest logit), and eager against compiled images/s, fp32."""
    import ssmtrim
    from ssmtrim.models.loading import data_config_of
    from ssmtrim.ops import resolve_backend
    from ssmtrim.pruning import PruneConfig, apply_pruning

    torch.manual_seed(0)
    if check.dry:
        model, (layers, keep), batch = ssmtrim.create_model("vim_test", depth=2), ((1,), 0.6), 2
    else:
        model, (layers, keep), batch = ssmtrim.create_model("vim_tiny"), MODELS["vim_tiny"], 128
    model = apply_pruning(model.eval(), PruneConfig.recommended(model, layers=layers, keep=(keep,))).to(check.device)
    x = torch.randn(batch, *data_config_of(model).input_size, device=check.device)
    with torch.no_grad():
        eager = model(x).float()
        t0 = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x).float()
        check.sync()
        compile_s = time.perf_counter() - t0
    diff = float((out - eager).abs().max() / eager.abs().max().clamp_min(1e-12))
    per = 0.05 if check.dry else min(6.0, max(1.0, (check.left() - 60) / 4))
    rates = {}
    for name, fn in (("eager", model), ("compiled", compiled)):
        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn(x)
        forward()
        check.sync()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < per or n == 0:
            forward()
            n += 1
        check.sync()
        rates[name] = n * batch / (time.perf_counter() - t0)
    result = {"ok": diff <= 1e-4, "model": "vim_test" if check.dry else "vim_tiny", "batch": batch,
              "backend": resolve_backend(check.device), "compile_s": compile_s, "max_rel_diff": diff,
              "images_per_s": rates, "speedup": rates["compiled"] / rates["eager"]}
    print(table(["model", "backend", "compile s", "max rel diff", "eager img/s", "compiled img/s", "speed-up"],
                [[result["model"], result["backend"], f"{compile_s:.1f}", f"{diff:.1e}", f"{rates['eager']:.1f}",
                  f"{rates['compiled']:.1f}", f"{result['speedup']:.2f}x"]]))
    return result


SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "cuda_tests": cuda_tests, "scan": scan_check, "throughput": throughput, "compile": compile_check,
    "finetune": finetune_check}


def headline(name: str, result: dict[str, Any]) -> str:
    """One line per section for the summary table."""
    if "error" in result:
        return result["error"][:90]
    if result.get("ok") is None:
        return result.get("note", "skipped")[:90]
    if name == "cuda_tests":
        return result.get("summary", "")[:90]
    if name == "scan":
        t = result["times"]
        return ", ".join(f"{n} {v['forward_ms']:.1f}/{v['forward_backward_ms']:.1f} ms" for n, v in t.items())
    if name == "throughput":
        return ", ".join(f"{m['model']} {m['speedup']:.2f}x ({fmt(m['realised'], '.2f')} realised)"
                         for m in result["models"])
    if name == "compile":
        return f"{result['model']} fullgraph in {result['compile_s']:.0f} s, {result['max_rel_diff']:.0e} from " \
               f"eager, {result['speedup']:.2f}x"
    if name == "finetune":
        f = result["finetune"]
        return f"{f['steps']} steps in {f['wall_s']:.0f} s, top-1 {fmt(f['top1_before'], '.1f')} -> " \
               f"{fmt(f['top1_after'], '.1f')}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes and steps: the plumbing only")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections")
    parser.add_argument("--json", default=None, help="where to write the results (default: gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds the whole check should take at most")
    args = parser.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; run it on the GPU machine, or --dry-run here.", file=sys.stderr)
        return 2
    out_dir = os.environ.get("OUT")
    json_path = Path(args.json or (Path(out_dir) / "gpu_check.json" if out_dir and Path(out_dir).is_dir()
                                   else "gpu_check.json"))
    start = time.monotonic()
    env = preflight()
    print(table(["machine", "value"], [[k, ", ".join(v) if isinstance(v, list) else v] for k, v in env.items()]))
    if env["missing"]:
        print(f"\nmissing Python packages: {', '.join(env['missing'])}; carry their wheels in .whl/ and run "
              "benchmarks/gpu_check.sh (see this script's docstring). Sections that need them will fail.")
    results: dict[str, Any] = {"dry_run": args.dry_run, "environment": env, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        check = Check(torch.device("cpu" if args.dry_run else "cuda"), args.dry_run, start + args.budget_s,
                      Path(tmp))
        for name in chosen:
            print(f"\n== {name} ({check.left():.0f} s of the budget left)", flush=True)
            t0 = time.monotonic()
            try:
                result = SECTIONS[name](check)
            except Exception as exc:  # noqa: BLE001 - one section's failure must not stop the others
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()[-3000:]}
                print(f"FAILED: {result['error']}")
            result["seconds"] = time.monotonic() - t0
            results["sections"][name] = result
            sys.stdout.flush()
    results["seconds"] = time.monotonic() - start
    json_path.write_text(json.dumps(results, indent=2, default=str))
    state = {True: "ok", False: "FAILED", None: "skipped"}
    print("\n" + table(["section", "result", "seconds", "headline"],
                       [[n, state[r.get("ok")], f"{r['seconds']:.0f}", headline(n, r)]
                        for n, r in results["sections"].items()]))
    print(f"\n{results['seconds']:.0f} s in all; wrote {json_path}")
    return 1 if any(r.get("ok") is False for r in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
