"""The backend table: a backend registered from outside the package is chosen by name and goes away with it; scoped
choices stay in their thread; auto's choice is logged once per device."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from ssmtrim.errors import BackendUnavailableError, ConfigError
from ssmtrim.ops import (
    Backend,
    get_backend,
    register_backend,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
    set_backend,
    unregister_backend,
    use_backend,
)
from ssmtrim.ops import backend as backend_mod
from ssmtrim.ops.backend import requested_backend


def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(u=torch.randn(2, 4, 5, generator=g), delta=torch.randn(2, 4, 5, generator=g),
                A=-torch.rand(4, 3, generator=g), B=torch.randn(2, 3, 5, generator=g),
                C=torch.randn(2, 3, 5, generator=g))


@pytest.fixture
def toy():
    """A backend that runs the reference scan and counts its calls, on CPU tensors only."""
    calls = []

    def scan(*args, **kwargs):
        calls.append(args[0].shape)
        return selective_scan_ref(*args, **kwargs)

    def available(device):
        return (True, "") if device.type == "cpu" else (False, "the 'toy' scan backend runs on CPU only.")

    register_backend(Backend(name="toy", available=available, scan=scan))
    try:
        yield calls
    finally:
        unregister_backend("toy")


def test_a_registered_backend_is_chosen_by_name_and_removed_after(toy):
    x = inputs()
    with use_backend("toy"):
        assert resolve_backend("cpu") == "toy"
        out = selective_scan(**x, delta_softplus=True)
    assert toy == [(2, 4, 5)]
    torch.testing.assert_close(out, selective_scan_ref(**x, delta_softplus=True), atol=0, rtol=0)
    assert resolve_backend("cpu", "auto") != "toy"  # no priority: auto never takes it
    with pytest.raises(BackendUnavailableError, match="runs on CPU only"):
        resolve_backend("meta", "toy")
    with pytest.raises(ConfigError, match="already registered"):
        register_backend(get_backend("toy"))
    unregister_backend("toy")
    with pytest.raises(ConfigError, match="choose one of auto, ref, cpu, cuda"):
        use_backend("toy").__enter__()


def test_use_backend_is_scoped_to_its_thread_and_nests():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with use_backend("ref"):
            entered.set()
            release.wait(10)
            seen["worker"] = requested_backend()

    t = threading.Thread(target=worker)
    t.start()
    entered.wait(10)
    seen["main"] = requested_backend()  # the worker's block is open, and does not reach this thread
    release.set()
    t.join()
    assert seen == {"worker": "ref", "main": "auto"}
    with use_backend("ref"):
        with use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "ref"
    assert requested_backend() == "auto"


def test_set_backend_is_process_wide_and_use_backend_wins_inside_it():
    try:
        set_backend("ref")
        other = {}
        t = threading.Thread(target=lambda: other.setdefault("seen", requested_backend()))
        t.start()
        t.join()
        assert other["seen"] == "ref"
        with use_backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "ref"
    finally:
        set_backend(None)
    assert requested_backend() == "auto"


def test_auto_logs_its_choice_once_per_device(monkeypatch, caplog):
    monkeypatch.setattr(backend_mod, "_reported", set())
    with caplog.at_level(logging.INFO, logger="ssmtrim.ops.backend"):
        first = resolve_backend("cpu")
        resolve_backend("cpu")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"selective scan backend for cpu: {first}")
