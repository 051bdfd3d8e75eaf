"""The ``mamba_standin`` fixture: mamba-ssm and causal-conv1d replaced by the stand-in of
:mod:`tests.ops.mamba_standin`, and the ``cuda`` backend allowed on CPU tensors, for one test."""

from __future__ import annotations

import dataclasses

import pytest

from ssmtrim.ops import backends
from ssmtrim.ops.backends import cuda as cuda_backend
from tests.ops import mamba_standin


@pytest.fixture
def mamba_standin_calls(monkeypatch) -> mamba_standin.Calls:
    """Installs the stand-in where ssmtrim imports mamba-ssm from (``sys.modules``), forgets any cached import, and
    lets the table's ``cuda`` backend run on CPU tensors (its ``available`` is the only part replaced: the scan and
    the conv are the backend's own). Returns the stand-in's call record."""
    calls = mamba_standin.install(monkeypatch)
    monkeypatch.setattr(cuda_backend, "_mamba", None)
    monkeypatch.setattr(cuda_backend, "_conv", None)
    on_cpu_too = dataclasses.replace(cuda_backend.BACKEND, available=lambda device: (True, ""))
    monkeypatch.setitem(backends._table, "cuda", on_cpu_too)  # same place in the table: names keep their order
    return calls
