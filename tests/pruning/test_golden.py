"""Behaviour pinned across the reduction engine's refactor: logits and calibrated thresholds of a fixed input for every
family x strategy x mode x score (and Vim's gap and conv options), on the tiny test models and the bundled models,
are ``torch.equal`` to the ones saved before (``tests/golden/make_golden.py`` wrote them with the earlier code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning
from ssmtrim.pruning.calibrate import calibrate

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "golden.safetensors"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    with safe_open(str(GOLDEN), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        cases = {name: json.loads(v) for name, v in json.loads(f.metadata()["cases"]).items()}
    return tensors, cases


TENSORS, CASES = _load()
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
        assert torch.equal(_model(key)(TENSORS[f"input|{key}"]), TENSORS[f"dense|{key}"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_reduced_logits_unchanged(name):
    key = name.split("|")[0]
    fields = dict(CASES[name])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model, x = _model(key), TENSORS[f"input|{key}"]
    if fields.get("mode") == "threshold":
        thresholds = calibrate(model, PruneConfig(**{**fields, "mode": "count"}), x).thresholds
        expected = TENSORS[f"thresholds|{name}"]
        assert torch.equal(torch.tensor(thresholds, dtype=torch.float64), expected), (thresholds, expected)
        fields["thresholds"] = thresholds
    apply_pruning(model, PruneConfig(**fields))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        remove_pruning(model)
    expected = TENSORS[f"logits|{name}"]
    assert torch.equal(logits, expected), f"max |diff| {(logits - expected).abs().max():.3g}"
