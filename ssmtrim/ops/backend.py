"""The one place that chooses how the selective scan runs.

Backends (one module each in :mod:`ssmtrim.ops.backends`, registered in its table):
- ``ref``: the readable PyTorch loop (:func:`ssmtrim.ops.selective_scan.selective_scan_ref`), any device;
- ``cpu``: the fused C kernel (fp32 maths, compiled at first use), CPU tensors;
- ``cuda``: mamba-ssm's CUDA kernel (``selective_scan_fn``), CUDA tensors, when mamba-ssm is installed;
- ``portable``: the chunked scan in plain PyTorch, parallel over the sequence, any device;
- ``auto`` (default): the available backend of highest priority for the tensors' device: for CUDA tensors ``cuda``
  when mamba-ssm is importable, else ``portable``; ``portable`` for MPS tensors; for CPU tensors ``cpu`` when the
  kernel builds, else ``ref``.

Chosen by, in order: :func:`use_backend` (scoped to the block, per thread and task: a ``contextvars.ContextVar``),
:func:`set_backend` (the process-wide default), the ``SSMTRIM_SCAN_BACKEND`` environment variable, ``auto``.
mamba-ssm is imported lazily, never on ``import ssmtrim`` (it initialises CUDA and is a heavy import).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator

import torch

from ssmtrim.errors import BackendUnavailableError, ConfigError
from ssmtrim.ops.backends import Backend, backend_names, by_priority, get_backend, registered_backends
from ssmtrim.ops.backends.base import constant_when_compiled
from ssmtrim.ops.backends.cuda import MAMBA_INSTALL, mamba_selective_scan

__all__ = ["BACKENDS", "ENV_VAR", "MAMBA_INSTALL", "backend_for", "describe_backends", "mamba_selective_scan",
           "requested_backend", "resolve_backend", "set_backend", "use_backend"]

BACKENDS = ("auto", "ref", "cpu", "cuda", "portable")  # built in; backend_names() includes any registered later
ENV_VAR = "SSMTRIM_SCAN_BACKEND"

log = logging.getLogger(__name__)
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("ssmtrim_scan_backend", default=None)


class _ProcessDefault:
    """What :func:`set_backend` chose: one value for every thread of the process, as its docstring promises."""

    def __init__(self) -> None:
        self.name: str | None = None


_process = _ProcessDefault()
_reported: set[tuple[str, str]] = set()  # (device type, backend) already logged by auto
_report_lock = threading.Lock()


def _validate(name: str, origin: str) -> str:
    name = name.strip().lower()
    names = backend_names()
    if name not in names:
        raise ConfigError(f"{origin} is {name!r}; choose one of {', '.join(names)}.")
    return name


def requested_backend() -> str:
    """The backend asked for (may be ``auto``), before looking at the device."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _process.name is not None:
        return _process.name
    env = os.environ.get(ENV_VAR)
    return _validate(env, f"the environment variable {ENV_VAR}") if env else "auto"


def set_backend(name: str | None) -> None:
    """Set the scan backend for this process (``None`` returns to the environment variable / ``auto``); a
    :func:`use_backend` block still takes precedence inside it."""
    _process.name = None if name is None else _validate(name, "the scan backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another scan backend, e.g. ``with use_backend("ref"): model(x)``. Scoped to this thread (or
    asyncio task) and re-entrant: nested blocks restore the outer choice."""
    token = _scoped.set(_validate(name, "the scan backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


@constant_when_compiled  # a compiled graph takes the backend chosen when it was compiled
def resolve_backend(device: torch.device | str, name: str | None = None) -> str:
    """The name of the concrete backend (``ref``, ``cpu``, ``cuda``, ``portable`` or another registered one) for
    tensors on ``device``. Under ``torch.compile`` it is asked once, when the graph is made."""
    device = torch.device(device)
    name = _validate(name, "the scan backend") if name is not None else requested_backend()
    if name != "auto":
        ok, reason = get_backend(name).available(device)
        if not ok:
            raise BackendUnavailableError(reason)
        return name
    passed_over: Backend | None = None
    for backend in by_priority():
        if backend.devices is not None and device.type not in backend.devices:
            continue  # not meant for this device (and asking would cost a formatted reason per scan)
        if backend.available(device)[0]:
            chosen = backend
            break
        if passed_over is None and backend.devices is not None:
            passed_over = backend  # meant for this device but missing something: the log line says what
    else:  # only when ref has been unregistered
        raise BackendUnavailableError(f"no registered scan backend runs on {device.type}; register one or choose "
                                      "--backend ref.")
    key = (device.type, chosen.name)
    if key not in _reported:
        with _report_lock:
            if key not in _reported:
                _reported.add(key)
                note = passed_over.note() if passed_over is not None and passed_over.note is not None else ""
                log.info("selective scan backend for %s: %s%s", device.type, chosen.name, f" ({note})" if note else "")
                if passed_over is not None:  # a slower fallback is said aloud, not only under -v
                    from ssmtrim.notices import notice

                    notice(f"scan-fallback:{device.type}", f"the {passed_over.name!r} selective scan cannot run on "
                           f"{device.type} ({note or 'unavailable'}), so the slower {chosen.name!r} scan is used.")
    return chosen.name


def backend_for(device: torch.device | str, name: str | None = None) -> Backend:
    """The :class:`~ssmtrim.ops.backends.Backend` object :func:`resolve_backend` names."""
    return get_backend(resolve_backend(device, name))


def describe_backends() -> dict[str, str]:
    """What each backend would do here, for ``ssmtrim info``."""
    rows = {
        "requested": requested_backend(),
        "cpu tensors": resolve_backend("cpu", "auto"),
        "cuda tensors": (resolve_backend("cuda", "auto") if torch.cuda.is_available() else "no CUDA device"),
    }
    for backend in registered_backends():
        if backend.describe is not None:
            rows.update(backend.describe())
    return rows
