"""Data-parallel training under ``torchrun``: joining the process group and checking that ranks agree."""

from __future__ import annotations

import os

import torch
from torch import nn


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torchrun``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on CUDA); no-op otherwise."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist_info()


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def weights_checksum(model: nn.Module) -> float:
    """A float64 checksum of every parameter and buffer, for checking that ranks hold the same weights."""
    with torch.no_grad():
        return float(sum(t.detach().double().abs().sum() + t.detach().double().sum() * (i % 7 + 1)
                         for i, t in enumerate(model.state_dict().values()) if t.is_floating_point()))
