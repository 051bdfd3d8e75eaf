"""The token-major inference kernels (:mod:`ssmtrim.ops.tokens`): the general path's results, and taken only where
they may run. Both paths call the same C functions, so with this project's GCC they give the same bits; how a
compiler inlines and fuses a multiply-add into each call site is its own choice (seen: 9.5e-7 apart on an AMD EPYC),
so the agreement is checked to the tolerance that holds across CPUs (``tests/tolerance.py``)."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
import ssmtrim.models.vim as vim
from ssmtrim.ops import scan_as_single_op, use_backend
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.conv import causal_conv1d_silu
from ssmtrim.ops.tokens import token_kernels
from tests.tolerance import assert_close_across_cpus

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")


def spread_model(seed: int = 0, **overrides) -> vim.VisionMamba:
    """vim_test with every parameter moved off its initial value (A, D, biases, convs: trained-like spread)."""
    torch.manual_seed(seed)
    model = ssmtrim.create_model("vim_test", **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def kernels_of(mixer: vim.BiMambaMixer, hidden: torch.Tensor):
    return token_kernels(hidden, mixer, (mixer.conv1d, mixer.conv1d_b), mixer.d_inner, mixer.d_state)


def general_path(monkeypatch) -> None:
    monkeypatch.setattr(vim, "token_kernels", lambda *args: None)


@requires_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("length", [17, 65])
def test_mixer_output_matches_the_general_path(monkeypatch, threads, length):
    mixer = spread_model().layers[1].mixer
    hidden = torch.randn(3, length, mixer.in_proj.in_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert kernels_of(mixer, hidden) is not None  # the token-major path is the one being tested
            fast = mixer.ssm_output(hidden)
            general_path(monkeypatch)
            general = mixer.ssm_output(hidden)
    finally:
        torch.set_num_threads(before)
    assert fast.shape == general.shape == (3, length, mixer.d_inner)
    assert_close_across_cpus(fast, general)


@requires_kernel
def test_model_logits_match_the_general_path(monkeypatch):
    model, x = spread_model(1), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        general_path(monkeypatch)
        general = model(x)
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("reverse", [False, True])
def test_conv_reads_either_direction_by_index(reverse):
    mixer = spread_model(2).layers[0].mixer
    e = mixer.d_inner
    x = torch.randn(2, 23, 2 * e)[..., :e]  # the x half of in_proj's rows: strided, not copied
    with torch.no_grad():
        kernels = kernels_of(mixer, x)
        got = kernels.conv(x, mixer.conv1d, reverse)
        seq = x.transpose(1, 2).flip(-1) if reverse else x.transpose(1, 2)
        want = causal_conv1d_silu(seq.contiguous(), mixer.conv1d).transpose(1, 2)
    assert got.is_contiguous()
    assert_close_across_cpus(got, want)


@requires_kernel
def test_taken_only_where_it_may_run():
    mixer = spread_model().layers[0].mixer
    hidden = torch.randn(2, 9, mixer.in_proj.in_features)
    with torch.no_grad():
        assert kernels_of(mixer, hidden) is not None
        with use_backend("ref"):
            assert kernels_of(mixer, hidden) is None  # the backend asked for runs, not the C kernels
        with scan_as_single_op():
            assert kernels_of(mixer, hidden) is None  # a FLOP-counting tracer sees the registered op
        assert kernels_of(mixer, hidden.double()) is None
    assert kernels_of(mixer, hidden) is None  # parameters want gradients: the differentiable path


@requires_kernel
def test_channels_in_partial_vectors_take_the_general_path():
    mixer = spread_model(embed_dim=36).layers[0].mixer  # d_inner 72: not whole 16-lane vectors
    with torch.no_grad():
        assert kernels_of(mixer, torch.randn(1, 5, 36)) is None


@requires_kernel
def test_kept_tokens_at_original_positions_match_the_general_path(monkeypatch):
    """A reduced sequence whose conv reads neighbours by original position (no gap decay) takes the kernels too."""
    mixer = spread_model(3).layers[2].mixer
    g = torch.Generator().manual_seed(3)
    positions = torch.stack([torch.randperm(17, generator=g)[:11].sort().values for _ in range(2)])
    geometry = vim.VimGeometry(17, positions, None, "zero")
    hidden = torch.randn(2, 11, mixer.in_proj.in_features)
    with torch.no_grad():
        assert kernels_of(mixer, hidden) is not None
        fast = mixer.ssm_output(hidden, geometry)
        general_path(monkeypatch)
        general = mixer.ssm_output(hidden, geometry)
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("estimate", ["bias", "mean"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gap_decay_matches_the_general_path(monkeypatch, estimate, threads):
    """A reduced sequence whose scans decay over the skipped positions (align, merge) takes the kernels too."""
    from ssmtrim.models.tokens import gaps_from_positions

    mixer = spread_model(4).layers[1].mixer
    g = torch.Generator().manual_seed(4)
    positions = torch.stack([torch.randperm(40, generator=g)[:21].sort().values for _ in range(3)])
    geometry = vim.VimGeometry(40, positions, gaps_from_positions(positions, 40), estimate)
    hidden = torch.randn(3, 21, mixer.in_proj.in_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert kernels_of(mixer, hidden) is not None
            fast = mixer.ssm_output(hidden, geometry)
            general_path(monkeypatch)
            general = mixer.ssm_output(hidden, geometry)
            without_gap = mixer.ssm_output(hidden, vim.VimGeometry(40, positions, None, estimate))
    finally:
        torch.set_num_threads(before)
    assert not torch.allclose(general, without_gap)  # the gaps change the output: they were read
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("arrangement", ["align", "merge"])
def test_pruned_logits_with_gap_decay_match_the_general_path(monkeypatch, arrangement):
    from ssmtrim.pruning import PruneConfig, apply_pruning

    model = apply_pruning(spread_model(5), PruneConfig(layers=(1, 2), keep=(0.6,), arrangement=arrangement))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
        general_path(monkeypatch)
        general = model(x)
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("case", ["full", "positions", "gap-bias", "gap-mean"])
def test_the_mixer_kernel_matches_the_conv_and_scan_kernels(monkeypatch, case):
    """The backend's one-call mixer (both convs, the x_proj products, Δ formed inside the scan from dt_proj's weight,
    A from A_log, the gap's scale from the plan's estimate) is what the token path runs, and gives what the conv and
    scan kernels called one by one give."""
    from ssmtrim.models.tokens import gaps_from_positions
    from ssmtrim.ops.backends import cpu

    mixer = spread_model(6).layers[1].mixer
    g = torch.Generator().manual_seed(6)
    positions = torch.stack([torch.randperm(40, generator=g)[:21].sort().values for _ in range(2)])
    geometry = {"full": None, "positions": vim.VimGeometry(40, positions, None, "zero"),
                "gap-bias": vim.VimGeometry(40, positions, gaps_from_positions(positions, 40), "bias"),
                "gap-mean": vim.VimGeometry(40, positions, gaps_from_positions(positions, 40), "mean")}[case]
    hidden = torch.randn(2, 21, mixer.in_proj.in_features)
    calls = []
    real = cpu._mixer_tokens
    monkeypatch.setattr(cpu, "_mixer_tokens", lambda *args: calls.append(args[-1]) or real(*args))
    with torch.no_grad():
        kernels = kernels_of(mixer, hidden)
        assert kernels is not None and kernels.mixer is not None
        fast = mixer.ssm_output(hidden, geometry)
        one_by_one = mixer.ssm_output_tokens(hidden, kernels._replace(mixer=None), geometry)
    assert calls == [mixer.gap_mode(geometry)]  # taken, with the plan's gap estimate
    assert_close_across_cpus(fast, one_by_one)


@requires_kernel
def test_the_mixer_kernels_gap_estimates_differ():
    """The two gap estimates are read (a kernel that ignored the mode would give one output for both)."""
    from ssmtrim.models.tokens import gaps_from_positions

    mixer = spread_model(7).layers[0].mixer
    positions = torch.tensor([[0, 3, 4, 9, 15, 16, 30]])
    hidden = torch.randn(1, 7, mixer.in_proj.in_features)
    with torch.no_grad():
        outs = [mixer.ssm_output(hidden, vim.VimGeometry(31, positions, gaps_from_positions(positions, 31), e))
                for e in ("bias", "mean")]
    assert not torch.allclose(outs[0], outs[1])


@requires_kernel
def test_the_mixer_kernel_takes_gaps_for_both_directions_or_neither():
    mixer = spread_model().layers[0].mixer
    hidden = torch.randn(1, 5, mixer.in_proj.in_features)
    with torch.no_grad():
        kernels = kernels_of(mixer, hidden)
        x, z = mixer.in_proj(hidden).split(mixer.d_inner, dim=-1)
        forward, backward = mixer.mixer_directions(None)
        gap = torch.ones(1, 5)
        with pytest.raises(ValueError, match="both directions or neither"):
            kernels.mixer((*forward[:-1], gap), backward, x, z, 1)
        with pytest.raises(ValueError, match="gap_mode 1 or 2"):
            kernels.mixer((*forward[:-1], gap), (*backward[:-1], gap), x, z, 0)


@requires_kernel
def test_a_profile_names_the_path_that_ran():
    """Under torch.profiler an eager reduced Vim's C calls carry the token path's names (its mixer, the merge step),
    not the general path's (``ssmtrim::selective_scan``, ``causal_conv1d_silu``), so a profile says which path ran."""
    from ssmtrim.pruning import PruneConfig, apply_pruning

    torch.manual_seed(0)
    model = apply_pruning(ssmtrim.create_model("vim_test", depth=2).eval(),
                          PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(torch.randn(1, 3, 32, 32))
    ran = {event.key for event in prof.key_averages()}
    assert {"ssmtrim::tokens_mixer (convs)", "ssmtrim::tokens_mixer (scans)", "ssmtrim::merge_step"} <= ran
    assert not ran & {"ssmtrim::selective_scan", "ssmtrim::causal_conv1d_silu"}
