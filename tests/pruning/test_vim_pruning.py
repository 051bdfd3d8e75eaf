"""Token pruning on Vim: identity at keep 1.0, the aligned scan's semantics, order and class-token invariants, batching,
and calibration."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import BlockOutput, gaps_from_positions, topk_sorted
from ssmtrim.ops import selective_scan, selective_scan_ref
from ssmtrim.pruning import PruneConfig, apply_pruning, is_pruned, kept_count, reduced_forward, remove_pruning
from ssmtrim.pruning.calibrate import calibrate
from ssmtrim.pruning.scores import get_score


def token_scores(y, method, generator=None):
    return get_score(method)(BlockOutput((), y), generator)


@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", depth=6).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move weights off their init so that scores differ between tokens
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def run_pruned(model, images, **kw):
    cfg = PruneConfig(**{"layers": (2, 4), "keep": (0.7,), **kw})
    apply_pruning(model, cfg)
    try:
        assert type(model).__name__ == "ReducedVisionMamba"
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


def test_keep_one_is_exactly_the_dense_model(vim, images):
    with torch.no_grad():
        dense = vim(images)
    for arrangement in ("align", "keep-order", "reorder"):
        out, _, _ = run_pruned(vim, images, keep=(1.0,), arrangement=arrangement)
        assert torch.equal(out, dense), arrangement
    assert not is_pruned(vim) and type(vim).__name__ == "VisionMamba"
    with torch.no_grad():
        assert torch.equal(vim(images), dense)  # removing the patch restores the dense model


@pytest.mark.parametrize("arrangement", ["align", "keep-order", "reorder"])
def test_tokens_counts_class_token_and_order(vim, images, arrangement):
    out, state, stats = run_pruned(vim, images, arrangement=arrangement)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    k1 = kept_count(16, 0.7)
    if arrangement == "reorder":  # the fused token is one more token, and a candidate at the next pruning
        k2 = kept_count(k1 + 1, 0.7)
        expected = [17, 17, k1 + 2, k1 + 2, k2 + 2, k2 + 2]
    else:
        k2 = kept_count(k1, 0.7)
        expected = [17, 17, k1 + 1, k1 + 1, k2 + 1, k2 + 1]
    assert stats.tokens_per_block == [float(v) for v in expected]
    pos = state.positions
    cls_pos = vim.config.cls_position
    # the class token survives
    assert (pos.gather(1, state.cls_index[:, None])[:, 0] == cls_pos).all()
    if arrangement == "align":
        assert (pos.diff(dim=1) > 0).all()  # original order, class token at its original place
    elif arrangement == "keep-order":
        assert (state.cls_index == (pos.shape[1] - 1) // 2).all()  # re-centred
        patches = torch.cat([pos[:, : pos.shape[1] // 2], pos[:, pos.shape[1] // 2 + 1 :]], 1)
        assert (patches.diff(dim=1) > 0).all()  # kept tokens keep their order
    else:
        assert (pos[:, -1] == -1).all()  # the fused token at the end


def test_kept_count_follows_released_schedule():
    counts = [196]
    for _ in range(3):
        counts.append(kept_count(counts[-1], 0.8))
    assert [c + 1 for c in counts] == [197, 157, 125, 101]


@pytest.mark.parametrize("arrangement", ["align", "keep-order"])
def test_batch_equals_single_images(vim, images, arrangement):
    """Count mode: the batched forward against images one at a time (two different paths)."""
    cfg = PruneConfig(layers=(2, 4), keep=(0.6,), arrangement=arrangement)
    apply_pruning(vim, cfg)
    try:
        with torch.no_grad():
            batch = vim(images)
            single = torch.cat([vim(images[i : i + 1]) for i in range(images.shape[0])])
    finally:
        remove_pruning(vim)
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def threshold_counts(model, image, plan, strategy) -> tuple[list[int], list[int]]:
    """(kept, candidates) at each reduction point of one image in threshold mode, counted here from the scores the
    engine shows the observer: the tokens whose score passes the layer's threshold, at least one, as the strategy
    adjusts the count."""
    from ssmtrim.pruning.strategies import get_strategy

    thresholds = dict(zip((v - 1 for v in plan.layers), plan.thresholds, strict=True))
    kept, candidates = [], []
    adjust = get_strategy(strategy)

    def observe(block, scores, mask):
        k = max(int(((scores >= thresholds[block]) & mask).sum()), 1)
        c = int(mask.sum())
        state = type("S", (), {"num_protected": scores.shape[1] - c})()
        kept.append(adjust.threshold_count(k, c, state))
        candidates.append(c)

    reduced_forward(model, image, plan, observe)
    return kept, candidates


def check_threshold_batch_against_counts(model, images, plan):
    """Threshold mode on a batch == count mode on each image with that image's own counts: each image keeps its own
    number of tokens (a count summed or shared over the batch fails), and the tokens kept are the top-scoring ones."""
    with torch.no_grad():
        batch = reduced_forward(model, images, plan)
        counts = [threshold_counts(model, images[i : i + 1], plan, plan.arrangement) for i in range(len(images))]
        assert len({tuple(k) for k, _ in counts}) > 1, "the images should keep different numbers of tokens"
        reference = []
        for kept, candidates in counts:
            per_image = plan.replace(mode="count", thresholds=None, keep=tuple(k / c for k, c in zip(kept, candidates,
                                                                                                    strict=True)))
            reference.append(reduced_forward(model, images[len(reference) : len(reference) + 1], per_image).logits)
    torch.testing.assert_close(batch.logits, torch.cat(reference), atol=1e-5, rtol=1e-5)
    means = [sum(k[j] / c[j] for k, c in counts) / len(counts) for j in range(len(plan.layers))]
    assert batch.stats.kept_fraction == pytest.approx(means)


def test_threshold_batch_equals_count_mode_with_each_images_counts(vim):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    base = PruneConfig(layers=(2, 4), keep=(0.6,), arrangement="keep-order")
    plan = base.replace(mode="threshold", thresholds=calibrate(vim, base, images).thresholds)
    check_threshold_batch_against_counts(vim, images, plan)


@pytest.mark.parametrize("estimate", ["mean", "bias", "zero"])
def test_aligned_scan_equals_dense_scan_with_silent_pruned_positions(estimate):
    """Kept tokens with a gap == the full sequence where pruned positions inject nothing and decay by Δ̃."""
    g = torch.Generator().manual_seed(0)
    bsz, e, length, n = 2, 5, 12, 4
    u, dt = torch.randn(bsz, e, length, generator=g), torch.randn(bsz, e, length, generator=g)
    A = -torch.exp(torch.randn(e, n, generator=g) * 0.5)
    B, C = torch.randn(bsz, n, length, generator=g), torch.randn(bsz, n, length, generator=g)
    D, bias = torch.randn(e, generator=g), torch.randn(e, generator=g) * 0.2
    keep_pos = torch.tensor([[0, 2, 3, 7, 8, 11], [1, 2, 5, 6, 9, 10]])
    kept = lambda t: t.gather(2, keep_pos[:, None, :].expand(-1, t.shape[1], -1))  # noqa: E731
    delta_kept = torch.nn.functional.softplus(kept(dt) + bias[:, None])
    if estimate == "mean":
        tilde = delta_kept.mean(-1, keepdim=True).expand(-1, -1, length)
    elif estimate == "bias":
        tilde = torch.nn.functional.softplus(bias)[None, :, None].expand(bsz, -1, length)
    else:
        tilde = torch.zeros(bsz, e, length)
    for backward in (False, True):
        flip = (lambda t: t.flip(-1)) if backward else (lambda t: t)
        # dense: delta = true Δ at kept positions, Δ̃ at pruned ones; input zero at pruned ones
        mask = torch.zeros(bsz, 1, length, dtype=torch.bool).scatter_(2, keep_pos[:, None, :], True)
        delta_full = torch.where(mask, torch.nn.functional.softplus(dt + bias[:, None]), tilde)
        u_full = torch.where(mask, u, torch.zeros(()))
        # input enters as Δ B u, so zero u at pruned positions injects nothing; only the decay remains
        dense = flip(selective_scan_ref(flip(u_full), flip(delta_full), A, flip(B), flip(C), D))
        dense_kept = kept(dense)
        fwd_gap, bwd_gap = gaps_from_positions(keep_pos, length)
        counts = bwd_gap if backward else fwd_gap
        gap = counts[:, None, :].float() * kept(tilde)
        got = flip(selective_scan(flip(kept(u)), flip(kept(dt)), A, flip(kept(B)), flip(kept(C)), D,
                                  delta_bias=bias, delta_softplus=True, gap=flip(gap)))
        torch.testing.assert_close(got, dense_kept, atol=1e-5, rtol=1e-5)
        # the factored form the pruned Vim gives the scan: counts (B L) x one estimate per image and channel (B E)
        factored = flip(selective_scan(flip(kept(u)), flip(kept(dt)), A, flip(kept(B)), flip(kept(C)), D,
                                       delta_bias=bias, delta_softplus=True, gap=flip(counts.float()),
                                       gap_scale=tilde[..., 0]))
        torch.testing.assert_close(factored, dense_kept, atol=1e-5, rtol=1e-5)


def test_gaps_from_positions():
    fwd, bwd = gaps_from_positions(torch.tensor([[0, 2, 3, 7]]), 10)
    assert fwd.tolist() == [[0, 1, 0, 3]] and bwd.tolist() == [[1, 0, 3, 2]]


def test_scores_and_selection_are_pure():
    y = torch.tensor([[[1.0, -3.0], [0.5, 0.5], [-1.0, -1.0], [2.0, 0.0]]])
    assert token_scores(y, "clipped").tolist() == [[0.5, 0.5, 0.0, 1.0]]
    assert token_scores(y, "unclipped").tolist() == [[-1.0, 0.5, -1.0, 1.0]]
    assert token_scores(y, "l1").tolist() == [[2.0, 0.5, 1.0, 1.0]]
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.9, 0.5]])
    protected = torch.tensor([[False, True, False, False, False]])
    assert topk_sorted(scores, 2, protected).tolist() == [[3, 4]]  # index order, class token excluded


def test_bad_plans_are_clear_errors(vim):
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        PruneConfig(layers=(2,), keep=(1.5,))
    with pytest.raises(ConfigError, match="outside"):
        PruneConfig(layers=(2,), keep=(0.0,))
    with pytest.raises(ConfigError, match="1-based"):
        PruneConfig(layers=(0,), keep=(0.5,))
    with pytest.raises(ConfigError, match="increasing"):
        PruneConfig(layers=(4, 2), keep=(0.5,))
    with pytest.raises(ConfigError, match="2 ratios for 3"):
        PruneConfig(layers=(1, 2, 3), keep=(0.5, 0.5))
    with pytest.raises(ConfigError, match="out of range"):
        apply_pruning(vim, PruneConfig(layers=(6,), keep=(0.5,)))
    uncalibrated = PruneConfig(layers=(2,), keep=(0.5,), mode="threshold")  # a plan awaiting calibration
    with pytest.raises(ConfigError, match="calibrat"):
        apply_pruning(vim, uncalibrated)
    with pytest.raises(ConfigError, match="calibrat"):
        reduced_forward(vim, torch.zeros(1, 3, 32, 32), uncalibrated)  # never count mode in silence
    assert not is_pruned(vim)
    apply_pruning(vim, PruneConfig(layers=(2,), keep=(0.5,)))
    try:
        with pytest.raises(ConfigError, match="already pruned"):
            apply_pruning(vim, PruneConfig(layers=(2,), keep=(0.5,)))
    finally:
        remove_pruning(vim)


def test_calibrated_thresholds_hit_target_fraction(vim):
    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    config = PruneConfig(layers=(2, 4), keep=(0.7, 0.5))
    result = calibrate(vim, config, images, batch_size=8)
    assert not is_pruned(vim)
    assert len(result.thresholds) == 2
    for entry, target in zip(result.layers, (0.7, 0.5), strict=True):
        print(f"\nlayer {entry.layer}: target {target}, kept {entry.kept_fraction:.3f}")
        assert abs(entry.kept_fraction - target) <= 0.02


def test_conv_neighbours_original_and_kept(vim, images):
    """align's conv reads original positions (pruned neighbours zero) by default; conv=kept reads the previous kept
    tokens, exactly the plain conv over the condensed sequence, while the scans still keep the gaps."""
    from ssmtrim.models.registry import family_of
    from ssmtrim.models.tokens import TokenState

    mixer = vim.layers[3].mixer
    x = torch.randn(2, mixer.d_inner, 9)
    positions = torch.tensor([[0, 1, 4, 5, 6, 9, 12, 13, 16], [2, 3, 4, 8, 9, 10, 11, 15, 16]])
    state = TokenState(positions, torch.tensor([4, 4]), 17, (4, 4), keeps_positions=True, reduced=True)
    apply_pruning(vim, PruneConfig(layers=(2,), keep=(0.5,), conv="kept"))
    try:
        family = family_of(vim)
        kept_geometry = family.geometry(vim, state, vim.prune_config)
        original_geometry = family.geometry(vim, state, vim.prune_config.replace(conv="original"))
        with torch.no_grad():
            kept = [mixer.conv_act(x, b, kept_geometry) for b in (False, True)]
            original = [mixer.conv_act(x, b, original_geometry) for b in (False, True)]
            plain = [mixer.conv_act(x, b) for b in (False, True)]
        assert mixer.decay_gap(torch.zeros(2, mixer.d_inner, 9), False, kept_geometry) is not None  # gaps stay
    finally:
        remove_pruning(vim)
    for k, o, p in zip(kept, original, plain, strict=True):
        torch.testing.assert_close(k, p, atol=0, rtol=0)
        assert not torch.allclose(o, p, atol=1e-4)
    with pytest.raises(ConfigError, match="--conv"):
        PruneConfig(layers=(2,), keep=(0.5,), conv="nearest")
    assert PruneConfig.from_dict(PruneConfig(layers=(2,), keep=(0.5,), conv="kept").to_dict()).conv == "kept"
    assert PruneConfig.from_dict({"layers": [2], "keep": [0.5]}).conv == "original"  # plans written before the option


def test_plainmamba_refuses_conv_kept():
    model = ssmtrim.create_model("plainmamba_test")
    with pytest.raises(ConfigError, match="PlainMamba's 2-D conv"):
        apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), conv="kept"))
