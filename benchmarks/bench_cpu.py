"""CPU speed against the machine's matmul-bound limit, measured in the same run (so the ratio holds on any machine).

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu.py [--threads 1] [--repeats 5] [--json out.json] [--isa avx2]
        [--compare-kernel old.c] [--train REPEATS]

For each model (Vim-T at 224², batch 8, random weights at the official config; the bundled ``examples/vim_cifar``
at 32², batch 128), eval, no grad:
- images/s of the forward;
- the matmul-bound limit: the model's multiply-accumulates per image (the full count of :mod:`ssmtrim.flops`: linear
  layers, scans, convs, everything) divided by the fp32 matmul MAC rate this machine reaches at the model's own
  matmul shapes (every matrix product one forward runs, recorded by the profiler: in_proj, out_proj, x_proj,
  dt_proj, head... at the batch's token count), each shape timed with ``torch.mm``;
- their ratio (goals: 0.5 for Vim-T, 0.4 for vim_cifar).
The model's forward and its matmuls are timed alternately, ``--repeats`` times; the ratio is best forward over best
matmul pass (the best of each is the least disturbed by other work on the machine), and the median of the
per-repeat ratios is printed beside it. The largest shape alone (in_proj's, the fastest matmul) gives a stricter
limit, printed too. With one thread the clock is the thread's CPU time (``--clock``), so that other processes
on a shared machine do not count against either side.

``--isa avx2`` runs as on a CPU without AVX-512 (PyTorch's own kernels, MKL, oneDNN and ssmtrim's C kernel limited
to AVX2 through their environment variables; the process restarts itself with them). ``--compare-kernel old.c``
also times each forward with the C kernel built from another source, alternating with this one in the same
process, which measures a kernel change more steadily than two runs' ratios can on a shared machine. ``--train N``
also times N training steps of ``vim_cifar`` with the conv kernel's backward against PyTorch's conv, alternating.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import ssmtrim
from ssmtrim.flops import count_flops
from ssmtrim.models.loading import data_config_of
from ssmtrim.ops import _cpu_kernel
from ssmtrim.ops._cpu_kernel import status as kernel_status

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vim_cifar"
MODELS = (("vim_tiny", None, 8), ("vim_cifar", EXAMPLE, 128), ("vmamba_tiny", None, 8),
          ("mambavision_t", None, 8))  # (name, folder or None: random weights, batch)
MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
# a CPU without AVX-512, as far as software can make one: PyTorch's own kernels, MKL's and oneDNN's, and ssmtrim's
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "SSMTRIM_KERNEL_FLAGS": "-mno-avx512f"}


def cpu_name() -> str:
    """``lscpu``'s model name, else the processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CLOCK = time.perf_counter  # set by main: the calling thread's CPU time when the work runs on it alone


def seconds(fn, iters: int) -> float:
    """Mean seconds per call over ``iters`` calls, on :data:`CLOCK`."""
    t0 = CLOCK()
    for _ in range(iters):
        fn()
    return (CLOCK() - t0) / iters


