"""Head compensation: the fitted map is the ridge solution written out, folding it into the classifier equals applying
it to the feature, it brings the reduced feature closer to the dense one, the true dense weights survive (dense_of,
remove_pruning, save and reload), and too few images are handled in one sentence."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning, prune, reduced_forward, remove_pruning
from ssmtrim.pruning.compensation import compensate_head
from ssmtrim.pruning.engine import changed_weights, dense_of


def _model(name):
    torch.manual_seed(0)
    model = ssmtrim.create_model(name).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _images(model, n, seed):
    s = model.config.img_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vim_test", "plainmamba_test"])
def test_head_compensation_is_the_ridge_fit_folded_into_the_classifier(name):
    model = _model(name)
    calib, x = _images(model, 48, 1), _images(model, 5, 2)
    plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge")
    with torch.no_grad():
        dense_logits = model(x)
        f_r = reduced_forward(model, calib, plan).features.double()
        f_d = reduced_forward(model, calib, PruneConfig(layers=(1,), keep=(1.0,))).features.double()
        w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    apply_pruning(model, plan)
    result = compensate_head(model, calib, alpha=0.1)
    # the ridge solution toward the identity, written out
    xc, yc = f_r - f_r.mean(0), f_d - f_d.mean(0)
    d = f_r.shape[1]
    lam = 0.1 * float(torch.trace(xc.T @ xc)) / d
    m = torch.linalg.solve(xc.T @ xc + lam * torch.eye(d, dtype=torch.float64), xc.T @ yc + lam * torch.eye(d,
                           dtype=torch.float64))  # fmt: skip
    c = f_d.mean(0) - f_r.mean(0) @ m
    with torch.no_grad():
        feats = reduced_forward(model, x, plan).features.double()
        expected = (feats @ m + c) @ w0.double().T + b0.double()
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert result.feature_error_after < result.feature_error_before
    assert set(result.changed) == {"head.weight", "head.bias"} and result.num_images == 48 and not result.note
    assert torch.equal(changed_weights(model)["head.weight"], w0)
    with torch.no_grad():
        assert torch.equal(dense_of(model)(x), dense_logits)  # the true dense model, not the compensated head
    remove_pruning(model)
    with torch.no_grad():
        assert torch.equal(model(x), dense_logits) and type(model).__name__ != "ReducedModel"


def test_compensated_folder_reloads_with_its_dense_weights(tmp_path):
    model = _model("vim_test")
    x = _images(model, 4, 3)
    with torch.no_grad():
        dense_logits = model(x)
    result = prune(model, PruneConfig(layers=(1, 2), keep=(0.6,), arrangement="merge", conv="kept",
                                      compensate="head"), data=_images(model, 40, 4))  # fmt: skip
    assert result.compensation is not None and result.compensation.kind == "head"
    with torch.no_grad():
        logits = model(x)
    ssmtrim.save_model(model, tmp_path / "out")
    config = (tmp_path / "out" / "config.json").read_text()
    assert '"dense_weights"' in config and '"compensate": "head"' in config
    again = ssmtrim.load_model(str(tmp_path / "out"))
    with torch.no_grad():
        assert torch.equal(again(x), logits)  # the compensated weights, no refit on load
        assert torch.equal(dense_of(again)(x), dense_logits)


def test_few_images_raise_alpha_and_one_image_is_refused():
    model = _model("vim_test")
    apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
    try:
        result = compensate_head(model, _images(model, 8, 5), alpha=0.1)
        assert result.alpha == pytest.approx(0.1 * 32 / 8) and "only 8 images" in result.note
        with pytest.raises(ConfigError, match="at least 2 calibration images"):
            compensate_head(model, _images(model, 1, 6))
    finally:
        remove_pruning(model)
    with pytest.raises(ConfigError, match="--compensate head needs calibration images"):
        prune(model, PruneConfig(layers=(1,), keep=(0.5,), compensate="head"))
    with pytest.raises(ConfigError, match="--compensate 'ridge' is not one of none, head"):
        PruneConfig(layers=(1,), keep=(0.5,), compensate="ridge")
    with pytest.raises(ConfigError, match="--compensate-alpha -1"):
        PruneConfig(layers=(1,), keep=(0.5,), compensate="head", compensate_alpha=-1)
