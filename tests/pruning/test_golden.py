"""Behaviour pinned across the reduction engine's refactor: logits and calibrated thresholds of a fixed input for every
family x strategy x mode x score (and Vim's gap and conv options), on the tiny test models and the bundled models,
equal the ones saved before (``tests/golden/make_golden.py`` wrote them with the earlier code, on an AVX-512 Intel
Xeon) to the tolerance that holds across CPUs (``tests/tolerance.py``: 1e-5 of the largest logit, the same top-1),
and every case keeps exactly the tokens it kept (``tests/golden/kept.safetensors``: integers, the same everywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning
from ssmtrim.pruning.calibrate import calibrate
from ssmtrim.pruning.engine import reduced_forward
from tests.tolerance import assert_close_across_cpus

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "golden.safetensors"
KEPT = GOLDEN.with_name("kept.safetensors")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    with safe_open(str(GOLDEN), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cases = {name: json.loads(v) for name, v in json.loads(f.metadata()["cases"]).items()}
    return tensors, cases


TENSORS, CASES = _load()
KEPT_TENSORS: dict[str, torch.Tensor] = {}
if KEPT.exists():  # absent only while make_golden.py --kept writes it (it imports this module)
    with safe_open(str(KEPT), "pt") as _f:
        KEPT_TENSORS = {k: _f.get_tensor(k) for k in _f.keys()}
_MODELS: dict[str, torch.nn.Module] = {}


def _model(key: str) -> torch.nn.Module:
    if key not in _MODELS:
        if key.endswith("_test"):
            model = ssmtrim.create_model(key)
            prefix = f"weights|{key}|"
            model.load_state_dict({k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)})
        else:
            model = ssmtrim.load_model(str(EXAMPLES / key))
        _MODELS[key] = model.eval()
    return _MODELS[key]


@pytest.mark.parametrize("key", ["vim_test", "plainmamba_test", "vim_cifar", "plainmamba_cifar"])
def test_dense_logits_unchanged(key):
    with torch.no_grad():
        got = _model(key)(TENSORS[f"input|{key}"])
    assert_close_across_cpus(got, TENSORS[f"dense|{key}"], what=f"{key} dense logits")


@pytest.mark.parametrize("name", sorted(CASES))
def test_reduced_logits_unchanged(name):
    key = name.split("|")[0]
    fields = dict(CASES[name])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model, x = _model(key), TENSORS[f"input|{key}"]
    if fields.get("mode") == "threshold":
        thresholds = calibrate(model, PruneConfig(**{**fields, "mode": "count"}), x).thresholds
        expected = TENSORS[f"thresholds|{name}"]
        # a threshold is a score quantile: relative 1e-5, like the logits the scores came from
        assert_close_across_cpus(torch.tensor(thresholds, dtype=torch.float64), expected, what="thresholds")
        fields["thresholds"] = thresholds
    apply_pruning(model, PruneConfig(**fields))
    try:
        with torch.no_grad():
            logits = model(x)
            out = reduced_forward(model, x)
    finally:
        remove_pruning(model)
    assert torch.equal(out.logits, logits)  # the patched forward is the driver (same process, same operations)
    assert_close_across_cpus(logits, TENSORS[f"logits|{name}"], what=f"{name} logits")
    if out.state is not None:  # count mode: the same tokens survive, at the same original positions
        assert torch.equal(out.state.positions, KEPT_TENSORS[f"positions|{name}"])
    else:  # threshold mode: each image keeps its own count; the same counts
        assert out.stats.tokens_per_block == KEPT_TENSORS[f"tokens|{name}"].tolist()
