"""The scan's two exportable forms in onnxruntime, side by side: the doubling scan of the whole sequence (ONNX export's
form before) against the unrolled one (its form now, :func:`ssmtrim.ops.backends.portable._unrolled_scan`).

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_scan.py [--shapes 192x16x65,...] [--repeats 9] [--json out.json]

Each shape is E x N x L (channels, states, tokens) at batch 1: by default a Vim block's scan at 65 and 257 tokens
(``vim_cifar``, ``vim_cifar256``: 192 channels, 16 states) and VMamba's one-state scans at 256 and 64 tokens
(``vmamba_cifar64``'s first two stages). Each form is exported alone (the recurrence on random decays, inputs, B and C),
checked against the reference loop, and the two sessions (one intra-op thread) are timed in turns: median over
repeats of the mean of 20 calls. Prints microseconds per scan and the unrolled form's speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ssmtrim.ops.backends.portable import _chunked_scan, _unrolled_scan, unrolled_chunk_size
from ssmtrim.ops.backends.ref import selective_scan_ref


class Form(torch.nn.Module):
    def __init__(self, unrolled: bool) -> None:
        super().__init__()
        self.unrolled = unrolled

    def forward(self, decay, du, A, B, C):
        length = du.shape[2]
        if self.unrolled:
            return _unrolled_scan(decay, du, A, B, C, unrolled_chunk_size(length))[0]
        return _chunked_scan(decay, du, A, B, C, length)[0]


def session(module: torch.nn.Module, args: tuple, path: Path):
    import onnxruntime as ort

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(module, args, path, dynamo=True, opset_version=18, optimize=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="192x16x65,192x16x257,40x1x256,80x1x64")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json")
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one onnxruntime thread")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            e, n, length = (int(v) for v in shape.split("x"))
            g = torch.Generator().manual_seed(0)
            u, delta = torch.randn(1, e, length, generator=g), torch.rand(1, e, length, generator=g) * 0.5
            A = -torch.rand(e, n, generator=g) * 4 - 0.5
            B, C = torch.randn(1, n, length, generator=g), torch.randn(1, n, length, generator=g)
            ref = selective_scan_ref(u, delta, A, B, C).numpy()
            inputs = (delta, delta * u, A, B, C)
            sessions, errors = {}, {}
            for name, unrolled in (("doubling", False), ("unrolled", True)):
                s = session(Form(unrolled), inputs, Path(tmp) / f"{name}_{shape}.onnx")
                feed = {i.name: t.numpy() for i, t in zip(s.get_inputs(), inputs, strict=True)}
                errors[name] = float(np.abs(s.run(None, feed)[0] - ref).max() / np.abs(ref).max())
                sessions[name] = (s, feed)
            times: dict[str, list[float]] = {k: [] for k in sessions}
            for s, feed in sessions.values():
                s.run(None, feed)
            for _ in range(args.repeats):
                for k, (s, feed) in sessions.items():
                    t0 = time.perf_counter()
                    for _ in range(20):
                        s.run(None, feed)
                    times[k].append((time.perf_counter() - t0) / 20 * 1e6)
            us = {k: statistics.median(v) for k, v in times.items()}
            row = {"shape": shape, "us": us, "speedup": us["doubling"] / us["unrolled"], "max_rel_error": errors}
            rows.append(row)
            print(f"E{e} N{n} L{length}: doubling {us['doubling']:.0f} us, unrolled {us['unrolled']:.0f} us "
                  f"({row['speedup']:.2f}x); largest difference from the loop, over its largest value: "
                  f"{errors['doubling']:.1e} / {errors['unrolled']:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
