"""The one place that chooses how the selective scan runs.

Backends:
- ``ref``: the readable PyTorch loop (:func:`ssmtrim.ops.selective_scan.selective_scan_ref`), any device;
- ``cpu``: the fused C kernel (fp32 maths, compiled at first use), CPU tensors;
- ``cuda``: mamba-ssm's CUDA kernel (``selective_scan_fn``), CUDA tensors, when mamba-ssm is installed;
- ``auto`` (default): ``cuda`` for CUDA tensors when mamba-ssm is importable, ``cpu`` for CPU tensors when the
  kernel builds, else ``ref``.

Chosen by, in order: :func:`use_backend` / :func:`set_backend`, the ``SSMTRIM_SCAN_BACKEND`` environment variable,
``auto``. mamba-ssm is imported lazily, never on ``import ssmtrim`` (it initialises CUDA and is a heavy import).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator

import torch

from ssmtrim.errors import BackendUnavailableError, ConfigError
from ssmtrim.ops import _cpu_kernel

BACKENDS = ("auto", "ref", "cpu", "cuda")
ENV_VAR = "SSMTRIM_SCAN_BACKEND"
MAMBA_INSTALL = "pip install torch packaging ninja && pip install causal-conv1d mamba-ssm --no-build-isolation"

log = logging.getLogger(__name__)
_override: str | None = None
_mamba: tuple[Callable | None, str] | None = None
_reported: set[tuple[str, str]] = set()


def _validate(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ConfigError(f"{origin} is {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


def requested_backend() -> str:
    """The backend asked for (may be ``auto``), before looking at the device."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    return _validate(env, f"the environment variable {ENV_VAR}") if env else "auto"


def set_backend(name: str | None) -> None:
    """Set the scan backend for this process (``None`` returns to the environment variable / ``auto``)."""
    global _override
    _override = None if name is None else _validate(name, "the scan backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another scan backend, e.g. ``with use_backend("ref"): model(x)``."""
    global _override
    previous, _override = _override, _validate(name, "the scan backend")
    try:
        yield
    finally:
        _override = previous


def mamba_selective_scan() -> tuple[Callable | None, str]:
    """mamba-ssm's ``selective_scan_fn`` and its version, or ``(None, reason)``; imported once, on first ask."""
    global _mamba
    if _mamba is None:
        try:
            mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
            version = getattr(importlib.import_module("mamba_ssm"), "__version__", "unknown version")
            _mamba = (mod.selective_scan_fn, f"mamba-ssm {version}")
        except Exception as exc:  # ImportError, or a CUDA build that does not match this torch
            _mamba = (None, f"mamba-ssm not importable ({type(exc).__name__}: {exc})")
    return _mamba


def resolve_backend(device: torch.device | str, name: str | None = None) -> str:
    """The concrete backend (``ref``, ``cpu`` or ``cuda``) for tensors on ``device``."""
    device = torch.device(device)
    name = _validate(name, "the scan backend") if name is not None else requested_backend()
    if name == "cuda":
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"the 'cuda' scan backend needs CUDA tensors but the model runs on {device.type}; move it with "
                "--device cuda or choose --backend auto."
            )
        if mamba_selective_scan()[0] is None:
            raise BackendUnavailableError(
                f"the 'cuda' scan backend needs mamba-ssm, which is not installed; install it with `{MAMBA_INSTALL}`."
            )
        return "cuda"
    if name == "cpu":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"the 'cpu' scan backend runs on CPU tensors but the model is on {device.type}; choose --backend auto."
            )
        status = _cpu_kernel.status()
        if not status.available:
            raise BackendUnavailableError(
                f"the fast CPU scan is unavailable ({status.detail}); install gcc or choose --backend ref."
            )
        return "cpu"
    if name == "ref":
        return "ref"
    # auto
    if device.type == "cuda":
        chosen = "cuda" if mamba_selective_scan()[0] is not None else "ref"
    elif device.type == "cpu":
        chosen = "cpu" if _cpu_kernel.status().available else "ref"
    else:
        chosen = "ref"
    key = (device.type, chosen)
    if key not in _reported:
        _reported.add(key)
        reason = ""
        if chosen == "ref" and device.type == "cuda":
            reason = f" ({mamba_selective_scan()[1]}; install: {MAMBA_INSTALL})"
        elif chosen == "ref" and device.type == "cpu":
            reason = f" ({_cpu_kernel.status().detail})"
        log.info("selective scan backend for %s: %s%s", device.type, chosen, reason)
    return chosen


def describe_backends() -> dict[str, str]:
    """What each backend would do here, for ``ssmtrim info``."""
    cpu = _cpu_kernel.status()
    mamba_fn, mamba_detail = mamba_selective_scan()
    cuda_ok = torch.cuda.is_available()
    return {
        "requested": requested_backend(),
        "cpu tensors": resolve_backend("cpu", "auto"),
        "cuda tensors": (resolve_backend("cuda", "auto") if cuda_ok else "no CUDA device"),
        "fast CPU kernel": cpu.detail if cpu.available else f"unavailable: {cpu.detail}",
        "mamba-ssm": mamba_detail if mamba_fn is not None else f"{mamba_detail}; install: {MAMBA_INSTALL}",
    }
