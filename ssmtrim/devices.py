"""The ``--device`` every command takes, checked before any work: a device name torch knows, present here."""

from __future__ import annotations

import torch

from ssmtrim.errors import DeviceError

_KINDS = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a :class:`~ssmtrim.errors.DeviceError` in one sentence: not a device
    name, a kind ssmtrim does not run on, or one this machine does not have (CUDA without a GPU, ``cuda:3`` on a
    machine with two)."""
    text = str(device)
    try:
        found = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"--device {text!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if found.type not in _KINDS:
        raise DeviceError(f"--device {text!r} is not a device ssmtrim runs on; use cpu, cuda or cuda:N.")
    if found.type == "cpu":
        return found
    count = _device_count(found.type)
    if count == 0:
        why = "this torch was built without CUDA" if found.type == "cuda" and torch.version.cuda is None else \
            f"no {found.type.upper()} device is available here"
        raise DeviceError(f"--device {text!r} needs a GPU, but {why}; use --device cpu.")
    if found.index is not None and found.index >= count:
        raise DeviceError(f"--device {text!r} names device {found.index}, but this machine has {count} "
                          f"{found.type} device(s) ({found.type}:0 to {found.type}:{count - 1}); pick one of them.")
    return found


def _device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    module = getattr(torch, kind, None)
    return module.device_count() if module is not None and module.is_available() else 0
