"""Token pruning on PlainMamba: identity at keep 1.0, the aligned mixer against a dense loop over the original grid,
the packed grid of keep-order, counts and order, batching, the dw conv on the grid, calibration, and a speed print."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.plainmamba import PlainMambaConfig, PlainMambaMixer
from ssmtrim.models.plainmamba_grid import make_plan
from ssmtrim.models.tokens import TokenState
from ssmtrim.pruning import PruneConfig, apply_pruning, is_pruned, kept_count, reduced_forward, remove_pruning
from ssmtrim.pruning.calibrate import calibrate
from tests.models.test_plainmamba import randomise, walks
from tests.pruning.test_vim_pruning import check_threshold_batch_against_counts

HW = (5, 6)  # 80 x 96 images: a non-square 30-token grid (pos_embed is resized from the stored 4 x 4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ssmtrim.create_model("plainmamba_test", depth=6, layers_with_dwconv=(0, 3)).eval()
    randomise(m)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 16 * HW[0], 16 * HW[1], generator=torch.Generator().manual_seed(1))


def plain_kept_count(n, keep):
    return kept_count(n, keep, centred=False)


def reduced_plan(positions, hw, keeps_positions, gap_estimate="bias"):
    """The scan plan of tokens at raster ``positions`` (B L) of the original ``hw`` grid, after a reduction."""
    state = TokenState(positions, None, hw[0] * hw[1], hw, keeps_positions=keeps_positions, reduced=True)
    return make_plan(state, gap_estimate)


def run_pruned(model, images, **kw):
    cfg = PruneConfig(**{"layers": (2, 4), "keep": (0.7,), **kw})
    apply_pruning(model, cfg)
    try:
        assert type(model).__name__ == "ReducedPlainMamba"
        with torch.no_grad():
            out = model(images)
            state, stats = None, None
            if cfg.mode == "count":
                reduced = reduced_forward(model, images)
                assert torch.equal(reduced.logits, out)
                state, stats = reduced.state, reduced.stats
        return out, state, stats
    finally:
        remove_pruning(model)


def test_keep_one_is_exactly_the_dense_model(model, images):
    with torch.no_grad():
        dense = model(images)
    full = torch.arange(HW[0] * HW[1]).expand(images.shape[0], -1)
    for arrangement in ("align", "keep-order", "reorder"):
        config = PruneConfig(layers=(2, 4), keep=(1.0,), arrangement=arrangement)
        with torch.no_grad():  # the engine on the dense model with an explicit plan
            assert torch.equal(reduced_forward(model, images, config).logits, dense), arrangement
        apply_pruning(model, config)
        try:
            with torch.no_grad():
                assert torch.equal(model(images), dense), arrangement
                reduced = reduced_forward(model, images)
            assert torch.equal(reduced.logits, dense), arrangement
            # no token was touched: every block ran on the full grid, so the features are the dense ones
            assert not reduced.state.reduced and torch.equal(reduced.state.positions, full), arrangement
            assert reduced.stats.kept_fraction == [1.0, 1.0], arrangement
            assert reduced.stats.tokens_per_block == [float(HW[0] * HW[1])] * 6, arrangement
        finally:
            remove_pruning(model)
    assert not is_pruned(model) and type(model).__name__ == "PlainMamba"
    assert all(type(layer.mamba) is PlainMambaMixer for layer in model.layers)
    with torch.no_grad():
        assert torch.equal(model(images), dense)  # removing the patch restores the dense model


# ---------------------------------------------------------------------------------------------------------------
# the aligned mixer against a loop over the original grid


def reference_aligned_ssm_output(m, x, keep_pos, hw, estimate):
    """Gated SSM output (B K E) of the kept tokens x (B K C) at raster positions keep_pos (B K, increasing), written
    as the dense mixer on the full grid where a pruned position carries no token: the conv reads zero there, and
    each direction walks the ORIGINAL path, decaying the state by Δ̃ at a pruned position without input or output.
    At a kept position, the i-th kept token the path meets uses dt, B, C of the i-th kept token in raster order
    (the official raster-order quirk) plus the direction embedding of the original step."""
    bsz, kept, _ = x.shape
    h, w = hw
    e, n, r = m.d_inner, m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T + m.in_proj.bias
    xs, z = xz[..., :e], xz[..., e:]
    grid = torch.zeros(bsz, e, h * w)
    for bi in range(bsz):
        grid[bi][:, keep_pos[bi]] = xs[bi].T
    k = m.conv2d.weight.shape[-1]
    conv = F.silu(F.conv2d(grid.view(bsz, e, h, w), m.conv2d.weight, m.conv2d.bias, padding=k // 2, groups=e))
    u = torch.stack([conv[bi].flatten(1)[:, keep_pos[bi]] for bi in range(bsz)])  # B E K
    dbl = u.transpose(1, 2) @ m.x_proj.weight.T
    dt_low, b_raster, c_raster = dbl[..., :r], dbl[..., r : r + n], dbl[..., r + n :]
    delta = F.softplus(dt_low @ m.dt_proj.weight.T + 2 * m.dt_proj.bias)  # B K E; the bias enters twice
    tilde = {"mean": delta.mean(1), "bias": F.softplus(2 * m.dt_proj.bias).expand(bsz, e),
             "zero": torch.zeros(bsz, e)}[estimate]  # fmt: skip
    a = -torch.exp(m.A_log)
    total = torch.zeros(bsz, kept, e)
    for bi in range(bsz):
        slot = {p: j for j, p in enumerate(keep_pos[bi].tolist())}
        for order, moves in walks(h, w):
            state, i = torch.zeros(e, n), 0
            for t, cell in enumerate(order):
                if cell not in slot:
                    state = torch.exp(tilde[bi, :, None] * a) * state
                    continue
                j, d = slot[cell], delta[bi, i, :, None]
                b_i = b_raster[bi, i] + m.direction_Bs[moves[t]]
                state = torch.exp(d * a) * state + d * b_i[None, :] * u[bi, :, j, None]
                total[bi, j] += state @ c_raster[bi, i] + m.D * u[bi, :, j]
                i += 1
    return total * F.silu(z)


def irregular_positions(hw, kept, bsz, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(hw[0] * hw[1], generator=g)[:kept].sort().values for _ in range(bsz)])


@pytest.mark.parametrize("estimate", ["mean", "bias", "zero"])
def test_aligned_mixer_equals_dense_grid_reference(estimate):
    torch.manual_seed(0)
    hw = (4, 5)
    mixer = PlainMambaMixer(PlainMambaConfig(embed_dim=16, depth=1, d_state=4, conv_size=3))
    randomise(mixer)  # non-zero direction_Bs, dt bias in [-4, -1]
    keep_pos = irregular_positions(hw, 11, 2)
    x = torch.randn(2, 11, 16)
    plan = reduced_plan(keep_pos, hw, keeps_positions=True, gap_estimate=estimate)
    with torch.no_grad():
        got = mixer.ssm_output(x, hw, plan)
        ref = reference_aligned_ssm_output(mixer, x, keep_pos, hw, estimate)
    print(f"\naligned mixer ({estimate}): max err {(got - ref).abs().max():.2e} (scale {ref.abs().max():.2e})")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_keep_order_mixer_is_the_dense_mixer_on_the_packed_grid():
    """keep-order lays the K kept tokens row by row at the grid's width: with K a multiple of W, that is exactly the
    dense mixer on a (K / W) x W grid, whatever positions the tokens came from."""
    torch.manual_seed(0)
    hw = (4, 5)
    mixer = PlainMambaMixer(PlainMambaConfig(embed_dim=16, depth=1, d_state=4, conv_size=3))
    randomise(mixer)
    x = torch.randn(2, 15, 16)
    with torch.no_grad():
        dense = mixer.ssm_output(x, (3, 5))
        got = mixer.ssm_output(x, hw, reduced_plan(irregular_positions(hw, 15, 2), hw, keeps_positions=False))
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)


def test_dwconv_runs_on_the_zero_filled_grid(model):
    """With the mixer's out_proj zeroed, the layer adds nothing to its input, so its output is the dw step alone."""
    layer = copy.deepcopy(model.layers[3]).eval()
    assert layer.with_dwconv
    with torch.no_grad():
        layer.mamba.out_proj.weight.zero_()
        layer.mamba.out_proj.bias.zero_()
    keep_pos = irregular_positions(HW, 17, 2, seed=3)
    x = torch.randn(2, 17, model.config.embed_dim)
    with torch.no_grad():
        got, _ = layer(x, HW, reduced_plan(keep_pos, HW, keeps_positions=True))
        grid = torch.zeros(2, HW[0] * HW[1], x.shape[-1])
        grid.scatter_(1, keep_pos[..., None].expand_as(x), x)
        full = layer.dw(grid.transpose(1, 2).reshape(2, -1, *HW)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, torch.stack([full[b, keep_pos[b]] for b in range(2)]))


