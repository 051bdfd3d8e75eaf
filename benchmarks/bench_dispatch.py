"""What it costs to reach a C kernel through a registered op, as a compiled graph does: the token-major scan of a few
tokens called directly, as the op ``ssmtrim::tokens_scan`` (a plain CPU kernel of a schema, what ssmtrim registers)
and as a ``torch.library.custom_op`` wrapping the same function (the other way to register it), timed in turns.

    OMP_NUM_THREADS=1 python benchmarks/bench_dispatch.py [--tokens 1] [--repeats 7]

Prints microseconds a call (thread CPU time, median of ``--repeats`` turns of 3,000 calls each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssmtrim.ops.backends import cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    e, n, length = 192, 16, args.tokens

    def direction():  # Vim-T's mixer sizes, rows as its projections give them, with a gap (a reduced sequence)
        rows = torch.randn(1, length, 2 * e, generator=g)
        bc = torch.randn(1, length, 38, generator=g)
        return (rows[:, :, :e], torch.randn(1, length, e, generator=g), -torch.rand(e, n, generator=g),
                bc[:, :, 6:22], bc[:, :, 22:], torch.ones(e), torch.rand(e, generator=g),
                torch.rand(1, length, generator=g), torch.rand(1, e, generator=g))

    z = torch.randn(1, length, 2 * e, generator=g)[:, :, e:]
    inputs = (*direction(), *direction(), z, True)
    wrapped = torch.library.custom_op("ssmtrim_bench::tokens_scan", cpu._scan_tokens, mutates_args=())
    calls = {
        "direct call": lambda: cpu._scan_tokens(*inputs),
        "ssmtrim::tokens_scan (schema + CPU kernel)": lambda: torch.ops.ssmtrim.tokens_scan(*inputs),
        "torch.library.custom_op of the same": lambda: wrapped(*inputs),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(args.repeats):
            for name, call in calls.items():
                t0 = time.thread_time()
                for _ in range(3000):
                    call()
                times[name].append((time.thread_time() - t0) / 3000 * 1e6)
    print(f"token-major scan of {length} token(s), both directions, E={e}, N={n}, {torch.get_num_threads()} thread(s)")
    for name, t in times.items():
        print(f"  {name:45s} {statistics.median(t):6.1f} us a call")


if __name__ == "__main__":
    main()
