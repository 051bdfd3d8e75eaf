"""The merge step's C kernels (:mod:`ssmtrim.ops.tokens`, ``MergeKernels``): the PyTorch reference's choice and
values, and taken only where they may run. The choice (a stable sort, the first most similar target) is compared
exactly; merged values to the tolerance that holds across CPUs (the kernel sums in its own order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
import ssmtrim.pruning.strategies.merge as merge
from ssmtrim.models.tokens import BlockOutput, TokenState, gather_tokens
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.backends import cpu
from ssmtrim.ops.tokens import merge_kernels
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.state import ReductionStep
from tests.tolerance import assert_close_across_cpus

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")


def reference_choose(keys, protected, features, removed, n_drop):
    """choose_merges' PyTorch code, written out."""
    ranked = torch.sort(keys, dim=1, stable=True).indices
    src_all, index = ranked[:, :removed], ranked[:, removed:].sort(dim=1).values
    src = src_all[:, n_drop:]
    unit = F.normalize(features.float(), dim=-1)
    sim = gather_tokens(unit, src) @ gather_tokens(unit, index).transpose(1, 2)
    sim = sim.masked_fill(gather_tokens(protected, index)[:, None, :], float("-inf"))
    return src_all, index, index.gather(1, sim.argmax(-1))


def _case(seed, bsz=3, length=41, width=24, n_protected=2):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 6, (bsz, length), generator=g).float()  # many ties: the order among them is by position
    protected = torch.zeros(bsz, length, dtype=torch.bool)
    for b in range(bsz):
        protected[b, torch.randperm(length, generator=g)[:n_protected]] = True
    keys = keys.masked_fill(protected, float("inf"))
    features = torch.randn(bsz, length, width, generator=g)
    features[:, 5] = features[:, 9]  # two staying candidates alike: the first wins
    return keys, protected, features


@requires_kernel
@pytest.mark.parametrize("removed,n_drop", [(1, 0), (13, 0), (20, 5), (20, 20), (39, 0)])
def test_choose_is_the_reference_choice(removed, n_drop):
    keys, protected, features = _case(removed + n_drop)
    got = cpu.merge_choose(keys, protected, features, removed, n_drop)
    want = reference_choose(keys, protected, features, removed, n_drop)
    for g, w, what in zip(got, want, ("removed", "staying", "targets"), strict=True):
        assert torch.equal(g, w), what


@requires_kernel
@pytest.mark.parametrize("removed,n_drop,n_protected", [(1, 0, 2), (13, 0, 2), (20, 5, 2), (39, 0, 2), (30, 0, 6)])
def test_choose_adjacent_is_the_reference_choice(removed, n_drop, n_protected):
    """``adjacent``: each merged token to the more similar of its nearest staying unprotected neighbours, as the
    strategy's PyTorch code chooses (protected tokens, registers among them, skipped over)."""
    keys, protected, features = _case(removed + n_drop, n_protected=n_protected)
    src_all, index, dst = cpu.merge_choose(keys, protected, features, removed, n_drop, True)
    want = merge._adjacent_targets(F.normalize(features, dim=-1), protected, src_all[:, n_drop:], index, n_protected)
    ref_src, ref_index, _ = reference_choose(keys, protected, features, removed, n_drop)
    assert torch.equal(src_all, ref_src) and torch.equal(index, ref_index)
    assert torch.equal(dst, want)


@requires_kernel
@pytest.mark.parametrize("removed,n_drop,length", [(120, 0, 257), (60, 20, 130), (1, 0, 64)])
def test_choose_many_tokens_is_the_reference_choice(removed, n_drop, length):
    """At 64 tokens and more the ranking is a radix sort: the same stable order (ties by position; the keys here
    take six values) and the same targets, protected staying tokens never chosen."""
    keys, protected, features = _case(length + removed, length=length, n_protected=3)
    got = cpu.merge_choose(keys, protected, features, removed, n_drop)
    want = reference_choose(keys, protected, features, removed, n_drop)
    for g, w, what in zip(got, want, ("removed", "staying", "targets"), strict=True):
        assert torch.equal(g, w), what


