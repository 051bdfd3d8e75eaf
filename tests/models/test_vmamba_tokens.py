"""VMamba's SS2D on the token-major scan (:func:`ssmtrim.ops.tokens.scan_kernels`): its four routes as two calls of
the two-direction scan, the reversed routes read from the end (``backward_in_order``), the same values as the general
path (channel-major sequences, flipped copies), taken only where nothing needs a gradient and no export or FLOP count
watches. The two paths' projections are different matrix products, so they agree to the tolerance that holds across
CPUs (``tests/tolerance.py``), not bit for bit."""

from __future__ import annotations

import pytest
import torch

import ssmtrim
import ssmtrim.models.vmamba as vmamba
from ssmtrim.models.tokens import TokenState
from ssmtrim.ops import scan_as_single_op
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.backends.cpu import tokens_scan
from ssmtrim.pruning import PruneConfig, apply_pruning
from tests.conftest import randomize
from tests.tolerance import assert_close_across_cpus

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")


def general_path(monkeypatch) -> None:
    monkeypatch.setattr(vmamba, "scan_kernels", lambda *args: None)


def spread_ss2d(width: int, seed: int = 0) -> vmamba.SS2D:
    """An SS2D of ``width`` channels (d_state 2) with every parameter moved off its initial value."""
    torch.manual_seed(seed)
    cfg = vmamba.VMambaConfig(dims=(width,), depths=(1,), img_size=32, num_classes=10, d_state=2)
    op = vmamba.SS2D(width, cfg, 0).eval()
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return op


def both_paths(monkeypatch, op: vmamba.SS2D, method: str, threads: int, run):
    """``run()`` at ``threads`` threads without a gradient, on the token-major path (checked to be taken: ``method``
    of ``op`` is called) and then on the general path."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    calls = []
    take = getattr(op, method)
    monkeypatch.setattr(op, method, lambda *a: calls.append(1) or take(*a))
    try:
        with torch.no_grad():
            fast = run()
            assert calls, "the token-major path is the one being tested"
            general_path(monkeypatch)
            return fast, run()
    finally:
        torch.set_num_threads(before)


@requires_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("width", "hw"), [(40, (5, 7)), (32, (4, 4)), (24, (1, 6))])
def test_routes_match_the_general_path(monkeypatch, threads, width, hw):
    """Any width (here 40 and 24: partial vectors of channels), square and non-square grids, one or two threads."""
    op = spread_ss2d(width)
    x = torch.randn(3, hw[0] * hw[1], width)
    fast, general = both_paths(monkeypatch, op, "scan_grid_tokens", threads, lambda: op.ssm_output(x, hw))
    assert fast.shape == general.shape == (3, hw[0] * hw[1], op.d_inner)
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("gap", ["bias", "mean", "zero"])
@pytest.mark.parametrize("threads", [1, 2])
def test_reduced_routes_match_the_general_path(monkeypatch, gap, threads):
    """A reduced stage's routes over its tokens (different kept positions per image, on a non-square grid), their
    gaps' decay estimated by the bias, by the mean Δ, or none."""
    op = spread_ss2d(40)
    h, w, bsz = 5, 6, 3
    gen = torch.Generator().manual_seed(4)
    kept = torch.stack([torch.randperm(h * w, generator=gen)[:13].sort().values for _ in range(bsz)])
    # each grid position stands by the last kept token at or before it (the first one before any)
    owner = ((kept[:, None, :] <= torch.arange(h * w)[None, :, None]).sum(-1) - 1).clamp_min(0)
    state = TokenState(positions=kept, cls_index=None, length=h * w, grid=(h, w), keeps_positions=True, reduced=True,
                       owner=owner)
    geometry = vmamba.reduced_geometry(state, gap)
    x = torch.randn(bsz, kept.shape[1], 40, generator=gen)
    fast, general = both_paths(monkeypatch, op, "scan_tokens_reduced", threads,
                               lambda: op.ssm_output(x, (h, w), None, geometry))
    assert fast.shape == general.shape == (bsz, kept.shape[1], op.d_inner)
    assert_close_across_cpus(fast, general)