# ---------------------------------------------------------------------------------------------------------------
# whole model


@pytest.mark.parametrize("arrangement", ["align", "keep-order", "reorder"])
def test_token_counts_and_order(model, images, arrangement):
    out, state, stats = run_pruned(model, images, arrangement=arrangement)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    n = HW[0] * HW[1]
    k1 = plain_kept_count(n, 0.7)
    if arrangement == "reorder":  # the fused token is one more token, and a candidate at the next pruning
        k2 = plain_kept_count(k1 + 1, 0.7)
        expected = [n, n, k1 + 1, k1 + 1, k2 + 1, k2 + 1]
    else:
        k2 = plain_kept_count(k1, 0.7)
        expected = [n, n, k1, k1, k2, k2]
    assert stats.tokens_per_block == [float(v) for v in expected]
    pos = state.positions
    if arrangement == "reorder":
        assert (pos[:, -1] == -1).all()  # the fused token at the end
    else:
        assert (pos.diff(dim=1) > 0).all() and pos.min() >= 0 and pos.max() < n  # raster order, real cells
    with torch.no_grad():
        dense = model(images)
    assert not torch.equal(out, dense)  # something was pruned


def test_plain_kept_count_has_no_parity_rule():
    counts = [196]
    for _ in range(3):
        counts.append(plain_kept_count(counts[-1], 0.7))
    assert counts == [196, 137, 95, 66]
    assert plain_kept_count(3, 0.1) == 1 and plain_kept_count(7, 1.0) == 7