@requires_kernel
@pytest.mark.parametrize("length", [7, 90])
def test_choose_orders_nans_last_and_negative_zero_with_zero_at_any_length(length):
    values = torch.tensor([0.5, float("nan"), -0.0, 0.0, -1.0, float("inf"), float("-inf")])
    keys = values[torch.arange(length) % 7][None] if length > 7 else values[None]
    protected = torch.zeros_like(keys, dtype=torch.bool)
    src_all, _, _ = cpu.merge_choose(keys, protected, None, length - 1, length - 1)
    assert src_all.tolist() == torch.sort(keys, dim=1, stable=True).indices[:, : length - 1].tolist()


@requires_kernel
def test_choose_orders_nans_last_and_negative_zero_with_zero():
    keys = torch.tensor([[0.5, float("nan"), -0.0, 0.0, -1.0, float("inf"), float("-inf")]])
    protected = torch.zeros_like(keys, dtype=torch.bool)
    src_all, index, _ = cpu.merge_choose(keys, protected, None, 6, 6)
    assert src_all.tolist() == torch.sort(keys, dim=1, stable=True).indices[:, :6].tolist() == [[6, 4, 2, 3, 0, 5]]
    assert index.tolist() == [[1]]


@requires_kernel
@pytest.mark.parametrize("merged", [0, 9])
def test_keep_is_the_reference_average(merged):
    g = torch.Generator().manual_seed(merged)
    bsz, length, removed = 2, 30, 12
    # a stream of rows of stride 2 (copied first), and an absent one
    streams = (torch.randn(bsz, length, 7, generator=g), None, torch.randn(bsz, length, 6, generator=g)[:, :, ::2])
    sizes = torch.randint(1, 5, (bsz, length), generator=g).float()
    state = TokenState(torch.arange(length).expand(bsz, -1).clone(), torch.tensor([0, 3]), length, (1, length), True,
                       sizes=sizes)
    keys = torch.randn(bsz, length, generator=g).masked_fill(state.protected(), float("inf"))
    features = torch.randn(bsz, length, 5, generator=g)
    src_all, index, dst = cpu.merge_choose(keys, state.protected(), features, removed, removed - merged)
    src = src_all[:, removed - merged:]
    got, got_state = merge.merge_and_keep(state, streams, sizes, src, dst, src_all, index)
    want, want_state = merge.merge_and_keep(state, streams, sizes, src, dst, src_all)  # no index: the reference
    for g_, w in zip(got, want, strict=True):
        assert (g_ is None) == (w is None)
        if w is not None:
            assert g_.shape == w.shape
            assert_close_across_cpus(g_, w, rtol=1e-6)
    assert torch.equal(got_state.sizes, want_state.sizes)
    assert torch.equal(got_state.positions, want_state.positions)
    assert torch.equal(got_state.cls_index, want_state.cls_index)


@requires_kernel
def test_taken_only_where_they_may_run():
    x = torch.randn(2, 5, 4)
    assert merge_kernels(x, None) is not None
    assert merge_kernels(x.double()) is None  # fp32 only
    assert merge_kernels(x.requires_grad_()) is None  # a gradient wanted: PyTorch's ops
    with torch.no_grad():
        assert merge_kernels(x) is not None


