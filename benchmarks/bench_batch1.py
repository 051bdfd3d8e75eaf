"""Where a reduced model's time goes at batch 1: the blocks at each token count, the reduction steps, the rest.

    OMP_NUM_THREADS=1 python benchmarks/bench_batch1.py [--model vim_cifar256] [--keep 0.7] [--repeats 15]

One image through the model's recommended plan (merge at ``--keep`` after its recommended blocks, compensation off),
captured once, and through the dense model; then, timed in turns (one thread's CPU time, median of ``--repeats``; on
a shared machine a slow spell falls on all of them): the dense and the reduced forward, each model's blocks alone on
the captured inputs (each at the token count it ran at; also without the reduced blocks' geometry), the reduction
steps alone on the captured block outputs (score, strategy, geometry; also with PyTorch's ops in place of the
backend's merge kernels), and one block at several token counts, from which a block's fixed cost (the intercept of a
straight line through the times) and its cost per token are fitted. What a forward spends beyond its blocks (and
steps) is the embedding, the head, the engine's loop and whatever else a whole forward costs that its parts run alone
do not. Also timed: the reduced forward with each step's captured result handed over instead of computed, the most
its speed-up can be however cheap the steps become; and the realised share (speed-up / the full-convention FLOPs
ratio).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ssmtrim.bundled import bundled_or_random
from ssmtrim.flops import count_flops_all
from ssmtrim.models.loading import data_config_of
from ssmtrim.models.registry import family_of
from ssmtrim.pruning import PruneConfig, apply_pruning, engine
from ssmtrim.pruning.state import PruneStats
from ssmtrim.pruning.strategies import merge


def timed(calls: dict, repeats: int, inner: int = 5) -> dict[str, float]:
    """Milliseconds per call of each of ``calls``, median of ``repeats`` turns of ``inner`` calls each."""
    for call in calls.values():
        call()
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.thread_time()
            for _ in range(inner):
                call()
            out[name].append((time.thread_time() - t0) / inner * 1e3)
    return {name: statistics.median(v) for name, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_cifar256")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    dense = bundled_or_random(args.model)
    config = PruneConfig.recommended(dense, keep=(args.keep,), compensate="none")
    reduced = apply_pruning(bundled_or_random(args.model), config)
    family = family_of(dense)
    x = torch.randn(1, *data_config_of(dense).input_size)
    blocks, steps = [], []
    run_block, reduce_after = family.run_block, engine._reduce_after

    def capture_block(model, i, streams, state, geometry, needs=frozenset()):
        blocks.append((i, streams, state, geometry, needs))
        return run_block(model, i, streams, state, geometry, needs)

    results: dict[int, tuple] = {}  # each step's result in the captured forward, by block

    def capture_step(*step_args):
        steps.append(step_args)
        results[step_args[1]] = reduce_after(*step_args)
        return results[step_args[1]]

    family.run_block, engine._reduce_after = capture_block, capture_step
    try:
        with torch.no_grad():
            reduced(x)
            dense_blocks_from, steps_of_reduced = len(blocks), len(steps)
            # the dense model's blocks through the same engine, nothing reduced
            engine.reduced_forward(dense, x, PruneConfig(layers=(1,), keep=(1.0,)))
    finally:
        family.run_block, engine._reduce_after = run_block, reduce_after
    blocks, dense_blocks = blocks[:dense_blocks_from], blocks[dense_blocks_from:]
    del steps[steps_of_reduced:]

    def blocks_alone():
        for i, streams, state, geometry, needs in blocks:
            run_block(reduced, i, streams, state, geometry, needs)

    def blocks_without_geometry():  # the same blocks at the same token counts, as if nothing had been reduced
        for i, streams, state, _, needs in blocks:
            run_block(reduced, i, streams, state, None, needs)

    def dense_blocks_alone():
        for i, streams, state, geometry, needs in dense_blocks:
            run_block(dense, i, streams, state, geometry, needs)

    def steps_alone():
        for step_args in steps:
            reduce_after(*step_args[:-2], PruneStats(), None)

    def steps_in_torch_ops():  # the same steps without the backend's merge kernels (ssmtrim.ops.tokens)
        kernels, merge.merge_kernels = merge.merge_kernels, lambda *tensors: None
        try:
            steps_alone()
        finally:
            merge.merge_kernels = kernels

    def steps_free():  # the reduced forward with each step's captured result handed over: what the steps cost nothing
        engine._reduce_after = lambda model, i, *rest: results[i]
        try:
            reduced(x)
        finally:
            engine._reduce_after = reduce_after

    tokens = sorted({b[2].num_tokens for b in blocks}, reverse=True)
    full = next(b for b in blocks if b[2].num_tokens == tokens[0])
    index = full[0]

    def one_block(n: int):
        i, streams, state, geometry, _ = full
        cut = tuple(None if t is None else t[:, :n] for t in streams)
        return lambda: run_block(reduced, i, cut, state, None)

    sizes = [tokens[0], *tokens[1:], max(tokens[-1] // 4, 2)]
    with torch.no_grad():
        try:  # a family whose blocks read the token grid (PlainMamba) cannot run a cut sequence: no fit then
            one_block(sizes[-1])()
        except Exception:  # noqa: BLE001
            sizes = []
        got = timed({"dense": lambda: dense(x), "dense blocks": dense_blocks_alone, "reduced": lambda: reduced(x),
                     "steps free": steps_free,
                     "blocks": blocks_alone, "blocks, no geometry": blocks_without_geometry,
                     "steps": steps_alone, "steps, torch ops": steps_in_torch_ops,
                     **{f"block@{n}": one_block(n) for n in sizes}}, args.repeats)
    n_steps = len(steps)
    print(f"{args.model}: {config.arrangement} at keep {args.keep} after {config.layers}, tokens per block "
          f"{[b[2].num_tokens for b in blocks]}, one image, one thread's CPU time, median of {args.repeats}")
    print(f"  dense forward           {got['dense']:7.2f} ms")
    print(f"    its blocks alone      {got['dense blocks']:7.2f} ms   (the rest: "
          f"{got['dense'] - got['dense blocks']:.2f} ms)")
    flops = [count_flops_all(m)["full"].total for m in (dense, reduced)]
    ratio = flops[0] / flops[1]
    print(f"  reduced forward         {got['reduced']:7.2f} ms   speed-up {got['dense'] / got['reduced']:.2f}x, "
          f"realised {got['dense'] / got['reduced'] / ratio:.2f} ({ratio:.2f}x fewer FLOPs, full)")
    print(f"    its steps free        {got['steps free']:7.2f} ms   speed-up {got['dense'] / got['steps free']:.2f}x, "
          f"realised {got['dense'] / got['steps free'] / ratio:.2f} (each step's result handed over: the most the "
          "steps can give)")
    print(f"    its blocks alone      {got['blocks']:7.2f} ms   (the dense blocks / these: "
          f"{got['dense blocks'] / got['blocks']:.2f}x)")
    reduced_blocks = sum(b[3] is not None for b in blocks)
    extra = (got["blocks"] - got["blocks, no geometry"]) / max(reduced_blocks, 1) * 1e3
    print(f"      without their geometry  {got['blocks, no geometry']:7.2f} ms   (the gap decay and conv positions: "
          f"{extra:.0f} us a reduced block)")
    per_step = got["steps"] / max(n_steps, 1)
    print(f"    its {n_steps} steps alone     {got['steps']:7.2f} ms   ({per_step:.2f} ms a step)")
    print(f"      the same in PyTorch ops {got['steps, torch ops']:7.2f} ms   (without the backend's merge kernels)")
    print(f"    the rest              {got['reduced'] - got['blocks'] - got['steps']:7.2f} ms")
    if not sizes:
        print("  (its blocks read the token grid: no block timed alone at other token counts)")
        return
    ns = torch.tensor([float(n) for n in sizes])
    ts = torch.tensor([got[f"block@{n}"] for n in sizes])
    slope = float(((ns - ns.mean()) * (ts - ts.mean())).sum() / ((ns - ns.mean()) ** 2).sum())
    fixed = float(ts.mean() - slope * ns.mean())
    cells = ", ".join(f"{n} tokens {got[f'block@{n}']:.2f}" for n in sizes)
    print(f"  block {index + 1} alone (ms): {cells}; fitted: {fixed:.2f} ms fixed + {slope * 1e3:.1f} us a token")


if __name__ == "__main__":
    main()
