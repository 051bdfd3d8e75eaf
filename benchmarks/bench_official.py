"""ssmtrim's forward against the official code's own pure-PyTorch path, the same weights, timed alternately in one run.

    pip install einops   # the official VMamba file imports it
    OMP_NUM_THREADS=1 python benchmarks/bench_official.py --vmamba PATH/TO/VMamba [--batch 8] [--repeats 5]
        [--json out.json]

``--vmamba``: a clone of the official VMamba repository (its ``classification/models/vmamba.py``). VMamba-T
(``vmamba_tiny_s1l8``, the released v2 tiny) is built from that file, given the random weights of ssmtrim's
``vmamba_tiny`` (the keys are the official ones), checked to give the same logits, and both forwards are timed
alternately (eval, no grad, 224², ``--repeats`` passes; with one thread on the thread's CPU time), printing images/s
of each and their ratio.

The official file does not run on a CPU as it is: it imports Triton at import time and enters
``torch.cuda.device(x.device)`` around its cross-scan, which refuses a CPU tensor (the reason of VMamba#107). Three
stand-ins make its own pure-PyTorch path run here, and change none of its arithmetic: an import-time stand-in for
Triton while its Triton kernels are decorated (they are never called on CPU; other modules then see no Triton and
take their PyTorch paths), ``torch.cuda.device`` as a no-op context for a CPU device, and timm's ``DropPath`` /
``trunc_normal_`` when timm is not installed (identity at eval; the init is overwritten by the loaded weights).
Its scan is then ``csms6s.selective_scan_torch`` and its cross-scan ``csm_triton.CrossScanF`` / ``CrossMergeF``.

MambaVision's official code has no pure-PyTorch path to compare with: its mixer calls mamba-ssm's CUDA
``selective_scan_fn`` (imported at module level), so it does not run on a CPU at all (MambaVision#43).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import ssmtrim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import cpu_name  # noqa: E402 - the sibling script's helper


def _stand_in(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@contextlib.contextmanager
def _triton_stand_in():
    """``triton.jit`` as the identity while a module decorates its (never called) Triton kernels."""
    language = _stand_in("triton.language")
    language.__getattr__ = lambda name: object  # annotations such as tl.constexpr
    triton = _stand_in("triton", jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f),
                       cdiv=lambda a, b: -(-a // b), language=language)
    saved = {k: sys.modules.get(k) for k in ("triton", "triton.language")}
    sys.modules.update({"triton": triton, "triton.language": language})
    try:
        yield
    finally:
        for k in saved:
            sys.modules[k] = None  # afterwards: no Triton, so the other official modules take their PyTorch paths


def _timm_helpers() -> None:
    """timm's DropPath and trunc_normal_, where timm is not installed."""
    try:
        importlib.import_module("timm.models.layers")
        return
    except ImportError:
        pass

    class DropPath(torch.nn.Identity):
        def __init__(self, *args, **kwargs):
            super().__init__()

    layers = _stand_in("timm.models.layers", DropPath=DropPath, trunc_normal_=torch.nn.init.trunc_normal_)
    models = _stand_in("timm.models", layers=layers)
    sys.modules.update({"timm": _stand_in("timm", models=models), "timm.models": models, "timm.models.layers": layers})


def official_vmamba(repo: Path):
    """The official ``vmamba`` module of a VMamba clone, importable on CPU (see the module docstring)."""
    folder = repo / "classification" / "models"
    if not (folder / "vmamba.py").is_file():
        raise SystemExit(f"{folder / 'vmamba.py'} not found; --vmamba takes the root of a VMamba clone.")
    sys.path.insert(0, str(folder))
    _timm_helpers()
    with _triton_stand_in():
        importlib.import_module("csm_triton")
    return importlib.import_module("vmamba")


@contextlib.contextmanager
def cpu_device_context():
    real = torch.cuda.device

    def device(d):
        return contextlib.nullcontext() if torch.device(d).type == "cpu" else real(d)

    torch.cuda.device = device
    try:
        yield
    finally:
        torch.cuda.device = real


def timed(fn, clock, iters: int = 2) -> float:
    t0 = clock()
    for _ in range(iters):
        fn()
    return (clock() - t0) / iters


@torch.no_grad()
def compare(name: str, ours: torch.nn.Module, official: torch.nn.Module, batch: int, repeats: int, clock) -> dict:
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with cpu_device_context():
        a, b = ours(x), official(x)
        rel = float((a - b).abs().max() / b.abs().max())
        ours_s, official_s = [], []
        for _ in range(repeats):  # alternately, so that a disturbance hits both
            ours_s.append(timed(lambda: ours(x), clock))
            official_s.append(timed(lambda: official(x), clock))
    row = {"model": name, "batch": batch, "max_rel_logit_diff": rel,
           "ours_img_s": batch / min(ours_s), "official_img_s": batch / min(official_s),
           "ratio_best": min(official_s) / min(ours_s),
           "ratio_median": statistics.median(o / s for o, s in zip(official_s, ours_s, strict=True))}
    print(f"{name}: logits agree to {rel:.1e} (relative); ssmtrim {row['ours_img_s']:.2f} img/s, official "
          f"pure-PyTorch {row['official_img_s']:.2f} img/s: {row['ratio_best']:.2f}x faster (median of repeats "
          f"{row['ratio_median']:.2f}x)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vmamba", type=Path, required=True, help="Root of a clone of the official VMamba repository.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    vmamba = official_vmamba(args.vmamba)
    torch.manual_seed(0)
    rows = [compare("VMamba-T", ssmtrim.create_model("vmamba_tiny").eval(), vmamba.vmamba_tiny_s1l8().eval(),
                    args.batch, args.repeats, clock)]
    result = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "rows": rows,
              "clock": "thread CPU time" if args.threads == 1 else "wall"}
    print(f"machine: {result['cpu']}, {args.threads} thread(s), torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