@requires_kernel
def test_a_reduced_forward_gives_the_reference_logits(monkeypatch):
    """A merge plan end to end with the kernels and with PyTorch's ops: the same logits (to the tolerance across
    CPUs), a batch of images with the class token in the middle, a dropped share and redundancy included."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    recommended = (("merge_into", "adjacent"), ("protect_around", 4), ("rescale", "norm"))
    for given in ({}, {"drop_fraction": 0.3}, {"options": (("redundancy", 0.5),)}, {"options": recommended}):
        model = ssmtrim.create_model("vim_test").eval()
        reduced = apply_pruning(model, PruneConfig(layers=(1, 2), keep=(0.6, 0.7), arrangement="merge", **given))
        with torch.no_grad():
            got = reduced(x)
            with monkeypatch.context() as m:
                m.setattr(merge, "merge_kernels", lambda *tensors: None)
                want = reduced(x)
        assert_close_across_cpus(got, want, what=str(given))


@requires_kernel
@pytest.mark.parametrize("one_step,options,want", [
    (True, (), ["step"]),
    (False, (), ["choose", "keep"]),  # a backend without the one-call step: its two calls
    (True, (("redundancy", 0.5),), ["choose", "keep"]),  # every token's similarities first: the two calls
])
def test_the_strategy_calls_them(monkeypatch, one_step, options, want):
    calls = []
    choose, keep, step_of = cpu.merge_choose, cpu.merge_keep, cpu.merge_step
    kernels = cpu.BACKEND.merge._replace(choose=lambda *a: calls.append("choose") or choose(*a),
                                         keep=lambda *a: calls.append("keep") or keep(*a),
                                         step=(lambda *a: calls.append("step") or step_of(*a)) if one_step else None)
    monkeypatch.setattr(merge, "merge_kernels", lambda *tensors: kernels)
    length = 9
    state = TokenState(torch.arange(length)[None], torch.tensor([4]), length, (1, length), True)
    features = torch.randn(1, length, 4)
    step = ReductionStep(0, torch.randn(1, length), 5, (torch.randn(1, length, 4),), state,
                         BlockOutput((), features, mixer_input=features),
                         PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", options=options))
    merge.Merge().reduce(step)
    assert calls == want


def _step_case(seed, bsz, length, n_protected, sized, options, k):
    """A merge step on tokens left from an earlier one: original positions with gaps, protected tokens (a class token
    as B, registers as B P), sizes or none, two streams of rows and an absent one, the owner map tracked."""
    g = torch.Generator().manual_seed(seed)
    positions = torch.stack([torch.randperm(2 * length, generator=g)[:length].sort().values for _ in range(bsz)])
    if n_protected == 0:
        cls_index = None
    elif n_protected == 1:
        cls_index = torch.full((bsz,), length // 2)
    else:
        cls_index = torch.stack([torch.randperm(length, generator=g)[:n_protected].sort().values for _ in range(bsz)])
    sizes = torch.randint(1, 5, (bsz, length), generator=g).float() if sized else None
    owner = torch.stack([torch.randint(0, length, (2 * length,), generator=g) for _ in range(bsz)])
    state = TokenState(positions, cls_index, 2 * length, (1, 2 * length), True, reduced=True, sizes=sizes,
                       owner=owner, track_owner=True)
    streams = (torch.randn(bsz, length, 7, generator=g), None, torch.randn(bsz, length, 12, generator=g)[:, :, ::2])
    features = torch.randn(bsz, length, 5, generator=g)
    features[:, 5] = features[:, 9]  # two tokens alike
    scores = torch.randint(0, 6, (bsz, length), generator=g).float()  # ties: the order among them by position
    fields = {name: value for name, value in options if name == "drop_fraction"}  # a field of the plan
    plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", **fields,
                       options=tuple(o for o in options if o[0] not in fields))
    return ReductionStep(0, scores, k, streams, state, BlockOutput((), features, mixer_input=features), plan)


@requires_kernel
@pytest.mark.parametrize("n_protected,sized,options,k", [
    (1, False, (("merge_into", "adjacent"), ("protect_around", 4), ("rescale", "norm")), 20),  # Vim's default
    (1, True, (("merge_into", "adjacent"), ("protect_around", 4), ("rescale", "norm")), 9),
    (3, True, (("protect_around", 2),), 15),  # registers: protection around each
    (3, False, (("merge_into", "adjacent"), ("rescale", "norm")), 1),
    (0, True, (("protect_around", 3),), 12),  # nothing protected: nothing to protect around
    (1, True, (("rescale", "norm"),), 30),
    (1, False, (("drop_fraction", 0.4), ("protect_around", 1)), 10),
    (2, True, (("drop_fraction", 1.0),), 8),  # every removed token dropped: nothing merged
    (1, True, (("drop_fraction", 0.0), ("merge_into", "adjacent")), 40),  # nothing removed
])
def test_the_one_call_step_is_the_reference_step(monkeypatch, n_protected, sized, options, k):
    """``MergeKernels.step`` (keys, choice and merged rows in one C call) against the strategy's PyTorch code: the
    same tokens stay, at the same positions, the protected tokens at the same new indices, the same owner map, the
    same sizes; rows to the tolerance across CPUs."""
    for seed in range(3):
        step = _step_case(seed, 3, 41, n_protected, sized, options, k)
        got_streams, got = merge.Merge().reduce(step)
        with monkeypatch.context() as m:
            m.setattr(merge, "merge_kernels", lambda *tensors: None)
            want_streams, want = merge.Merge().reduce(step)
        for g_, w in zip(got_streams, want_streams, strict=True):
            assert (g_ is None) == (w is None)
            if w is not None:
                assert g_.shape == w.shape
                assert_close_across_cpus(g_, w, rtol=1e-6)
        assert torch.equal(got.positions, want.positions)
        assert (got.cls_index is None) == (want.cls_index is None)
        assert got.cls_index is None or torch.equal(got.cls_index, want.cls_index)
        assert torch.equal(got.owner, want.owner)
        assert_close_across_cpus(got.sizes, want.sizes, rtol=1e-6)
        assert got.reduced


@requires_kernel
def test_the_one_call_step_ranks_protected_then_their_neighbours_then_scores():
    """The keys the kernel makes: a protected token stays whatever its score (NaN included), the tokens within
    ``around`` original positions of it stay next (however low their scores), the others by score."""
    length = 12
    positions = torch.tensor([[0, 1, 2, 4, 6, 7, 9, 10, 11, 13, 14, 20]])
    scores = torch.tensor([[9., 8., 7., -5., -6., 6., 5., 4., 3., 2., 1., 0.]])
    scores[0, 5] = float("nan")  # the class token's own score: it stays all the same
    streams = (torch.randn(1, length, 3),)
    cls = torch.tensor([[5]])  # at original position 7: only position 6 (current 4) lies within 1 of it
    out = cpu.merge_step(scores, positions, cls, 1, None, None, streams, length - 5, length - 5)
    _, _, new_positions, new_cls, _, src_all, index, _ = out
    assert index.tolist() == [[0, 1, 2, 4, 5]]  # the class token, its neighbour, then the three best scores
    assert new_positions.tolist() == [[0, 1, 2, 6, 7]] and new_cls.tolist() == [[4]]
    assert src_all[0].tolist() == [3, 11, 10, 9, 8, 7, 6]  # the lowest first
    _, _, _, _, _, _, index, _ = cpu.merge_step(scores, positions, cls, 3, None, None, streams, length - 5, length - 5)
    assert index.tolist() == [[3, 4, 5, 6, 7]]  # within 3: four neighbours, whatever their scores


def reference_bipartite(features, protected, removed):
    """choose_bipartite's PyTorch code, written out."""
    candidates = int((~protected[0]).sum())
    order = torch.sort(protected.long(), dim=1, stable=True).indices[:, :candidates]
    a_idx, b_idx = order[:, 0::2], order[:, 1::2]
    unit = F.normalize(features.float(), dim=-1)
    best, match = (gather_tokens(unit, a_idx) @ gather_tokens(unit, b_idx).transpose(1, 2)).max(-1)
    chosen = torch.sort(-best, dim=1, stable=True).indices[:, :removed]
    return a_idx.gather(1, chosen), b_idx.gather(1, match.gather(1, chosen))


