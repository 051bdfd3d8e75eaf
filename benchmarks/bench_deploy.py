"""Deployment speed, dense against reduced, side by side in one run: batch-1 latency and batch-64 throughput in
eager PyTorch, and optionally compiled (``torch.compile(fullgraph=True, dynamic=False)``) and in onnxruntime (the
exported file).

    OMP_NUM_THREADS=1 python benchmarks/bench_deploy.py [--models vim_tiny,vim_cifar256,plainmamba_l1] \\
        [--batch 64] [--compile] [--onnx] [--json out.json]

The reduced model is each family's recommended plan (merge; unmerge on VMamba, MambaVision) at keep 0.7 after its
recommended blocks (or ``--arrangement``, ``--layers``, ``--keep``), count mode, compensation off (it changes no
speed); registered names without bundled weights get random weights (speed does not depend on them). For each runtime
it prints images/s at ``--batch``, milliseconds per image at batch 1, the speed-up over dense, and the realised share
(speed-up / the full-convention FLOPs ratio); the speed-up is the ratio of the two medians, and, paired, the median of
the per-turn ratios (dense and reduced timed back to back), which a drift across turns moves less. With one thread
the clock is the thread's CPU time (another process on a shared machine then does not count; onnxruntime's own
threads are not this thread's, so its column always reads the wall clock), else the wall clock. Compiling takes
minutes on a deep model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssmtrim.bundled import bundled_or_random
from ssmtrim.flops import count_flops_all
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.config import declared_options
from ssmtrim.pruning.options import parse_option


def with_reference_ops(model):
    """``model``'s forward with the kernels of unmerge's groups and of ToMe's choice off: the groups' means and
    regroupings and the bipartite choice in PyTorch ops (the references those kernels replace; ssmtrim.models.tokens and
    ssmtrim.pruning.strategies.tome look the kernels up by these names at each call)."""
    import ssmtrim.models.tokens as tokens
    import ssmtrim.pruning.strategies.tome as tome

    def call(x):
        saved = tokens.group_kernels, tome.merge_kernels
        tokens.group_kernels = tome.merge_kernels = lambda *t: None
        try:
            return model(x)
        finally:
            tokens.group_kernels, tome.merge_kernels = saved

    return call


def rates(calls, x, warmup: int, iters: int, repeats: int, wall: bool = False) -> tuple[list[float], list[float]]:
    """Images/s of each of ``calls`` on x, median of ``repeats`` timings of ``iters`` calls, the calls taking turns
    (dense, reduced, dense, ...) so that a slow spell of a shared machine falls on both; and each call's speed-up over
    the first, paired: the median over the turns of its rate / the first call's rate in the same turn (a drift that
    spans several turns then cancels within each)."""
    clock = time.thread_time if torch.get_num_threads() == 1 and not wall else time.perf_counter
    for call in calls:
        for _ in range(warmup):
            call(x)
    measured: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, out in zip(calls, measured, strict=True):
            t0 = clock()
            for _ in range(iters):
                call(x)
            out.append(iters * x.shape[0] / (clock() - t0))
    paired = [statistics.median(r / d for r, d in zip(m, measured[0], strict=True)) for m in measured]
    return [statistics.median(m) for m in measured], paired


def timing(dense: float, reduced: float, paired: float, flops_ratio: float) -> dict[str, float]:
    """One runtime's row: images/s, the speed-up (ratio of the medians) and the realised share (speed-up / FLOPs
    ratio), and the same two from the paired speed-up (:func:`rates`)."""
    return {"dense": dense, "reduced": reduced, "speedup": reduced / dense, "realised": reduced / dense / flops_ratio,
            "speedup_paired": paired, "realised_paired": paired / flops_ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vim_tiny,vim_cifar256,plainmamba_l1")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--arrangement", help="the strategy (default: each family's recommended one)")
    ap.add_argument("--layers", help="reduce after these blocks, 1-based (default: the family's recommended ones)")
    ap.add_argument("--option", action="append", default=[], metavar="NAME=V",
                    help="a plug-in option laid over the family's (repeatable), e.g. --option mixer=tokens")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also torch.compile(fullgraph=True, dynamic=False)")
    ap.add_argument("--onnx", action="store_true", help="also onnxruntime (exported and checked first)")
    ap.add_argument("--reference-ops", action="store_true",
                    help="also the reduced model eager with the kernels of unmerge's groups and of ToMe's choice off "
                    "(in PyTorch ops), timed in the same turns")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    results = []
    for name in args.models.split(","):
        dense = bundled_or_random(name)
        size = data_config_of(dense).input_size
        x_many, x_one = torch.randn(args.batch, *size), torch.randn(1, *size)
        given = {"arrangement": args.arrangement,
                 "layers": tuple(int(v) for v in args.layers.split(",")) if args.layers else None,
                 "options": dict(parse_option(o, declared_options()) for o in args.option) or None}
        plan = PruneConfig.recommended(dense, keep=(args.keep,), compensate="none", **given)
        reduced = apply_pruning(bundled_or_random(name), plan)
        flops = [count_flops_all(m)["full"].total for m in (dense, reduced)]
        row = {"model": name, "plan": reduced.prune_config.to_dict(), "flops_ratio": flops[0] / flops[1]}
        runtimes = {"eager": (dense, reduced)}
        if args.compile:
            # static shapes: each batch size its own graph, as a deployment at a fixed batch runs it (with the batch
            # left to go symbolic after batch 64 then 1, inductor failed to lower PlainMamba-L1's grid conv)
            runtimes["compiled"] = tuple(torch.compile(m, fullgraph=True, dynamic=False) for m in (dense, reduced))
        with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
            for runtime, (d, r) in runtimes.items():
                for label, batch in (("batch", x_many), ("one", x_one)):
                    n = 1 if label == "batch" else 5
                    calls = (d, r, with_reference_ops(r)) if args.reference_ops and runtime == "eager" else (d, r)
                    (rd, rr, *ro), (_, pr, *po) = rates(calls, batch, 1, args.iters * n, args.repeats)
                    row[f"{runtime}_{label}"] = timing(rd, rr, pr, row["flops_ratio"])
                    if ro:
                        row[f"{runtime}_reference_ops_{label}"] = timing(rd, ro[0], po[0], row["flops_ratio"])
            if args.onnx:
                from ssmtrim.export import OnnxModel, export_onnx

                for label, batch in (("batch", x_many), ("one", x_one)):
                    runners = []
                    for kind, m in (("dense", dense), ("reduced", reduced)):
                        path = os.path.join(tmp, f"{kind}_{batch.shape[0]}.onnx")
                        export_onnx(m, path, batch_size=batch.shape[0], check_images=batch)
                        runners.append(lambda a, s=OnnxModel(path, threads=torch.get_num_threads()): s.run(a))
                    (rd, rr), (_, pr) = rates(runners, batch.numpy(), 1, args.iters, args.repeats, wall=True)
                    row[f"onnxruntime_{label}"] = timing(rd, rr, pr, row["flops_ratio"])
        results.append(row)
        print(f"\n{name}: {row['plan']['arrangement']} after {row['plan']['layers']}, keep {args.keep}, "
              f"{row['flops_ratio']:.2f}x fewer FLOPs (full)")
        for key, v in row.items():
            if isinstance(v, dict) and "speedup" in v:
                unit = f"img/s at batch {args.batch}" if key.endswith("batch") else "ms at batch 1"
                show = (lambda r: f"{r:8.1f}") if key.endswith("batch") else (lambda r: f"{1e3 / r:8.1f}")
                print(f"  {key:22s} dense {show(v['dense'])}  reduced {show(v['reduced'])} {unit:22s} "
                      f"speed-up {v['speedup']:.2f}x  realised {v['realised']:.2f}  (paired: "
                      f"{v['speedup_paired']:.2f}x, {v['realised_paired']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
