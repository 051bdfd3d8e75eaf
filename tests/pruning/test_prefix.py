"""A dense prefix (the first blocks run once, shared by several plans) gives the same logits as running the plan on
the images."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, dense_prefix, reduced_forward
from ssmtrim.pruning.calibrate import calibrate

PLANS = {"vim_test": (2, 3), "plainmamba_test": (2,)}  # 1-based reduction blocks


def model_and_images(key: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ssmtrim.create_model(key).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model, torch.randn(5, 3, 32, 32)


@pytest.mark.parametrize("key", list(PLANS))
@pytest.mark.parametrize("arrangement", ["align", "merge", "keep-order", "reorder", "tome"])
def test_a_plan_from_the_prefix_equals_the_plan_from_the_images(key, arrangement):
    model, x = model_and_images(key)
    config = PruneConfig(layers=PLANS[key], keep=(0.6,), arrangement=arrangement)
    with torch.no_grad():
        prefix = dense_prefix(model, x, min(PLANS[key]) - 1)  # all blocks before the first reduction
        got, want = reduced_forward(model, prefix, config), reduced_forward(model, x, config)
    assert torch.equal(got.logits, want.logits)
    assert got.stats.tokens_per_block == want.stats.tokens_per_block
    assert got.stats.kept_fraction == want.stats.kept_fraction


@pytest.mark.parametrize("key", list(PLANS))
def test_an_unreduced_plan_from_the_prefix_is_the_dense_model(key):
    model, x = model_and_images(key, 1)
    with torch.no_grad():
        got = reduced_forward(model, dense_prefix(model, x, 1), PruneConfig(layers=PLANS[key], keep=(1.0,)))
        assert torch.equal(got.logits, model(x))


def test_selected_images_and_threshold_mode():
    model, x = model_and_images("vim_test", 2)
    config = PruneConfig(layers=(2, 3), keep=(0.6,), mode="threshold")
    config = PruneConfig(**{**config.__dict__, "thresholds": calibrate(model, config, x).thresholds})
    with torch.no_grad():
        prefix = dense_prefix(model, x, 1)
        assert len(prefix) == 5 and len(prefix.select(slice(1, 3))) == 2
        part = reduced_forward(model, prefix.select(torch.tensor([4, 0])), config).logits
        assert torch.equal(part, reduced_forward(model, x[[4, 0]], config).logits)
        assert torch.equal(reduced_forward(model, prefix, config).logits, reduced_forward(model, x, config).logits)


def test_a_plan_that_reduces_inside_the_prefix_is_refused():
    model, x = model_and_images("vim_test")
    refused = "inside the dense prefix of 3 blocks; make the prefix at most 1 block long"
    with torch.no_grad(), pytest.raises(ConfigError, match=refused):
        reduced_forward(model, dense_prefix(model, x, 3), PruneConfig(layers=(2, 3), keep=(0.6,)))
    with pytest.raises(ConfigError, match="runs 0 to"):
        dense_prefix(model, x, 99)
