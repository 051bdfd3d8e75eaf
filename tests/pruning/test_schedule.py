"""From a FLOPs target to a schedule: the token arithmetic, the FLOPs estimate, the search and its errors."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.flops import count_flops
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning
from ssmtrim.pruning.schedule import FlopsModel, search_schedule, tokens_per_block


def test_tokens_per_block_follow_the_released_vim_schedule():
    model = ssmtrim.create_model("vim_tiny")
    assert tokens_per_block(model, (5, 10, 15), 0.8) == [197] * 5 + [157] * 5 + [125] * 5 + [101] * 9


def test_flops_estimate_is_close_to_the_count():
    model = ssmtrim.create_model("vim_small").eval()
    estimate = FlopsModel(model, "paper").ratio((5, 10, 15), 0.8)
    apply_pruning(model, PruneConfig(layers=(5, 10, 15), keep=(0.8,)))
    try:
        counted = count_flops(model, convention="paper").total / count_flops(
            ssmtrim.create_model("vim_small"), convention="paper").total
    finally:
        remove_pruning(model)
    print(f"\nestimate {estimate:.4f} counted {counted:.4f}")
    assert abs(estimate - counted) < 0.01


@pytest.fixture(scope="module")
def small_vim():
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", depth=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, images, model(images)


def test_search_meets_the_target_and_picks_the_closest(small_vim):
    model, images, dense = small_vim
    found = search_schedule(model, PruneConfig(layers=(1,), keep=(1.0,)), 0.7, images, dense)
    assert found.chosen.measured_ratio <= 0.7 + 0.005
    first_round = found.candidates[: len({c.layers for c in found.candidates})]
    best = min(first_round, key=lambda c: c.kl)
    assert found.chosen.layers == best.layers  # the closest to dense wins (its keep may be tightened after)
    assert len(first_round) >= 5 and all(c.estimated_ratio <= 0.7 + 1e-9 for c in first_round)
    assert type(model).__name__ == "VisionMamba"  # the search leaves the model dense


def test_unreachable_and_bad_targets(small_vim):
    model, images, dense = small_vim
    with pytest.raises(ConfigError, match="unreachable"):
        search_schedule(model, PruneConfig(layers=(1,), keep=(1.0,)), 0.05, images, dense)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        search_schedule(model, PruneConfig(layers=(1,), keep=(1.0,)), 1.5, images, dense)


def test_tokens_per_block_take_a_keep_per_step():
    model = ssmtrim.create_model("vim_tiny")
    assert tokens_per_block(model, (5, 10), (0.8, 0.5)) == [197] * 5 + [157] * 5 + [79] * 14
    assert tokens_per_block(model, (5, 10), (0.8, 0.8)) == tokens_per_block(model, (5, 10), 0.8)


def test_allocated_keeps_meet_the_target_and_beat_the_common_ratio(small_vim):
    from ssmtrim.pruning.schedule import allocate_keeps, keep_for

    model, images, dense = small_vim
    base = PruneConfig(layers=(2, 4, 6), keep=(1.0,), arrangement="merge")
    keeps, tried = allocate_keeps(model, base, 0.7, images, dense, spread=(-0.1, 0.0, 0.1))
    assert len(keeps) == 3 and all(t["estimated_ratio"] <= 0.7 + 1e-9 for t in tried)
    common = keep_for(FlopsModel(model), base.layers, 0.7)
    same = [t for t in tried if abs(t["keep"][0] - common) < 1e-3 and abs(t["keep"][1] - common) < 1e-3]
    assert len(same) == 1  # the common ratio is a candidate (its last step solved to about the same value)
    best = min(t["kl"] for t in tried)
    assert next(t["kl"] for t in tried if tuple(t["keep"]) == keeps) == best <= same[0]["kl"]
    assert type(model).__name__ == "VisionMamba"  # left dense