def test_gap_estimate_changes_the_aligned_model(model, images):
    outs = {gap: run_pruned(model, images, gap=gap)[0] for gap in ("mean", "bias", "zero")}
    assert not torch.allclose(outs["mean"], outs["zero"]) and not torch.allclose(outs["bias"], outs["zero"])


@pytest.fixture(scope="module")
def thresholds(model, images):
    return calibrate(model, PruneConfig(layers=(2, 4), keep=(0.6,)), images).thresholds


@pytest.mark.parametrize("arrangement", ["align", "keep-order", "reorder"])
def test_threshold_batch_equals_count_mode_with_each_images_counts(model, images, thresholds, arrangement):
    plan = PruneConfig(layers=(2, 4), keep=(0.6,), mode="threshold", arrangement=arrangement, thresholds=thresholds)
    check_threshold_batch_against_counts(model, images, plan)


@pytest.mark.parametrize("arrangement", ["align", "keep-order", "reorder"])
def test_batch_equals_single_images(model, images, arrangement):
    """Count mode: the batched forward against images one at a time (two different paths)."""
    cfg = PruneConfig(layers=(2, 4), keep=(0.6,), arrangement=arrangement)
    apply_pruning(model, cfg)
    try:
        with torch.no_grad():
            batch = model(images)
            stats = reduced_forward(model, images).stats
            single = torch.cat([model(images[i : i + 1]) for i in range(images.shape[0])])
    finally:
        remove_pruning(model)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    assert len(stats.kept_fraction) == 2 and all(0 < f < 1 for f in stats.kept_fraction)


def test_score_observer_sees_every_token(model, images):
    seen = []
    apply_pruning(model, PruneConfig(layers=(2, 4), keep=(0.7,)))
    try:
        observer = lambda block, scores, candidates: seen.append((block, scores.shape, candidates.all()))  # noqa: E731
        with torch.no_grad():
            reduced_forward(model, images, observer=observer)
    finally:
        remove_pruning(model)
    assert seen == [(1, (5, 30), True), (3, (5, 21), True)]


def test_bad_plans_are_clear_errors(model):
    with pytest.raises(ConfigError, match="out of range"):
        apply_pruning(model, PruneConfig(layers=(6,), keep=(0.5,)))
    assert not is_pruned(model)
    apply_pruning(model, PruneConfig(layers=(2,), keep=(0.5,)))
    try:
        with pytest.raises(ConfigError, match="already pruned"):
            apply_pruning(model, PruneConfig(layers=(2,), keep=(0.5,)))
    finally:
        remove_pruning(model)
    assert type(model).__name__ == "PlainMamba"


def test_calibrated_thresholds_hit_target_fraction(model):
    images = torch.randn(24, 3, 16 * HW[0], 16 * HW[1], generator=torch.Generator().manual_seed(2))
    config = PruneConfig(layers=(2, 4), keep=(0.7, 0.5))
    result = calibrate(model, config, images, batch_size=8)
    assert not is_pruned(model)
    assert len(result.thresholds) == 2
    for entry, target in zip(result.layers, (0.7, 0.5), strict=True):
        print(f"\nlayer {entry.layer}: target {target}, kept {entry.kept_fraction:.3f}")
        assert abs(entry.kept_fraction - target) <= 0.02


# ---------------------------------------------------------------------------------------------------------------
# speed sanity: printed, never asserted (machines are shared and noisy)
