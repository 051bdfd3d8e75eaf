"""QuarterMap on VMamba (``--arrangement quartermap``): after the reduction point every token still runs, and the
routes of the stage's later blocks scan a strided part of the grid, spread back by nearest neighbour. Checked against
an independent reference (the dense routes on the strided map, then ``F.interpolate(mode="nearest")``), through the
engine and the FLOPs count, and refused where it cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.flops import count_flops
from ssmtrim.models.registry import family_of
from ssmtrim.models.vmamba import SubsampledScan
from ssmtrim.pruning import PruneConfig, apply_pruning, remove_pruning
from ssmtrim.pruning.engine import check_plan_for, feature_maps, reduced_forward
from tests.models.test_vmamba_reduce import randomised_vmamba
from tests.tolerance import assert_close_across_cpus


@pytest.fixture(scope="module")
def model():
    return randomised_vmamba()


def _reference(op, x: torch.Tensor, hw: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """The dense routes over the strided map, upsampled by F.interpolate (nearest) to the whole grid (B L E)."""
    bsz = x.shape[0]
    u = F.silu(op.conv2d(op.in_proj(x).transpose(1, 2).reshape(bsz, op.d_inner, *hw)))
    part = u[:, :, :: stride[0], :: stride[1]]
    y = op.scan_grid(part).transpose(1, 2).reshape(bsz, op.d_inner, part.shape[-2], part.shape[-1])
    return F.interpolate(y, size=hw, mode="nearest").flatten(2).transpose(1, 2)


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])
@pytest.mark.parametrize("stride", [(2, 2), (2, 1)])
def test_the_strided_scan_is_the_dense_scan_of_the_strided_map_upsampled(model, hw, stride):
    op = model.layers[0].blocks[0].op
    torch.manual_seed(1)
    x = torch.randn(2, hw[0] * hw[1], op.in_proj.in_features)
    with torch.no_grad():
        got = op.ssm_output(x, hw, None, SubsampledScan(stride))
        want = _reference(op, x, hw, stride)
    assert got.shape == (2, hw[0] * hw[1], op.d_inner)
    assert_close_across_cpus(got, want, rtol=1e-5)


def test_a_stride_of_one_is_the_dense_scan(model):
    op = model.layers[0].blocks[0].op
    x = torch.randn(2, 64, op.in_proj.in_features)
    with torch.no_grad():
        deltas_dense, deltas = [], []
        dense = op.ssm_output(x, (8, 8), deltas_dense)
        strided = op.ssm_output(x, (8, 8), deltas, SubsampledScan((1, 1)))
    assert_close_across_cpus(strided, dense, rtol=1e-6)
    assert_close_across_cpus(deltas[0], deltas_dense[0], rtol=1e-6)


def test_quartermap_thins_the_later_scans_of_the_stage_and_keeps_every_token(model):
    x = torch.randn(3, 3, 32, 32)
    plan = PruneConfig(layers=(2,), keep=(0.25,), arrangement="quartermap")
    with torch.no_grad():
        dense = model(x)
        out = reduced_forward(model, x, plan)
        maps = reduced_forward(model, x, plan, maps=True).maps
    assert out.stats.tokens_per_block == [64.0, 16.0, 16.0]  # the sequence is never shortened
    assert not torch.allclose(out.logits, dense)
    assert [tuple(m.shape) for m in maps] == [tuple(m.shape) for m in model.forward_stages(x)]
    dense_count = count_flops(model, convention="paper")
    apply_pruning(model, plan)
    try:
        thinned = count_flops(model, convention="paper")
    finally:
        remove_pruning(model)
    blocks = ["layers.0.blocks.0", "layers.1.blocks.0", "layers.1.blocks.1"]
    assert [thinned.by_module[b] for b in blocks[:2]] == [dense_count.by_module[b] for b in blocks[:2]]
    # the last block scans 2x2 of its 4x4 grid: x_proj, dt_proj and the scan at a quarter, the rest whole
    terms = family_of(model).mixer_dims(model.layers[1].blocks[1].op)
    saved = sum(terms.terms(16).values()) - sum(terms.terms(16, 4).values())
    assert dense_count.by_module[blocks[2]] - thinned.by_module[blocks[2]] == saved > 0


def test_feature_maps_of_a_quartermap_model_are_whole(model):
    x = torch.randn(2, 3, 32, 32)
    apply_pruning(model, PruneConfig(layers=(2,), keep=(0.25,), arrangement="quartermap"))
    try:
        maps = feature_maps(model, x)
    finally:
        remove_pruning(model)
    assert [m.shape[-2:] for m in maps] == [torch.Size([8, 8]), torch.Size([4, 4])]


@pytest.mark.parametrize(("fields", "said"), [
    ({"keep": (0.3,)}, "keep 0.25"),
    ({"keep": (0.25,), "mode": "threshold"}, "--mode count"),
])  # fmt: skip
def test_quartermap_plans_it_cannot_run_are_refused(model, fields, said):
    """Refused when the plan is checked, before any calibration (as ``prune`` checks it)."""
    with pytest.raises(ConfigError, match=said):
        check_plan_for(model, PruneConfig(layers=(2,), arrangement="quartermap", **fields), runnable=False)


def test_quartermap_is_refused_on_a_family_whose_scans_cannot_be_strided():
    vim = ssmtrim.create_model("vim_test").eval()
    with pytest.raises(ConfigError, match="strided part of the grid"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.25,), arrangement="quartermap"))
