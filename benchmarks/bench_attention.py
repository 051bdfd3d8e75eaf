"""The CPU's fused attention on sequences a reduction leaves a few tokens short of a multiple of 16, as PyTorch runs
them and padded to the multiple with the padding masked out (``ssmtrim.models.layers.self_attention``: zero rows of
the input before the q/k/v projection), each with the projection, timed in turns (median of repeats, one thread's CPU
time):

    OMP_NUM_THREADS=1 python benchmarks/bench_attention.py [--batch 64] [--heads 4] [--head-dim 16]

Prints milliseconds per call at each length and the ratio; the values agree to rounding (printed too).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ssmtrim.models.layers import self_attention


def timed(calls, iters: int = 10, repeats: int = 7) -> list[float]:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for call in calls:
        call()
    out: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, times in zip(calls, out, strict=True):
            t0 = clock()
            for _ in range(iters):
                call()
            times.append((clock() - t0) / iters * 1e3)
    return [statistics.median(t) for t in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--lengths", default="14,15,16,30,31,32,57,60,62,63,64")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, {args.heads} heads of "
          f"{args.head_dim}, a size bias (ToMe's proportional attention) on the keys")
    g = torch.Generator().manual_seed(0)
    dim = args.heads * args.head_dim
    qkv = torch.nn.Linear(dim, 3 * dim)
    with torch.no_grad():
        for length in (int(v) for v in args.lengths.split(",")):
            x = torch.randn(args.batch, length, dim, generator=g)
            bias = torch.rand(args.batch, 1, 1, length, generator=g).log()
            plain, padded = timed([lambda x=x, b=bias: as_is(x, qkv, args.heads, b),
                                   lambda x=x, b=bias: self_attention(x, qkv, args.heads, b)])
            diff = float((self_attention(x, qkv, args.heads, bias) - as_is(x, qkv, args.heads, bias)).abs().max())
            print(f"{length:4d} tokens: as is {plain:7.3f} ms, padded {padded:7.3f} ms, {plain / padded:5.2f}x "
                  f"(largest difference {diff:.1e})", flush=True)


def as_is(x, qkv, heads: int, bias):
    """The projection and PyTorch's attention on the sequence as it is (what ``self_attention`` does unpadded)."""
    bsz, length, dim = x.shape
    q, k, v = qkv(x).reshape(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(bsz, length, dim)

if __name__ == "__main__":
    main()