@requires_kernel
@pytest.mark.parametrize("removed,n_protected,length", [(1, 2, 41), (13, 2, 41), (20, 0, 40), (19, 1, 40),
                                                        (100, 1, 257), (40, 0, 200)])
def test_bipartite_is_the_reference_choice(removed, n_protected, length):
    """ToMe's choice in one C call: the same A tokens leave, in the same order, each to the same B token; the staying
    tokens are the others in increasing order. Without protected tokens two B tokens are copies (each A token's tie
    goes to the first); no other near ties."""
    _, protected, features = _case(removed + length, length=length, n_protected=n_protected)
    if n_protected == 0:
        features[:, 7] = features[:, 5]  # two B tokens alike (odd positions)
    got_src, got_dst, index = cpu.merge_bipartite(features, protected, removed)
    want_src, want_dst = reference_bipartite(features, protected, removed)
    assert torch.equal(got_src, want_src)
    assert torch.equal(got_dst, want_dst)
    staying = torch.ones(features.shape[:2], dtype=torch.bool).scatter(1, got_src, False)
    assert torch.equal(index, torch.stack([row.nonzero()[:, 0] for row in staying]))


@requires_kernel
@pytest.mark.parametrize("removed", [1, 2, 3])
def test_bipartite_few_removed_breaks_ties_by_a_order(removed):
    """A step that removes a few tokens of many selects them without a whole sort: A tokens equally similar to their
    B token (here copies of it) leave in A order, as the reference's stable sort has them."""
    _, protected, features = _case(removed + 64, length=64, n_protected=0)
    for a in (0, 2, 4):  # A tokens (even positions) that copy B token 1
        features[:, a] = features[:, 1]
    got_src, got_dst, _ = cpu.merge_bipartite(features, protected, removed)
    want_src, want_dst = reference_bipartite(features, protected, removed)
    assert torch.equal(got_src, want_src) and torch.equal(got_dst, want_dst)
    assert got_src[0].tolist() == [0, 2, 4][:removed]


