"""The table of selective-scan backends: one module per backend, each defining one :class:`Backend` object, all
registered here. :func:`ssmtrim.ops.backend.resolve_backend` chooses among them.

Built in: ``ref`` (:mod:`.ref`), ``cpu`` (:mod:`.cpu`), ``cuda`` (:mod:`.cuda`), ``portable`` (:mod:`.portable`).
A new backend is one new module that defines a ``Backend`` plus one line in ``_BUILTIN`` below (or, from outside the
package, :func:`register_backend`, e.g. in a test).
"""

from __future__ import annotations

import threading

from ssmtrim.errors import ConfigError
from ssmtrim.ops.backends import cpu, cuda, portable, ref
from ssmtrim.ops.backends.base import Backend, ConvKernel, ScanFn

__all__ = ["Backend", "ConvKernel", "ScanFn", "backend_names", "by_priority", "get_backend", "register_backend",
           "registered_backends", "unregister_backend"]

_BUILTIN = (ref.BACKEND, cpu.BACKEND, cuda.BACKEND, portable.BACKEND)

_lock = threading.Lock()
_table: dict[str, Backend] = {b.name: b for b in _BUILTIN}
_ranked: tuple[Backend, ...] = ()  # auto's candidates, highest priority first; rebuilt on every change


def _rank() -> None:
    global _ranked
    candidates = [b for b in _table.values() if b.priority is not None]
    _ranked = tuple(sorted(candidates, key=lambda b: -b.priority))  # stable: registration order breaks ties


_rank()


def register_backend(backend: Backend) -> None:
    """Add a backend to the table (selectable by name; by ``auto`` too when it has a priority)."""
    if backend.name == "auto" or not backend.name.isidentifier() or backend.name.lower() != backend.name:
        raise ConfigError(f"a backend name must be a lower-case identifier other than 'auto', not {backend.name!r}.")
    with _lock:
        if backend.name in _table:
            raise ConfigError(f"a scan backend named {backend.name!r} is already registered; unregister it first.")
        _table[backend.name] = backend
        _rank()


def unregister_backend(name: str) -> None:
    """Remove a backend from the table (a no-op for a name that is not there)."""
    with _lock:
        _table.pop(name, None)
        _rank()


def get_backend(name: str) -> Backend:
    """The registered backend called ``name`` (not ``auto``: see :func:`ssmtrim.ops.backend.resolve_backend`)."""
    try:
        return _table[name]
    except KeyError:
        raise ConfigError(f"no scan backend is called {name!r}; choose one of {', '.join(backend_names())}.") from None


def registered_backends() -> tuple[Backend, ...]:
    """Every registered backend, in registration order."""
    return tuple(_table.values())


def by_priority() -> tuple[Backend, ...]:
    """The backends ``auto`` may take, highest priority first."""
    return _ranked


def backend_names() -> tuple[str, ...]:
    """What a user may ask for: ``auto`` and every registered backend."""
    return ("auto", *_table)
