"""Free memory, and refusals of work that cannot fit in it, said before anything large is allocated (the system's
out-of-memory killer would otherwise end a run without a word, minutes in)."""

from __future__ import annotations

import torch
from torch import nn

from ssmtrim.errors import ConfigError


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# one forward's peak memory above its input, as a multiple of the largest module output: 5-16 measured for the
# bundled families on CPU (fused scan); the margin covers the rest
_ACTIVATION_FACTOR = 24


@torch.no_grad()
def check_batch_fits(model: nn.Module, input_size: tuple[int, int, int], batch_size: int,
                     option: str = "--batch-size") -> None:
    """Refuse, before anything large is allocated, a batch whose forward cannot fit in this machine's free memory
    (CPU): estimated from one image's forward (its largest module output, times a margin) and the batch's input.
    The system's out-of-memory killer would otherwise end the run without a word, minutes in."""
    free = available_bytes()
    if free is None:
        return
    params = next(iter(model.parameters()), None)
    if params is not None and params.device.type != "cpu":
        return
    largest = 0

    def hook(module, args, out):  # noqa: ARG001 - forward hook signature
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        model(torch.zeros(1, *input_size, dtype=params.dtype if params is not None else torch.float32))
    finally:
        for h in handles:
            h.remove()
    per_image = 4 * torch.Size(input_size).numel() + _ACTIVATION_FACTOR * largest
    if batch_size * per_image > free:
        fits = max(1, int(free // per_image))
        raise ConfigError(f"{option} {batch_size}: one forward needs about {batch_size * per_image / 2**30:.1f} GiB, "
                          f"more than this machine's {free / 2**30:.1f} GiB of free memory; use {option} {fits} or "
                          "less.")
