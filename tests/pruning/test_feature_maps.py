"""Dense outputs: each stage's map on its full grid, from a dense or a reduced model (restored), for every family that
gives them; a dense model's maps are what its own forward computes."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.pruning import PruneConfig, apply_pruning, feature_maps
from tests.models.test_vim import randomise


def _model(name: str):
    torch.manual_seed(0)
    model = ssmtrim.create_model(name).eval()
    randomise(model, 2)
    return model


def _images(model, n=2):
    h = w = model.config.img_size if isinstance(model.config.img_size, int) else None
    return torch.randn(n, 3, h, w)


def test_vmamba_dense_maps_are_its_stage_outputs():
    model = _model("vmamba_test")
    x = _images(model)
    with torch.no_grad():
        for got, want in zip(feature_maps(model, x), model.forward_stages(x), strict=True):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["vim_test", "mambar_test"])
def test_flat_dense_maps_are_the_normed_patch_tokens(name):
    model = _model(name)
    x = _images(model)
    (got,) = feature_maps(model, x)
    with torch.no_grad():
        tokens = model.forward_features(x)
    keep = [i for i in range(tokens.shape[1]) if i not in model.config.protected_positions]
    h, w = model.config.grid_size
    assert torch.equal(got, tokens[:, keep].transpose(1, 2).reshape(2, -1, h, w))


@pytest.mark.parametrize("name, arrangement", [("vmamba_test", "merge"), ("vmamba_test", "align"),
                                               ("vim_test", "merge"), ("vim_test", "keep-order"),
                                               ("vim_test", "reorder"), ("mambar_test", "tome"),
                                               ("plainmamba_cifar", "merge"), ("mambavision_test", "merge")])
def test_a_reduced_model_gives_maps_on_the_full_grid(name, arrangement):
    model = _model(name)
    x = _images(model)
    dense = feature_maps(model, x)
    first = PruneConfig.recommended(model).layers[:1]  # a block its family can reduce after
    metric = "y" if arrangement in ("merge", "tome") else "input"
    plan = PruneConfig(layers=first, keep=(0.5,), arrangement=arrangement, metric=metric)
    reduced = feature_maps(apply_pruning(model, plan), x)
    assert [m.shape for m in reduced] == [m.shape for m in dense]
    assert all(torch.isfinite(m).all() for m in reduced)
    assert not torch.equal(reduced[-1], dense[-1])  # tokens were reduced