def matmul_shapes(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    """(M, K, N) -> number of calls, for every matrix product one forward runs (bmm batches folded into M)."""
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    shapes: Counter = Counter()
    for ev in prof.events():
        if ev.name not in MM_OPS:
            continue
        dims = [s for s in ev.input_shapes if len(s) in (2, 3)]
        a, b = dims[0], dims[1]
        batch = a[0] if len(a) == 3 else 1
        shapes[(batch * a[-2], a[-1], b[-1])] += 1
    return shapes


def matmul_runner(shapes: Counter):
    """A function that runs one forward's matrix products (each shape as often as the forward does) with torch.mm."""
    operands = [(torch.randn(m, k), torch.randn(n, k), count) for (m, k, n), count in shapes.items()]

    def run() -> None:
        for a, w, count in operands:
            for _ in range(count):
                torch.mm(a, w.t())

    return run


def largest_runner(shapes: Counter):
    """(a function running the largest matmul shape once, its MACs)."""
    m, k, n = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    a, w = torch.randn(m, k), torch.randn(n, k)
    return (lambda: torch.mm(a, w.t())), m * k * n


def load(name: str, folder: Path | None) -> torch.nn.Module:
    if folder is not None and folder.exists():
        return ssmtrim.load_model(folder).eval()
    return ssmtrim.create_model(name).eval()


def kernel_from(source: Path) -> ctypes.CDLL:
    """ssmtrim's C kernel built from another source (an earlier commit's, say) with this build's flags, its functions
    declared as this build's are (for ``--compare-kernel``)."""
    current = _cpu_kernel.load()
    if current is None:
        raise SystemExit(f"--compare-kernel needs the C kernel, which is unavailable: {kernel_status().detail}")
    saved, _cpu_kernel._SOURCE = _cpu_kernel._SOURCE, source
    try:
        path, err = _cpu_kernel._build(_cpu_kernel._compiler())
    finally:
        _cpu_kernel._SOURCE = saved
    if path is None:
        raise SystemExit(f"--compare-kernel: {source} does not compile: {err}")
    other = ctypes.CDLL(str(path))
    for fname, fn in vars(current).items():  # the functions _declare declared (ctypes caches them as attributes)
        if fname.startswith("ssm_") and hasattr(other, fname):
            getattr(other, fname).argtypes, getattr(other, fname).restype = fn.argtypes, fn.restype
    return other


def compare_kernels(forward, batch: int, other: ctypes.CDLL, repeats: int) -> dict:
    """The same forward with this build's kernel and with ``other``, alternately: images/s of each (best) and this
    build's time over the other's (median of the alternating pairs)."""
    mine, times = _cpu_kernel.load(), {"other": [], "this": []}
    try:
        for _ in range(repeats):
            for key, lib in (("other", other), ("this", mine)):
                _cpu_kernel._lib = lib
                times[key].append(seconds(forward, 1))
    finally:
        _cpu_kernel._lib = mine
    return {"images_per_s_other": batch / min(times["other"]), "images_per_s_this": batch / min(times["this"]),
            "time_ratio": statistics.median(t / o for t, o in zip(times["this"], times["other"], strict=True))}


def bench_training(batch: int, repeats: int) -> dict:
    """Training steps of the bundled ``vim_cifar`` (forward, cross-entropy, backward, an SGD step at lr 0) with the
    ``cpu`` backend's conv kernel and, alternately, with PyTorch's conv for the gradients (the backend's conv without
    its backward, as before the kernel had one): images/s of each (best) and the kernel's time over PyTorch's
    (median of the alternating pairs)."""
    import dataclasses

    from ssmtrim.ops import backends

    model = load("vim_cifar", EXAMPLE).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, *model.config.input_hw, generator=g), torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with_kernel = backends._table["cpu"]
    pytorch_grads = dataclasses.replace(with_kernel, conv=with_kernel.conv._replace(backward=None))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {"kernel": [], "pytorch": []}
    try:
        for backend in (with_kernel, pytorch_grads):  # warm-up
            backends._table["cpu"] = backend
            step()
        for _ in range(repeats):
            for key, backend in (("kernel", with_kernel), ("pytorch", pytorch_grads)):
                backends._table["cpu"] = backend
                times[key].append(seconds(step, 1))
    finally:
        backends._table["cpu"] = with_kernel
    return {"model": "vim_cifar", "batch": batch, "train_images_per_s_conv_kernel": batch / min(times["kernel"]),
            "train_images_per_s_pytorch_conv": batch / min(times["pytorch"]),
            "time_ratio": statistics.median(k / p for k, p in zip(times["kernel"], times["pytorch"], strict=True))}


