"""Unmerge's group kernels (:mod:`ssmtrim.ops.tokens`, ``GroupKernels``): the PyTorch reference's groups and means
(``ssmtrim.models.tokens.Unmerge`` with the kernels off), and taken only where they may run. Groups are compared
exactly on inputs whose similarities have no near ties (the kernel sums them in its own order); means to the
tolerance that holds across CPUs."""

from __future__ import annotations

import pytest
import torch

import ssmtrim.models.tokens as tokens
from ssmtrim.models.tokens import REGROUP_ROUNDS, Unmerge
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.backends import cpu
from ssmtrim.ops.tokens import group_kernels
from tests.tolerance import assert_close_across_cpus

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")


def _groups(seed, bsz=3, length=37, tokens_=9, width=16, alone=True):
    """An Unmerge over a random owner map (every token owns its own anchor position), and clustered inputs z (each
    position near one of a few directions, so that no position is equally like two groups)."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.stack([torch.randperm(length, generator=g)[:tokens_].sort().values for _ in range(bsz)])
    owner = torch.randint(0, tokens_, (bsz, length), generator=g)
    owner = owner.scatter(1, anchors, torch.arange(tokens_).expand(bsz, -1).contiguous())
    sizes = torch.zeros(bsz, tokens_).scatter_add(1, owner, torch.ones(bsz, length))
    solo = None
    if alone:
        solo = torch.zeros(bsz, tokens_, dtype=torch.bool)
        solo[:, 2] = True
    centres = torch.randn(5, width, generator=g) * 4
    z = centres[torch.randint(0, 5, (bsz, length), generator=g)] + 0.3 * torch.randn(bsz, length, width, generator=g)
    return Unmerge(owner, sizes, True, anchors, solo), z


def _reference(monkeypatch):
    monkeypatch.setattr(tokens, "group_kernels", lambda *t: None)


@requires_kernel
@pytest.mark.parametrize("share", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("alone", [True, False])
def test_regroup_is_the_reference_regrouping(monkeypatch, share, alone):
    for seed in range(3):
        groups, z = _groups(seed, alone=alone)
        groups = Unmerge(groups.owner, groups.sizes, True, groups.anchors, groups.alone, share)
        with torch.no_grad():
            got = groups.for_mlp(z)
            with monkeypatch.context() as m:
                _reference(m)
                want = groups.for_mlp(z)
        assert torch.equal(got.owner, want.owner)
        assert torch.equal(got.sizes, want.sizes)
        assert got.sizes.shape[1] == tokens.mlp_tokens(9, share)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_an_exported_graph_groups_and_averages_as_the_reference(monkeypatch, share):
    """Under export (ONNX) the groups' sizes and means come from a 0/1 membership matrix, a few operators where
    index_add and scatter_add take a dozen: the reference's groups, sizes and means (to rounding)."""
    for seed in range(3):
        groups, z = _groups(seed)
        groups = Unmerge(groups.owner, groups.sizes, True, groups.anchors, groups.alone, share)
        x = torch.randn(3, 37, 4, 6, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), monkeypatch.context() as m:
            _reference(m)
            want = groups.for_mlp(z)
            want_means, want_own = want.merge(x), groups.merge(x)
            m.setattr(torch.compiler, "is_exporting", lambda: True)
            got = groups.for_mlp(z)
            got_means, got_own = got.merge(x), groups.merge(x)
        assert torch.equal(got.owner, want.owner)
        assert torch.equal(got.sizes, want.sizes)
        assert got_means.shape == want_means.shape == (3, tokens.mlp_tokens(9, share), 4, 6)
        assert_close_across_cpus(got_means, want_means)
        assert_close_across_cpus(got_own, want_own)


@requires_kernel
def test_regroup_keeps_each_anchor_in_its_group_and_an_alone_token_alone():
    groups, z = _groups(7)
    with torch.no_grad():
        owner, counts = cpu.regroup(z, groups.anchors, groups.sizes, groups.alone, 9, REGROUP_ROUNDS)
    assert torch.equal(owner.gather(1, groups.anchors), torch.arange(9).expand(3, -1))
    assert torch.equal(counts[:, 2], torch.ones(3))  # alone: its own position only
    assert torch.equal(counts.sum(1), torch.full((3,), 37.0))


