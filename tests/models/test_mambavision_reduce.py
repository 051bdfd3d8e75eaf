"""MambaVision with tokens reduced inside its window levels, window by window, after its Mamba-mixer blocks, and the
windows restored before each downsample and the head."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.mambavision import MambaVisionConfig
from ssmtrim.models.tokens import TokenState
from ssmtrim.pruning import PruneConfig, apply_pruning, feature_maps, remove_pruning
from ssmtrim.pruning.engine import reduced_forward
from tests.models.test_vim import randomise
from tests.tolerance import assert_close_across_cpus

# level 2: a 3x3 grid in 2x2 windows (padded to 4x4: four windows); level 3: 2x2, one window
MULTI = MambaVisionConfig(dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(2, 2, 2, 4), window_size=(4, 4, 2, 2),
                          img_size=48, num_classes=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ssmtrim.create_model(MULTI).eval()
    randomise(m, 3)
    return m


@pytest.mark.parametrize("gap", ["bias", "mean", "zero"])
def test_a_reduced_mixer_block_that_keeps_every_token_is_the_dense_block(model, gap):
    from ssmtrim.models.registry import family_of

    block = model.levels[2].blocks[0]  # a Mamba-mixer block
    x = torch.randn(8, 4, 64)
    state = TokenState(torch.arange(4).expand(8, -1), None, 4, (2, 2), True, reduced=True, track_owner=True)
    geometry = family_of(model).geometry(model, state, PruneConfig(layers=(1,), keep=(1.0,), gap=gap))
    with torch.no_grad():
        dense, y_dense = block(x)
        reduced, y = block(x, None, geometry)
    assert_close_across_cpus(reduced, dense, rtol=1e-5)
    assert_close_across_cpus(y, y_dense, rtol=1e-5)


def test_windows_reduce_by_counts_and_are_restored_before_the_downsample(model):
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        dense = model(x)
        for arrangement in ("merge", "align", "tome"):
            out = reduced_forward(model, x, PruneConfig(layers=(3,), keep=(0.5,), arrangement=arrangement))
            # conv levels 12x12, 6x6; level 2 windows of 4 tokens -> 2 after block 3; level 3: its whole window
            assert out.stats.tokens_per_block == [144.0, 36.0, 4.0, 2.0, 2.0, 4.0, 4.0]
            assert torch.isfinite(out.logits).all() and not torch.equal(out.logits, dense)


def test_dense_feature_maps_are_its_level_outputs_and_reduced_ones_keep_their_shape(model):
    x = torch.randn(2, 3, 48, 48)
    dense = feature_maps(model, x)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(dense, model.forward_stages(x), strict=True))
    pruned = apply_pruning(model, PruneConfig(layers=(3,), keep=(0.5,), arrangement="merge"))
    try:
        reduced = feature_maps(pruned, x)
    finally:
        remove_pruning(pruned)
    assert [m.shape for m in reduced] == [m.shape for m in dense]


def test_another_input_size_is_refused_by_the_engine_and_runs_when_loaded_for_it(model):
    """The engine un-windows each level on the grid of the size the model was loaded for: 96x96 images through a
    48x48 model would be cut into four times the windows per image, so they are refused in one sentence; loaded for
    96x96 (the same weights), its feature maps are the dense model's levels at that size."""
    import dataclasses

    x = torch.randn(2, 3, 96, 96)
    with pytest.raises(ConfigError, match="loaded for 48x48 images but got 96x96; load it for that size"):
        feature_maps(model, x)
    big = ssmtrim.create_model(dataclasses.replace(MULTI, img_size=96)).eval()
    big.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(feature_maps(big, x), big.forward_stages(x), strict=True))
        assert feature_maps(big, x)[2].shape == (2, 64, 6, 6)


def test_only_mixer_blocks_of_window_levels_reduce(model):
    for layers in ((1,), (2,), (5,)):  # conv blocks, and an attention block
        with pytest.raises(ConfigError, match="can be reduced only after blocks 3,4,6"):
            apply_pruning(model, PruneConfig(layers=layers, keep=(0.5,)))
    with pytest.raises(ConfigError, match="--mode count"):
        apply_pruning(model, PruneConfig(layers=(3,), keep=(0.5,), mode="threshold", thresholds=(0.0,)))
    assert PruneConfig.recommended(model).layers == (3, 4, 6)


def test_a_pruned_mambavision_with_a_compensated_head_reloads(tmp_path):
    m = ssmtrim.create_model("mambavision_cifar").eval()
    randomise(m, 4)
    images = torch.randn(12, 3, 64, 64)
    pruned = ssmtrim.prune(m, PruneConfig.recommended(m, keep=(0.6,)), images).model
    again = ssmtrim.load_model(str(ssmtrim.save_model(pruned, tmp_path / "p")))
    with torch.no_grad():
        assert torch.equal(again(images[:3]), pruned(images[:3]))


def test_attention_over_merged_tokens_is_proportional():
    """A key standing for s positions weighs as s copies of it would (ToMe's proportional attention)."""
    from ssmtrim.models.mambavision import Attention, MambaVisionGeometry

    torch.manual_seed(0)
    attention = Attention(16, 2).eval()
    x = torch.randn(3, 5, 16)
    sizes = torch.tensor([[1, 3, 1, 2, 1]] * 3)
    geometry = MambaVisionGeometry(torch.zeros(3, 8, dtype=torch.long), torch.arange(5).expand(3, -1), None, "bias",
                                   sizes.float().log())
    copies = x.repeat_interleave(sizes[0], dim=1)  # each token repeated as many times as it stands for
    with torch.no_grad():
        merged, _ = attention(x, None, geometry)
        expanded, _ = attention(copies, None)
    first = torch.cat([torch.zeros(1, dtype=torch.long), sizes[0].cumsum(0)[:-1]])  # each token's first copy
    assert_close_across_cpus(merged, expanded[:, first], rtol=1e-5)