@requires_kernel
@pytest.mark.parametrize("with_gap", [False, True])
def test_the_backward_direction_read_in_order_is_the_reversed_scan(with_gap):
    """The backward direction given in original order and read from its end gives the bits of the same direction
    given reversed (one process, the same C function on the same values); the gap counts follow it."""
    torch.manual_seed(1)
    bsz, length, e, n = 2, 9, 24, 3
    z = torch.randn(bsz, length, e)

    def direction(seed: int) -> tuple:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(bsz, length, e, generator=g)
        delta = torch.randn(bsz, length, e, generator=g) * 0.5
        bc = torch.randn(bsz, length, 2 * n + 1, generator=g)  # B and C as views of wider rows, as SS2D's are
        gap = torch.randint(0, 3, (bsz, length), generator=g).float() if with_gap else None
        scale = torch.rand(bsz, e, generator=g) if with_gap else None
        a, d, bias = -torch.rand(e, n, generator=g), torch.randn(e, generator=g), torch.randn(e, generator=g)
        return (u, delta, a, bc[..., 1:n + 1], bc[..., n + 1:], d, bias, gap, scale)

    def flipped(d: tuple) -> tuple:
        return tuple(t.flip(1) if t is not None and i in (0, 1, 3, 4, 7) else t for i, t in enumerate(d))

    forward, backward = direction(2), direction(3)
    with torch.no_grad():
        in_order = tokens_scan(forward, backward, z, True, backward_in_order=True)
        reversed_copy = tokens_scan(forward, flipped(backward), z, True)
    assert torch.equal(in_order, reversed_copy)


def _counted(monkeypatch) -> list:
    calls: list = []
    take = vmamba.SS2D.scan_grid_tokens

    def counting(self, *args):
        calls.append(1)
        return take(self, *args)

    monkeypatch.setattr(vmamba.SS2D, "scan_grid_tokens", counting)
    return calls


@requires_kernel
def test_taken_only_where_it_may_run(monkeypatch):
    model = randomize(ssmtrim.create_model("vmamba_test")).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = _counted(monkeypatch)
    model(x)  # parameters that want a gradient: the general path (the kernel has no backward)
    assert not calls
    with torch.no_grad():
        with scan_as_single_op():  # a FLOP count sees standard ops and the one scan op
            model(x)
        assert not calls
        model(x)
    assert calls


@requires_kernel
@pytest.mark.parametrize("plan", [
    {"arrangement": "unmerge", "keep": (1.0,), "options": {"mixer": "positions", "mlp_share": 0.3}},
    {"arrangement": "quartermap", "keep": (0.25,)},
    {"arrangement": "unmerge", "keep": (0.5,), "options": {"mixer": "tokens"}, "reduced_routes": True},
    {"arrangement": "merge", "keep": (0.6,), "gap": "mean", "reduced_routes": True},
    {"arrangement": "align", "keep": (0.4,), "gap": "zero", "reduced_routes": True},
])
def test_model_logits_match_the_general_path(monkeypatch, plan):
    """Dense and reduced logits: the mixers on every position, QuarterMap's strided grid, and the routes over a reduced
    stage's tokens (their gaps' decay estimated by the bias, by the mean Δ, or none)."""
    model = randomize(ssmtrim.create_model("vmamba_test")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        dense_fast = model(x)
        config = PruneConfig(layers=(2,), keep=plan["keep"], arrangement=plan["arrangement"],
                             gap=plan.get("gap", "bias"), options=plan.get("options", {}))
        reduced = apply_pruning(randomize(ssmtrim.create_model("vmamba_test")).eval(), config)
        calls = []
        take = vmamba.SS2D.scan_tokens_reduced
        monkeypatch.setattr(vmamba.SS2D, "scan_tokens_reduced", lambda *a: calls.append(1) or take(*a))
        reduced_fast = reduced(x)
        assert bool(calls) == plan.get("reduced_routes", False)  # the path being tested is the one taken
        general_path(monkeypatch)
        dense_general, reduced_general = model(x), reduced(x)
    assert_close_across_cpus(dense_fast, dense_general)
    assert_close_across_cpus(reduced_fast, reduced_general)
