"""A model as a backbone (timm's ``features_only``): each stage's map on its full grid, from Python and from a saved
reduced folder, with ``feature_info``; gradients reach the weights."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning, feature_maps
from ssmtrim.pruning.backbone import Backbone

from ..conftest import randomize


def test_a_saved_reduced_folder_loads_as_a_backbone(tmp_path):
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vmamba_test"))  # dims 16/32, 32x32 input: 8x8 then 4x4 grids
    apply_pruning(model, PruneConfig.recommended(model, layers=(1,), keep=(0.6,), compensate="none"))
    folder = ssmtrim.save_model(model, tmp_path / "reduced")
    backbone = ssmtrim.load_model(folder, features_only=True)
    assert isinstance(backbone, Backbone)
    assert backbone.channels() == [16, 32] and backbone.reductions() == [4, 8]
    assert [f["module"] for f in backbone.feature_info] == ["layers.0.blocks.0", "layers.1.blocks.1"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = backbone(x)
    want = feature_maps(model, x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    for got, ref in zip(maps, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_a_dense_flat_model_and_gradients():
    torch.manual_seed(0)
    backbone = Backbone(randomize(ssmtrim.create_model("vim_test")))  # 32x32, patch 8: one 4x4 map of 32 channels
    assert backbone.channels() == [32] and backbone.reductions() == [8]
    maps = backbone(torch.randn(1, 3, 32, 32))
    maps[0].sum().backward()
    assert backbone.model.patch_embed.proj.weight.grad is not None


def test_a_model_without_feature_maps_is_refused(monkeypatch):
    model = ssmtrim.create_model("vim_test")
    family = type(ssmtrim.models.registry.family_of(model))
    monkeypatch.delattr(family, "feature_map")
    with pytest.raises(ConfigError, match="cannot serve as a backbone"):
        Backbone(model)
