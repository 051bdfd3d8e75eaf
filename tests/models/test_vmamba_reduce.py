"""VMamba with tokens reduced inside its stages and the grid restored where it is needed (a downsample, the pooled
head): the reduced SS2D is the dense one when it keeps every token, restore un-merges merged tokens and fills pruned
positions from their nearest token, and strategies that make a new sequence are refused."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import TokenState, owners, restore_tokens
from ssmtrim.models.vmamba import reduced_geometry
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.engine import reduced_forward
from tests.models.test_vim import randomise
from tests.tolerance import assert_close_across_cpus


def randomised_vmamba():
    """The test VMamba with seeded random weights (shared by the VMamba reduction tests)."""
    torch.manual_seed(0)
    m = ssmtrim.create_model("vmamba_test").eval()
    randomise(m, 1)
    return m


@pytest.fixture(scope="module")
def model():
    return randomised_vmamba()


@pytest.mark.parametrize("gap", ["bias", "mean", "zero"])
def test_a_reduced_block_that_keeps_every_token_is_the_dense_block(model, gap):
    """Every position kept, the state marked reduced: conv on the restored grid, routes in their own orders and no
    skipped positions give the dense block's output (the gap estimate is then never used)."""
    block = model.layers[0].blocks[0]
    x = torch.randn(2, 64, 16)
    state = TokenState(torch.arange(64).expand(2, -1), None, 64, (8, 8), True, reduced=True, track_owner=True)
    with torch.no_grad():
        dense, y_dense = block(x, (8, 8))
        reduced, y = block(x, (8, 8), None, reduced_geometry(state, gap))
    assert_close_across_cpus(reduced, dense, rtol=1e-5)
    assert_close_across_cpus(y, y_dense, rtol=1e-5)


def test_restore_unmerges_and_fills_pruned_positions_from_the_nearest_token():
    # 8 positions; tokens at 1, 4, 6; position 5 merged into token 1 (position 4), 0 2 3 7 pruned
    owner = torch.tensor([[-1, 0, -1, -1, 1, 1, 2, -1]])
    state = TokenState(torch.tensor([[1, 4, 6]]), None, 8, (2, 4), True, reduced=True, owner=owner)
    assert owners(state).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]  # 2: nearer to 1 than to 4; 3: nearer to 4
    x = torch.tensor([[[10.0], [40.0], [60.0]]])
    assert restore_tokens(x, state)[0, :, 0].tolist() == [10, 10, 10, 40, 40, 40, 60, 60]


def test_stages_reduce_inside_and_restore_before_the_downsample(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
        for arrangement in ("merge", "align", "tome"):
            out = reduced_forward(model, x, PruneConfig(layers=(1, 2), keep=(0.5,), arrangement=arrangement))
            # 8x8 -> 32 kept in stage 0, restored to 8x8 for the downsample -> the 4x4 grid of stage 1 -> 8 kept
            assert out.stats.tokens_per_block == [64.0, 16.0, 8.0]
            assert torch.isfinite(out.logits).all() and not torch.equal(out.logits, dense)


def test_merge_keeps_who_stands_for_each_position(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = reduced_forward(model, x, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge"))
    state = out.state
    assert state.owner is not None and bool((state.owner >= 0).all())  # merge: every position has its token
    assert torch.equal(torch.bincount(state.owner[0], minlength=8), state.sizes[0].long())


def test_a_strategy_that_makes_a_new_sequence_is_refused(model):
    for arrangement in ("keep-order", "reorder"):
        with pytest.raises(ConfigError, match="needs blocks that run the kept tokens as a new sequence"):
            apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), arrangement=arrangement))
    with pytest.raises(ConfigError, match="VMamba's 2-D conv"):
        apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), conv="kept"))


def test_a_pruned_vmamba_with_a_compensated_head_reloads(model, tmp_path):
    images = torch.randn(16, 3, 32, 32)
    m = ssmtrim.create_model("vmamba_test").eval()
    m.load_state_dict(model.state_dict())
    pruned = ssmtrim.prune(m, PruneConfig.recommended(m, keep=(0.6,)), images).model
    again = ssmtrim.load_model(str(ssmtrim.save_model(pruned, tmp_path / "p")))
    with torch.no_grad():
        assert torch.equal(again(images[:4]), pruned(images[:4]))
