"""Work spread over the processes ``torchrun`` starts: joining the process group, and for evaluation and calibration
contiguous shards of the images with sums and gathers across ranks.

Training uses the process group for data parallelism (:mod:`ssmtrim.training`). Evaluation, calibration, the
compensation fit, the schedule search and the report split their images only inside :func:`sharded`, so that a
library call made on one rank alone (fine-tune's rank-0 evaluation) never waits for ranks that do not call it.
Inside it each rank takes one contiguous block of the images in their global order (sizes differ by at most one, no
padding, so no image is counted twice), computes on it, and counts, sums and score lists are combined across ranks:
counts exactly (int64), sums in float64, gathered lists in rank order, which is the images' global order. Outside it,
or in a single process, every helper here is the identity.

    with sharded("cuda") as (rank, world):      # under torchrun: NCCL on CUDA, gloo on CPU
        result = evaluate(model, "val/")          # the same result on every rank
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_SHARDED: ContextVar[bool] = ContextVar("ssmtrim_sharded", default=False)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) outside ``torchrun``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA; each rank then uses the
    GPU of its ``LOCAL_RANK`` as ``cuda``); no-op otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist_info()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def sharded(device: str = "cpu") -> Iterator[tuple[int, int]]:
    """Inside the block, evaluation and calibration split their images over the process group (joined here when
    launched by ``torchrun``, and left again on exit if joined here); yields (rank, world size)."""
    import torch.distributed as dist

    joined = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    token = _SHARDED.set(True)
    try:
        yield info
    finally:
        _SHARDED.reset(token)
        if joined and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def work_split() -> tuple[int, int]:
    """(rank, world size) that evaluation and calibration split their images over: the process group's inside
    :func:`sharded`, else (0, 1)."""
    return dist_info() if _SHARDED.get() else (0, 1)


def is_main() -> bool:
    """True on the rank that prints and writes outputs (rank 0; always in a single process)."""
    return dist_info()[0] == 0


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous block of ``n`` items split over ``world`` ranks (sizes differ by at
    most one; the blocks tile 0..n in rank order)."""
    return n * rank // world, n * (rank + 1) // world


def shard_images(images: Any) -> Any:
    """This rank's block of an :class:`ssmtrim.data.ImageSet` (paths and labels; classes and layout kept)."""
    lo, hi = shard_bounds(len(images), *work_split())
    return dataclasses.replace(images, paths=images.paths[lo:hi], labels=images.labels[lo:hi])


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_counts(*counts: int) -> tuple[int, ...]:
    """Each count summed over the ranks, exactly (int64)."""
    if work_split()[1] == 1:
        return tuple(int(c) for c in counts)
    import torch.distributed as dist

    t = torch.tensor(counts, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return tuple(int(v) for v in t.tolist())


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in float64 (a new tensor, on ``t``'s device; the same shape on every rank)."""
    out = t.detach().double()
    if work_split()[1] == 1:
        return out.clone()
    import torch.distributed as dist

    buf = out.to(_comm_device()).contiguous()
    dist.all_reduce(buf)
    return buf.to(t.device)


def sum_floats(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks in float64."""
    return tuple(float(v) for v in sum_tensor(torch.tensor(values, dtype=torch.float64)).tolist())


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank."""
    return sum_counts(0 if flag else 1)[0] == 0


def gather_list(items: list[T]) -> list[T]:
    """Every rank's ``items`` concatenated in rank order (the images' global order when each rank holds its block);
    items travel pickled, so pass tensors on the CPU."""
    if work_split()[1] == 1:
        return list(items)
    import torch.distributed as dist

    parts: list[list[T] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def global_span(count: int) -> tuple[int, int]:
    """(first global index, total) of this rank's ``count`` items, the ranks' items taken in rank order."""
    rank = work_split()[0]
    counts = gather_list([count])
    return sum(counts[:rank]), sum(counts)


def local_prefix(count: int, first: int) -> int:
    """How many of this rank's ``count`` items are among the first ``first`` items globally."""
    start, _ = global_span(count)
    return max(0, min(count, first - start))


def leading(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of the ranks' ``rows`` taken in rank order, the same on every rank (``rows[:n]`` in one
    process)."""
    if work_split()[1] == 1:
        return rows[:n]
    gathered = gather_list(list(rows[: local_prefix(len(rows), n)].cpu()))
    return torch.stack(gathered).to(rows.device) if gathered else rows[:0]
