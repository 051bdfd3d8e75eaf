"""VMamba's SS2D on the token-major scan against the general path, side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_routes.py [--models vmamba_cifar64,vmamba_cifar] [--batch 64]
        [--repeats 7] [--json out.json]

Any registered VMamba name may be given (one without bundled weights, e.g. vmamba_tiny, gets random ones).

The dense model's forward at ``--batch`` and at batch 1, once with the four routes scanned as two calls of the
token-major two-direction scan (the default where nothing needs a gradient) and once on the general path (channel-major
sequences, flipped and transposed copies), timed in turns (one thread's CPU time with one thread, else the wall clock;
median of ``--repeats`` turns); prints images/s, milliseconds per image at batch 1, the speed-up, and the largest
difference of the logits over their largest magnitude.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import ssmtrim
import ssmtrim.models.vmamba as vmamba
from ssmtrim.models.loading import data_config_of

ROOT = Path(__file__).resolve().parents[1]


def clock() -> float:
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def turns(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each, median over ``repeats`` turns (the calls of a turn back to back)."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def general(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the token-major scan refused (the general path)."""
    def run():
        taken, vmamba.scan_kernels = vmamba.scan_kernels, lambda *args: None
        try:
            return call()
        finally:
            vmamba.scan_kernels = taken
    return run


def measure(name: str, batch_size: int, repeats: int) -> dict:
    """One model's row: both paths timed in turns at ``batch_size`` and at batch 1, and their logits compared."""
    bundled = ROOT / "examples" / name
    torch.manual_seed(0)  # a registered name without bundled weights gets random ones (speed does not need them)
    model = (ssmtrim.load_model(bundled) if bundled.is_dir() else ssmtrim.create_model(name)).eval()
    shape = data_config_of(model).input_size
    batch, one = torch.randn(batch_size, *shape), torch.randn(1, *shape)
    with torch.no_grad():
        fast, slow = model(batch), general(lambda: model(batch))()
        diff = float((fast - slow).abs().max() / slow.abs().max())
        got = turns({"tokens": lambda: model(batch), "general": general(lambda: model(batch)),
                     "tokens_one": lambda: model(one), "general_one": general(lambda: model(one))}, repeats)
    return {"model": name, "batch": batch_size, "max_rel_difference": diff,
            "images_per_s": {"tokens": batch_size / got["tokens"], "general": batch_size / got["general"]},
            "ms_batch_1": {"tokens": got["tokens_one"] * 1e3, "general": got["general_one"] * 1e3},
            "speedup_batch": got["general"] / got["tokens"], "speedup_one": got["general_one"] / got["tokens_one"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vmamba_cifar64,vmamba_cifar")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for name in args.models.split(","):
        row = measure(name, args.batch, args.repeats)
        rows.append(row)
        ms = row["ms_batch_1"]
        print(f"{name}: batch {args.batch} {row['images_per_s']['general']:.1f} -> "
              f"{row['images_per_s']['tokens']:.1f} images/s ({row['speedup_batch']:.2f}x); batch 1 "
              f"{ms['general']:.2f} -> {ms['tokens']:.2f} ms ({row['speedup_one']:.2f}x); "
              f"logits differ by {row['max_rel_difference']:.1e} of the largest")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