@requires_kernel
def test_tome_takes_the_bipartite_kernel_with_the_reference_values(monkeypatch):
    """A ToMe plan on a Vim: with the kernels (choice and merge in C) the logits of the PyTorch ops, to rounding."""
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", depth=2).eval()
    apply_pruning(model, PruneConfig(layers=(1,), keep=(0.6,), arrangement="tome"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x)
        monkeypatch.setattr(merge, "merge_kernels", lambda *t: None)
        import ssmtrim.pruning.strategies.tome as tome

        monkeypatch.setattr(tome, "merge_kernels", lambda *t: None)
        want = model(x)
    assert_close_across_cpus(got, want)


@requires_kernel
@pytest.mark.parametrize("removed,n_drop,features", [(5, 2, False), (5, 6, True), (12, 0, True), (-1, 0, True)])
def test_the_one_call_step_refuses_what_it_cannot_do(removed, n_drop, features):
    """Merging without features, dropping more than leave, removing more than there are: refused before the C call."""
    length = 11
    feats = torch.randn(1, length, 4) if features else None
    with pytest.raises(ValueError, match="a merge step removes"):
        cpu.merge_step(torch.randn(1, length), torch.arange(length)[None], None, 0, feats, None,
                       (torch.randn(1, length, 3),), removed, n_drop)


@requires_kernel
def test_the_one_call_step_refuses_tensors_of_another_shape():
    length = 11
    ok = dict(scores=torch.randn(1, length), positions=torch.arange(length)[None], protected=torch.tensor([[3]]))
    for name, bad in (("scores", torch.randn(1, length - 1)), ("protected", torch.tensor([3]))):
        given = {**ok, name: bad}
        with pytest.raises(ValueError, match="as its positions"):
            cpu.merge_step(given["scores"], given["positions"], given["protected"], 0, torch.randn(1, length, 4),
                           None, (torch.randn(1, length, 3),), 4, 0)
    with pytest.raises(ValueError, match="as its positions"):
        cpu.merge_step(ok["scores"], ok["positions"], None, 0, torch.randn(1, length, 4), None,
                       (torch.randn(2, length, 3),), 4, 0)
