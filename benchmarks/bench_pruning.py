"""Dense against pruned, side by side in one run: FLOPs, throughput, and the cost of the alignment bookkeeping.

    python benchmarks/bench_pruning.py [--models vim_tiny,vim_small,plainmamba_l1] [--batch 8] [--json out.json]

Random weights (the speed of a forward does not depend on them). For each model: dense, then pruning after the given
blocks at the given keep ratio with each arrangement; prints GFLOPs (paper and full), images/s (median of repeats,
after warm-up), the measured speed-up, the FLOPs reduction ratio, and speed-up / FLOPs ratio (how much of the saved
FLOPs became saved time). align vs keep-order runs the same token counts, so their ratio is the alignment's cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.flops import count_flops_all
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning

SCHEDULES = {  # the released Vim-S schedule, the Vim-T budget of the literature, an L1 schedule of our own
    "vim_tiny": ((10,), 0.8),
    "vim_small": ((5, 10, 15), 0.8),
    "vim_base": ((5, 10, 15), 0.8),
    "plainmamba_l1": ((6, 12, 18), 0.7),
    "plainmamba_l2": ((6, 12, 18), 0.7),
    "plainmamba_l3": ((9, 18, 27), 0.7),
    # the hierarchical families: inside their stages (VMamba-T's third, MambaVision-T's Mamba-mixer blocks), and the
    # CIFAR test beds at the -21% FLOPs of their method tables (README)
    "vmamba_tiny": ((6, 9), 0.7),
    "mambavision_t": ((5, 7, 13), 0.7),
    "vmamba_cifar": ((1, 3, 4), 0.5625),
    "vmamba_cifar64": ((1, 3, 4, 6), 0.656),
    "mambavision_cifar": ((2, 3, 6), 0.687),
}


def throughput(model, x, warmup: int, iters: int, repeats: int) -> float:
    """Images/s, median of ``repeats``; with one thread on the thread's CPU time (another process on a shared
    machine then does not count), else on the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        rates = []
        for _ in range(repeats):
            t0 = clock()
            for _ in range(iters):
                model(x)
            rates.append(iters * x.shape[0] / (clock() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vim_tiny,vim_small,plainmamba_l1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, CPU\n")
    header = f"{'model':14s} {'variant':11s} {'GF paper':>8s} {'GF full':>8s} {'img/s':>7s} {'speed-up':>8s} " \
             f"{'FLOPs ratio':>11s} {'realised':>8s}"
    print(header)
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = ssmtrim.create_model(name).eval()
        x = torch.randn(args.batch, *data_config_of(model).input_size)
        layers, keep = SCHEDULES[name]
        variants = [("dense", None)] + [(a, PruneConfig(layers=layers, keep=(keep,), arrangement=a))
                                        for a in ("align", "keep-order", "reorder", "merge", "tome")]
        base = None
        for label, config in variants:
            if config is not None:
                try:
                    apply_pruning(model, config)
                except ConfigError as exc:  # a strategy the family cannot run (a new sequence on a 2-D grid)
                    print(f"{name:14s} {label:11s} not run: {exc}")
                    continue
            flops = {c: r.gflops for c, r in count_flops_all(model).items()}
            rate = throughput(model, x, args.warmup, args.iters, args.repeats)
            if config is not None:
                remove_pruning(model)
            if base is None:
                base = (flops, rate)
            speedup = rate / base[1]
            flops_ratio = base[0]["full"] / flops["full"]
            row = {"model": name, "variant": label, "schedule": [list(layers), keep], "gflops": flops,
                   "images_per_s": rate, "speedup": speedup, "flops_ratio_full": flops_ratio,
                   "realised": speedup / flops_ratio}
            results.append(row)
            print(f"{name:14s} {label:11s} {flops['paper']:8.3f} {flops['full']:8.3f} {rate:7.2f} {speedup:7.2f}x "
                  f"{flops_ratio:10.2f}x {row['realised']:8.2f}")
        by = {r["variant"]: r for r in results if r["model"] == name}
        if "keep-order" in by and "align" in by:
            cost = by["keep-order"]["images_per_s"] / by["align"]["images_per_s"] - 1
            print(f"{'':14s} alignment bookkeeping: align is {100 * cost:+.1f}% slower than keep-order at equal "
                  "tokens")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
