"""Speed of the selective scan and of Vim-T end to end, reference loop against the fast path, side by side.

    python benchmarks/bench_scan.py [--batch 8] [--threads N] [--json out.json]

Prints (1) the scan alone at Vim-T shapes (B=8, E=384, L=197, N=16), forward and forward+backward, for the reference
loop (``ref``), the C kernel (``cpu``) and the chunked PyTorch scan (``portable``, the GPU fallback without mamba-ssm),
with the portable scan's speed as a share of the other two; (2) Vim-T at 224² end to end in images/s for each backend;
(3) where the time of the fast forward goes (torch profiler, by op). All ratios are measured in this one run on this
machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ssmtrim
from ssmtrim.ops import selective_scan, use_backend


def timeit(fn, warmup: int, iters: int, repeats: int = 3) -> float:
    """Median over repeats of the mean seconds per call."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        means.append((time.perf_counter() - t0) / iters)
    return statistics.median(means)


def scan_inputs(bsz: int, e: int = 384, length: int = 197, n: int = 16, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    return dict(u=t(bsz, e, length), delta=t(bsz, e, length), A=(-torch.exp(torch.randn(e, n, generator=g))),
                B=t(bsz, n, length), C=t(bsz, n, length), D=torch.ones(e), z=t(bsz, e, length),
                delta_bias=torch.zeros(e), delta_softplus=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="vim_tiny")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "batch": args.batch}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}\n")
    print(f"1. selective scan alone at Vim-T shapes (B={args.batch}, E=384, L=197, N=16)")
    inp = scan_inputs(args.batch)
    with torch.no_grad():
        t_ref = timeit(lambda: selective_scan(**inp, backend="ref"), 1, 2)
        t_cpu = timeit(lambda: selective_scan(**inp, backend="cpu"), 3, 10)
        t_port = timeit(lambda: selective_scan(**inp, backend="portable"), 1, 2)
    print(f"   forward   ref {t_ref * 1e3:8.2f} ms   cpu {t_cpu * 1e3:7.2f} ms   speed-up {t_ref / t_cpu:6.1f}x")
    ginp = scan_inputs(args.batch, grad=True)

    def fwd_bwd(backend):
        selective_scan(**ginp, backend=backend).sum().backward()

    tb_ref = timeit(lambda: fwd_bwd("ref"), 1, 1)
    tb_cpu = timeit(lambda: fwd_bwd("cpu"), 2, 5)
    tb_port = timeit(lambda: fwd_bwd("portable"), 1, 1)
    print(f"   fwd + bwd ref {tb_ref * 1e3:8.2f} ms   cpu {tb_cpu * 1e3:7.2f} ms   speed-up {tb_ref / tb_cpu:6.1f}x")
    print("   portable (chunked PyTorch, parallel over L; auto's choice on GPUs without mamba-ssm, never on CPU):")
    for label, t, r, c in (("forward  ", t_port, t_ref, t_cpu), ("fwd + bwd", tb_port, tb_ref, tb_cpu)):
        print(f"   {label} {t * 1e3:8.2f} ms   = {r / t:5.2f} x ref's speed, {c / t:6.3f} x the C kernel's")
    results["scan"] = {"ref_fwd_ms": t_ref * 1e3, "cpu_fwd_ms": t_cpu * 1e3, "fwd_speedup": t_ref / t_cpu,
                       "ref_fwdbwd_ms": tb_ref * 1e3, "cpu_fwdbwd_ms": tb_cpu * 1e3, "fwdbwd_speedup": tb_ref / tb_cpu,
                       "portable_fwd_ms": t_port * 1e3, "portable_fwdbwd_ms": tb_port * 1e3,
                       "portable_vs_ref_fwd": t_ref / t_port, "portable_vs_cpu_fwd": t_cpu / t_port,
                       "portable_vs_ref_fwdbwd": tb_ref / tb_port, "portable_vs_cpu_fwdbwd": tb_cpu / tb_port}

    print(f"\n2. {args.model} end to end at 224², batch {args.batch}, eval, no grad")
    model = ssmtrim.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    speeds = {}
    with torch.no_grad():
        for backend, (warm, iters) in (("ref", (1, 1)), ("cpu", (2, 5))):
            with use_backend(backend):
                sec = timeit(lambda: model(x), warm, iters)
            speeds[backend] = args.batch / sec
            print(f"   {backend:4s} {speeds[backend]:7.2f} images/s  ({sec * 1e3:8.1f} ms per batch)")
    print(f"   speed-up {speeds['cpu'] / speeds['ref']:.1f}x")
    results["end_to_end"] = {"model": args.model, "images_per_s": speeds, "speedup": speeds["cpu"] / speeds["ref"]}

    print("\n3. where the time of the fast forward goes (torch profiler, self CPU time by op)")
    with torch.no_grad(), use_backend("cpu"), torch.profiler.profile() as prof:
        model(x)
    rows = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda r: -r[1])
    total = sum(t for _, t in rows)
    breakdown = {}
    for key, t in rows[:8]:
        breakdown[key] = t / total
        print(f"   {key:40s} {100 * t / total:5.1f}%")
    results["time_breakdown"] = breakdown
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