@requires_kernel
@pytest.mark.parametrize("shape", [(16,), (4, 6)])
def test_group_mean_is_the_reference_mean(monkeypatch, shape):
    groups, _ = _groups(3)
    x = torch.randn(3, 37, *shape, generator=torch.Generator().manual_seed(1))
    strided = torch.randn(3, 37, 2 * shape[0], *shape[1:])[:, :, : shape[0]]  # rows of unit stride, not contiguous
    strided.copy_(x)
    with torch.no_grad():
        got, got_strided = groups.merge(x), groups.merge(strided)
        with monkeypatch.context() as m:
            _reference(m)
            want = groups.merge(x)
    assert got.shape == want.shape == (3, 9, *shape)
    assert_close_across_cpus(got, want)
    assert_close_across_cpus(got_strided, want)


@requires_kernel
def test_group_kernels_only_where_they_may_run():
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert group_kernels(x) is not None
        assert group_kernels(x.double()) is None
    leaf = x.clone().requires_grad_()
    assert group_kernels(leaf) is None  # a gradient is wanted: PyTorch ops
    with torch.no_grad():
        assert group_kernels(leaf) is not None


@requires_kernel
def test_regroup_with_sizes_that_are_not_counts_sorts_as_the_reference(monkeypatch):
    """The kernel picks the largest groups by counting where sizes count positions, and sorts where they do not: the
    reference's choice either way (ties by token order); an empty batch gives empty groups."""
    groups, z = _groups(11, alone=False)
    fractional = Unmerge(groups.owner, groups.sizes * 0.37 + 0.01, True, groups.anchors, None, 0.5)
    with torch.no_grad():
        got = fractional.for_mlp(z)
        with monkeypatch.context() as m:
            _reference(m)
            want = fractional.for_mlp(z)
        assert torch.equal(got.owner, want.owner) and torch.equal(got.sizes, want.sizes)
        owner, counts = cpu.regroup(z[:0], groups.anchors[:0], groups.sizes[:0], None, 4, REGROUP_ROUNDS)
    assert owner.shape == (0, 37) and counts.shape == (0, 4)


@requires_kernel
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("shape", [(16,), (4, 6)])
def test_group_add_is_the_reference_residual_add(monkeypatch, scaled, shape):
    """``Unmerge.add_to``: x + scale * the update un-merged to every position, in one C call where the kernels may
    run; rows of unit stride that are not contiguous taken as they are; an empty batch gives an empty result."""
    groups, _ = _groups(5)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 37, *shape, generator=g)
    update = torch.randn(3, 9, *shape, generator=g)
    strided = torch.randn(3, 9, 2 * shape[0], *shape[1:])[:, :, : shape[0]]  # not contiguous
    strided.copy_(update)
    scale = torch.randn(shape[-1], generator=g) if scaled else None
    with torch.no_grad():
        got, got_strided = groups.add_to(x, update, scale), groups.add_to(x, strided, scale)
        with monkeypatch.context() as m:
            _reference(m)
            want = groups.add_to(x, update, scale)
        empty = cpu.group_add(x[:0], update[:0], groups.owner[:0], scale)
    assert got.shape == want.shape == x.shape
    assert_close_across_cpus(got, want)
    assert_close_across_cpus(got_strided, want)
    assert empty.shape == (0, 37, *shape)


def test_add_update_drops_only_in_training_and_is_the_plain_add_without_groups():
    """``add_update``: with no groups the block's plain residual add; while drop_path may drop it takes the PyTorch
    path through drop_path (the kernel has no dropping)."""
    from ssmtrim.models.layers import DropPath

    groups, _ = _groups(6)
    x, update = torch.randn(3, 37, 8), torch.randn(3, 9, 8)
    drop = DropPath(0.5)
    drop.train()
    assert drop.drops
    torch.manual_seed(0)
    got = tokens.add_update(x, update, groups, None, drop)
    torch.manual_seed(0)
    want = x + drop(groups.unmerge(update))
    assert torch.equal(got, want)
    drop.eval()
    assert not drop.drops
    plain = torch.randn(3, 37, 8)
    assert torch.equal(tokens.add_update(x, plain, None, None, drop), x + plain)