def bench_model(name: str, folder: Path | None, batch: int, repeats: int, other: ctypes.CDLL | None = None) -> dict:
    model = load(name, folder)
    macs = count_flops(model, "full").gflops * 1e9  # per image
    c, h, w = data_config_of(model).input_size  # every family's input size, as eval reads images
    x = torch.randn(batch, c, h, w)
    shapes = matmul_shapes(model, x)
    mm_macs = sum(cnt * m * k * n for (m, k, n), cnt in shapes.items())
    run_mm, (run_big, big_macs) = matmul_runner(shapes), largest_runner(shapes)
    speeds, bounds, strict = [], [], []
    with torch.no_grad():
        forward = lambda: model(x)  # noqa: E731
        seconds(forward, 2)  # warm-up: the kernels build and load, the allocator settles
        seconds(run_mm, 1)
        for _ in range(repeats):  # alternately, so that load changes reach both
            speeds.append(batch / seconds(forward, 1))
            bounds.append(mm_macs / seconds(run_mm, 1) / macs)  # MAC/s at the model's shapes / MACs per image
            strict.append(big_macs / seconds(run_big, 3) / macs)
        compared = compare_kernels(forward, batch, other, repeats) if other is not None else None
    pairs = [s / b for s, b in zip(speeds, bounds, strict=True)]
    return {"compared": compared,
        "model": name, "weights": str(folder) if folder is not None and folder.exists() else "random",
        "batch": batch, "gmacs_per_image": macs / 1e9, "matmul_share_of_macs": mm_macs / (macs * batch),
        "images_per_s": max(speeds), "bound_images_per_s": max(bounds), "ratio": max(speeds) / max(bounds),
        "ratio_median_of_pairs": statistics.median(pairs), "images_per_s_median": statistics.median(speeds),
        "in_proj_bound_images_per_s": max(strict), "in_proj_ratio": max(speeds) / max(strict),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model and the matmuls alike)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", default=None, help="comma-separated subset of: " +
                        ",".join(m[0] for m in MODELS))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compare-kernel", type=Path, default=None, metavar="FILE.c",
                        help="also time each model's forward with the C kernel built from this source (e.g. `git "
                             "show REV:ssmtrim/ops/csrc/selective_scan.c > old.c`), alternating with this one")
    parser.add_argument("--train", type=int, default=0, metavar="REPEATS",
                        help="also time REPEATS training steps of vim_cifar at batch 128 with the conv kernel's "
                             "backward against PyTorch's conv, alternating")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: run as on a CPU without AVX-512 (PyTorch's kernels, MKL, oneDNN and ssmtrim's C "
                             "kernel all limited to AVX2), to read the ratios such a CPU would give")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: this thread's CPU time (time taken by other processes on a shared machine is not "
                             "counted; only valid with one thread); auto: cpu with one thread, else wall")
    args = parser.parse_args()
    if args.isa == "avx2" and os.environ.get("SSMTRIM_KERNEL_FLAGS") != AVX2_ENV["SSMTRIM_KERNEL_FLAGS"]:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})  # before torch starts
    torch.set_num_threads(args.threads)
    global CLOCK
    clock = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    CLOCK = time.thread_time if clock == "cpu" else time.perf_counter
    wanted = set(args.models.split(",")) if args.models else None
    other = kernel_from(args.compare_kernel) if args.compare_kernel is not None else None
    print(f"cpu: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {clock} clock; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"isa: PyTorch {torch.backends.cpu.get_cpu_capability()}; ssmtrim's C kernel: {kernel_status().detail}")
    print(f"{'model':10s} {'batch':>5s} {'images/s':>9s} {'bound/s':>9s} {'ratio':>6s} {'(median)':>8s}   "
          f"{'in_proj bound/s':>15s} {'ratio':>6s}   GMACs/img")
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": clock,
               "isa": args.isa, "torch_isa": torch.backends.cpu.get_cpu_capability(), "models": []}
    for name, folder, batch in MODELS:
        if wanted is not None and name not in wanted:
            continue
        r = bench_model(name, folder, batch, args.repeats, other)
        results["models"].append(r)
        print(f"{name:10s} {batch:5d} {r['images_per_s']:9.2f} {r['bound_images_per_s']:9.2f} {r['ratio']:6.3f} "
              f"{r['ratio_median_of_pairs']:8.3f}   "
              f"{r['in_proj_bound_images_per_s']:15.2f} {r['in_proj_ratio']:6.3f}   {r['gmacs_per_image']:.3f}")
        if r["compared"] is not None:
            c = r["compared"]
            print(f"{'':10s} against {args.compare_kernel}: {c['images_per_s_this']:.2f} against "
                  f"{c['images_per_s_other']:.2f} images/s, forward time x{c['time_ratio']:.3f} (median of "
                  f"{args.repeats} alternating pairs)")
    if args.train:
        t = bench_training(128, args.train)
        results["training"] = t
        print(f"training vim_cifar, batch 128: conv kernel {t['train_images_per_s_conv_kernel']:.1f} images/s, "
              f"PyTorch's conv {t['train_images_per_s_pytorch_conv']:.1f} images/s; step time x{t['time_ratio']:.3f} "
              f"(median of {args.train} alternating pairs)")
    results["load_after"] = os.getloadavg()[0]
    print(f"load after: {results['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
