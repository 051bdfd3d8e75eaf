"""Merging strategies (``merge``, ``tome``): sizes add up to the original token count, the merged stream is the
size-weighted average written out by hand, survivors keep their original order, the class token is never merged,
batches equal single images, a pooling head weights by size, options are refused where they do not apply, and the
Δ score reads softplus(Δ)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import BlockOutput, TokenState
from ssmtrim.pruning import PruneConfig, apply_pruning, reduced_forward, remove_pruning
from ssmtrim.pruning.scores import get_score
from ssmtrim.pruning.state import ReductionStep
from ssmtrim.pruning.strategies import get_strategy


def _perturbed(name: str, **overrides):
    torch.manual_seed(0)
    model = ssmtrim.create_model(name, **overrides).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture(scope="module")
def vim():
    return _perturbed("vim_test", depth=6)


@pytest.fixture(scope="module")
def plain():
    return _perturbed("plainmamba_test", depth=4)


def _images(model, n=4, seed=1):
    s = model.config.img_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def test_merge_step_is_the_size_weighted_average_by_hand():
    torch.manual_seed(0)
    bsz, length, dim = 2, 7, 5
    hidden, residual = torch.randn(bsz, length, dim), torch.randn(bsz, length, dim)
    features = torch.randn(bsz, length, 3)
    scores = torch.randn(bsz, length)
    sizes = torch.randint(1, 4, (bsz, length)).float()
    state = TokenState(torch.arange(length).expand(bsz, -1), torch.tensor([3, 3]), length, (1, length), True,
                       sizes=sizes)  # fmt: skip
    plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge")
    step = ReductionStep(0, scores, 3, (hidden, residual), state, BlockOutput((), features, mixer_input=features),
                         plan)  # fmt: skip
    (h2, r2), new = get_strategy("merge").reduce(step)
    for b in range(bsz):
        ranked = [i for i in torch.argsort(scores[b], stable=True).tolist() if i != 3]
        removed, kept = ranked[:3], sorted(ranked[3:] + [3])
        assert new.positions[b].tolist() == kept and int(new.cls_index[b]) == kept.index(3)
        f = F.normalize(features[b], dim=-1)
        acc = {j: (sizes[b, j] * hidden[b, j], sizes[b, j]) for j in kept}
        for i in removed:
            targets = [j for j in kept if j != 3]
            j = max(targets, key=lambda t: float(f[i] @ f[t]))
            h, w = acc[j]
            acc[j] = (h + sizes[b, i] * hidden[b, i], w + sizes[b, i])
        for n, j in enumerate(kept):
            torch.testing.assert_close(h2[b, n], acc[j][0] / acc[j][1])
            assert float(new.sizes[b, n]) == float(acc[j][1])
        assert float(new.sizes[b].sum()) == float(sizes[b].sum())  # nothing lost


def test_merging_only_the_staying_tokens_gives_the_bits_of_merging_all_then_keeping():
    """``merge_and_keep`` computes the staying tokens only; written out over every token and gathered afterwards (the
    plain formulation) the result is the same to the bit, sizes included."""
    from ssmtrim.models.tokens import gather_tokens
    from ssmtrim.pruning.strategies.merge import merge_and_keep

    g = torch.Generator().manual_seed(3)
    bsz, length, dim, n_removed = 3, 40, 6, 17
    streams = (torch.randn(bsz, length, dim, generator=g), None, torch.randn(bsz, length, dim, generator=g).double())
    sizes = torch.randint(1, 6, (bsz, length), generator=g).float()  # not powers of two: x s / s is not always x
    removed = torch.stack([torch.randperm(length, generator=g)[:n_removed] for _ in range(bsz)])
    src = removed[:, 4:]  # the first four are dropped
    staying = [[i for i in range(length) if i not in set(removed[b].tolist())] for b in range(bsz)]
    dst = torch.stack([torch.tensor(staying[b])[torch.randint(0, 5, (src.shape[1],), generator=g)]
                       for b in range(bsz)])  # several into the same few tokens
    state = TokenState(torch.arange(length).expand(bsz, -1), None, length, (1, length), True, sizes=sizes)
    got, new = merge_and_keep(state, streams, sizes, src, dst, removed)
    w_src = gather_tokens(sizes, src)
    total = sizes.scatter_add(1, dst, w_src)
    index = torch.tensor(staying)
    for t, out in zip(streams, got, strict=True):
        if t is None:
            assert out is None
            continue
        acc = (t.float() * sizes[..., None]).scatter_add(
            1, dst[..., None].expand(-1, -1, dim), gather_tokens(t.float(), src) * w_src[..., None])
        assert torch.equal(out, gather_tokens((acc / total[..., None]).to(t.dtype), index))
    assert torch.equal(new.sizes, gather_tokens(total, index)) and new.positions.tolist() == staying


@pytest.mark.parametrize("arrangement", ["merge", "tome"])
@pytest.mark.parametrize("name", ["vim", "plain"])
def test_merging_keeps_order_and_every_original_token(request, name, arrangement):
    model = request.getfixturevalue(name)
    x = _images(model)
    plan = PruneConfig(layers=(1, 2), keep=(0.6,), arrangement=arrangement)
    with torch.no_grad():
        out = reduced_forward(model, x, plan)
        single = torch.cat([reduced_forward(model, x[i : i + 1], plan).logits for i in range(x.shape[0])])
    state = out.state
    assert (state.positions.diff(dim=1) > 0).all()  # original order, real positions
    assert torch.equal(state.sizes.sum(1), torch.full((x.shape[0],), float(state.length)))
    if state.cls_index is not None:
        assert (state.positions.gather(1, state.cls_index[:, None]) == model.config.cls_position).all()
        assert (state.sizes.gather(1, state.cls_index[:, None]) == 1).all()  # the class token receives nothing
    torch.testing.assert_close(out.logits, single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dense = model(x)
        apply_pruning(model, PruneConfig(layers=(1, 2), keep=(1.0,), arrangement=arrangement))
        try:
            assert torch.equal(model(x), dense)  # nothing reduced is the dense model
        finally:
            remove_pruning(model)


def test_drop_fraction_drops_the_least_important_share(vim):
    x = _images(vim)
    with torch.no_grad():
        merged = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
        half = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge",
                                                   drop_fraction=0.5))  # fmt: skip
        dropped = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge",
                                                      drop_fraction=1.0))  # fmt: skip
        align = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="align"))
    assert torch.equal(merged.state.positions, align.state.positions)  # the same survivors
    removed = 16 - 8
    assert (half.state.sizes.sum(1) == 17 - removed // 2).all()
    assert (dropped.state.sizes == 1).all()
    torch.testing.assert_close(dropped.logits, align.logits)  # dropping every removed token is align


def test_pooling_head_weights_merged_tokens_by_size(plain):
    x = _images(plain)
    family = ssmtrim.models.registry.family_of(plain)
    with torch.no_grad():
        out = reduced_forward(plain, x, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
        streams, _ = family.embed(plain, x, True)
        # the head alone, on made-up tokens: weighted mean of ln1(tokens) by size
        tokens = torch.randn(4, 8, plain.config.embed_dim)
        sizes = torch.tensor([[1.0, 3, 1, 1, 2, 1, 1, 6]]).expand(4, -1)
        state = out.state.replace(sizes=sizes)
        got = family.classifier(plain)(family.features(plain, (tokens,), state))
        normed = plain.ln1(tokens)
        expected = plain.head((normed * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True))
        # without sizes (nothing merged) the plain mean, as the dense head
        torch.testing.assert_close(family.features(plain, (tokens,), state.replace(sizes=None)), normed.mean(1))
    torch.testing.assert_close(got, expected)


def test_merge_options_are_refused_where_they_do_not_apply(vim):
    with pytest.raises(ConfigError, match="--metric is an option of merge, tome, unmerge; --arrangement align"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), metric="y"))
    with pytest.raises(ConfigError, match="--drop-fraction is an option of merge; --arrangement tome"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="tome", drop_fraction=0.5))
    with pytest.raises(ConfigError, match="--metric 'cls' is not one of input, y, delta"):
        PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", metric="cls")
    with pytest.raises(ConfigError, match="--drop-fraction 1.5 is outside"):
        PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", drop_fraction=1.5)
    assert type(vim).__name__ == "VisionMamba"


@pytest.mark.parametrize("name", ["vim", "plain"])
def test_delta_score_is_the_channel_mean_of_softplus_delta(request, name):
    model = request.getfixturevalue(name)
    x = _images(model, 2)
    family = ssmtrim.models.registry.family_of(model)
    with torch.no_grad():
        streams, state = family.embed(model, x, True)
        out = family.run_block(model, 0, streams, state, None, frozenset({"delta"}))
        mixer = model.layers[0].mixer if name == "vim" else model.layers[0].mamba
        h = model.layers[0].norm(out.streams[1] if name == "vim" else streams[0])
        xz = mixer.in_proj(h)
        if name == "vim":  # both directions, the backward one flipped back to original order
            x_in, _ = xz.transpose(1, 2).chunk(2, dim=1)
            deltas = []
            for backward, seq in ((False, x_in), (True, x_in.flip(-1))):
                s = "_b" if backward else ""
                u = mixer.conv_act(seq, backward)
                dt = getattr(mixer, "x_proj" + s)(u.transpose(1, 2))[..., : mixer.dt_rank]
                d = F.softplus(getattr(mixer, "dt_proj" + s)(dt))  # B L E
                deltas.append(d.flip(1) if backward else d)
            expected = (deltas[0] + deltas[1]) / 2
        else:  # PlainMamba: the dt bias enters twice
            _, delta, _, _, _ = mixer.project(h, state.grid)
            expected = F.softplus(delta + mixer.dt_proj.bias[:, None]).transpose(1, 2)
    torch.testing.assert_close(out.delta, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(get_score("delta")(out), expected.mean(-1), rtol=1e-5, atol=1e-6)


def test_redundancy_lowers_the_rank_of_a_token_with_a_near_copy():
    """--option redundancy=w: the tokens that leave are the lowest of (standardised importance) - w x (standardised
    highest similarity to another unprotected token), computed here by hand; w = 0 is importance alone."""
    length = 6
    # tokens 0 and 1 are near copies; 2..5 point in distinct directions; token 3 is protected (a class token)
    features = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.99, 0.1, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                              [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [-1.0, 0.0, 0.0, 0.1]]])
    scores = torch.tensor([[0.9, 1.0, 0.5, 9.0, 0.6, 0.7]])
    state = TokenState(torch.arange(length)[None], torch.tensor([3]), length, (1, length), True)
    hidden = torch.randn(1, length, 3)

    def survivors(weight: float) -> list[int]:
        plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", options={"redundancy": weight})
        step = ReductionStep(0, scores, 3, (hidden,), state, BlockOutput((), features, mixer_input=features), plan)
        return get_strategy("merge").reduce(step)[1].positions[0].tolist()

    def by_hand(weight: float) -> list[int]:
        free = [0, 1, 2, 4, 5]
        f = F.normalize(features[0], dim=-1)
        near = torch.tensor([max(float(f[i] @ f[j]) for j in free if j != i) for i in free])
        imp = scores[0, free]
        z = lambda v: (v - v.mean()) / v.std(unbiased=False)  # noqa: E731
        key = z(imp) - weight * z(near)
        leave = [free[i] for i in torch.argsort(key, stable=True)[:2].tolist()]
        return sorted(set(range(length)) - set(leave))

    assert survivors(0.0) == by_hand(0.0) == [0, 1, 3, 5]  # importance alone: 2 and 4 leave
    assert survivors(2.0) == by_hand(2.0)
    assert 0 not in survivors(2.0) or 1 not in survivors(2.0)  # one of the near copies now leaves


def test_bc_metric_reads_both_directions_b_and_c_in_original_order(vim, plain):
    """``--metric bc``: a Vim block hands over its SSM's B and C, forward direction then backward, each token's row in
    its original place (the backward direction's computed on the reversed sequence and put back), which is what
    the merge's similarity then reads; a family that does not give them refuses the plan in one sentence."""
    from ssmtrim.models.registry import family_of

    mixer = vim.layers[1].mixer
    hidden = torch.randn(2, 9, vim.config.embed_dim)
    with torch.no_grad():
        normed = vim.layers[1].norm(hidden)
        x = mixer.in_proj(normed)[..., : mixer.d_inner]
        expected = []
        for backward, seq in ((False, x), (True, x.flip(1))):
            conv = mixer.conv1d_b if backward else mixer.conv1d
            xc = F.silu(conv(seq.transpose(1, 2))[..., : seq.shape[1]]).transpose(1, 2)
            proj = (mixer.x_proj_b if backward else mixer.x_proj)(xc)[..., mixer.dt_rank:]  # B then C
            expected.append(proj.flip(1) if backward else proj)
        family = family_of(vim)
        state = TokenState(torch.arange(9).expand(2, -1), None, 9, (3, 3), True)
        out = family.run_block(vim, 1, (hidden, None), state, None, frozenset({"bc"}))
    torch.testing.assert_close(out.bc, torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-6)
    assert out.bc.shape == (2, 9, 4 * vim.config.d_state)
    x_img = _images(vim)
    with torch.no_grad():
        by_input = reduced_forward(vim, x_img, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge")).logits
        by_bc = reduced_forward(vim, x_img, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge",
                                                        metric="bc")).logits
    assert torch.isfinite(by_bc).all() and not torch.equal(by_bc, by_input)
    with pytest.raises(ConfigError, match="needs the SSM's B and C from the blocks, which a plainmamba model does not"):
        apply_pruning(plain, PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", metric="bc"))


def test_protect_around_keeps_the_class_tokens_neighbours(vim):
    """``--option protect_around=R``: every token within R original positions of the class token stays through each
    step while the step keeps enough tokens for them; R = 0 is the plain ranking."""
    x = _images(vim)
    cls = vim.config.cls_position
    near = set(range(cls - 2, cls + 3))
    with torch.no_grad():
        plain = reduced_forward(vim, x, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge"))
        zero = reduced_forward(vim, x, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge",
                                                   options={"protect_around": 0}))
        kept = reduced_forward(vim, x, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge",
                                                   options={"protect_around": 2}))
    assert torch.equal(zero.logits, plain.logits)
    for b in range(x.shape[0]):
        assert near <= set(kept.state.positions[b].tolist())
    assert any(not near <= set(plain.state.positions[b].tolist()) for b in range(x.shape[0]))  # it changed something
    assert torch.equal(kept.state.sizes.sum(1), torch.full((x.shape[0],), float(kept.state.length)))


def test_protect_around_never_removes_the_class_token_when_a_step_keeps_fewer_than_its_neighbours(vim):
    """A step that keeps fewer tokens than stand around the class token still keeps the class token itself."""
    x = _images(vim)
    with torch.no_grad():
        out = reduced_forward(vim, x, PruneConfig(layers=(1,), keep=(0.05,), arrangement="merge",
                                                  options={"protect_around": 10}))
    assert (out.state.positions.gather(1, out.state.cls_index[:, None]) == vim.config.cls_position).all()


def _adjacent_by_hand(features, protected, src, index):
    """For each merged token, the more similar of the nearest staying unprotected tokens before and after it (the
    earlier one on a tie), written out with loops."""
    f = F.normalize(features.float(), dim=-1)
    out = torch.empty_like(src)
    for b in range(src.shape[0]):
        free = [i for i in index[b].tolist() if not protected[b, i]]
        for r, s in enumerate(src[b].tolist()):
            before = [i for i in free if i < s]
            after = [i for i in free if i > s]
            cands = ([before[-1]] if before else []) + ([after[0]] if after else [])
            sims = [float(f[b, s] @ f[b, c]) for c in cands]
            out[b, r] = cands[1] if len(cands) == 2 and sims[1] > sims[0] else cands[0]
    return out


@pytest.mark.parametrize("kernels", [True, False])
def test_merge_into_adjacent_takes_the_more_similar_staying_neighbour(kernels, monkeypatch):
    """``--option merge_into=adjacent``: each merged token goes to the more similar of its nearest staying neighbours
    before and after it in the sequence, never to the class token, the same with the backend's merge kernels and in
    PyTorch ops; the tokens that stay are those of the default rule."""
    if not kernels:
        import ssmtrim.pruning.strategies.merge as merge_module

        monkeypatch.setattr(merge_module, "merge_kernels", lambda *t: None)
    torch.manual_seed(0)
    bsz, length = 3, 17
    features = torch.randn(bsz, length, 6)
    scores = torch.randn(bsz, length)
    state = TokenState(torch.arange(length).expand(bsz, -1), torch.tensor([8, 8, 8]), length, (1, length), True)
    streams, output = (torch.randn(bsz, length, 4), None), BlockOutput((), features, mixer_input=features)
    from ssmtrim.pruning.strategies.merge import choose_merges

    def choose(rule):
        plan = PruneConfig(layers=(1,), keep=(0.4,), arrangement="merge", options={"merge_into": rule})
        return choose_merges(ReductionStep(0, scores, 6, streams, state, output, plan))

    src, dst, removed, index = choose("adjacent")
    src_s, dst_s, removed_s, index_s = choose("similar")
    assert torch.equal(index, index_s) and torch.equal(src, src_s) and torch.equal(removed, removed_s)
    protected = state.protected()
    assert torch.equal(dst, _adjacent_by_hand(features, protected, src, index))
    assert not protected.gather(1, dst).any()
    assert not torch.equal(dst, dst_s)  # a different rule from the default's on these tokens


@pytest.mark.parametrize("kernels", [True, False])
def test_rescale_norm_gives_a_merged_token_the_mean_norm_of_its_tokens(kernels, monkeypatch):
    """``--option rescale=norm``: a token others were merged into keeps the direction of its size-weighted average and
    takes the size-weighted mean of their norms, in every stream; a token nothing was merged into keeps its bits; the
    same with the backend's merge kernels and in PyTorch ops."""
    if not kernels:
        import ssmtrim.pruning.strategies.merge as merge_module

        monkeypatch.setattr(merge_module, "merge_kernels", lambda *t: None)
    torch.manual_seed(0)
    bsz, length, dim = 2, 11, 6
    streams = (torch.randn(bsz, length, dim), torch.randn(bsz, length, dim) * 3)
    features = torch.randn(bsz, length, 4)
    scores = torch.randn(bsz, length)
    sizes = torch.randint(1, 4, (bsz, length)).float()
    state = TokenState(torch.arange(length).expand(bsz, -1), torch.tensor([5, 5]), length, (1, length), True,
                       sizes=sizes, track_owner=True)
    output = BlockOutput((), features, mixer_input=features)

    def step(rescale: str):
        plan = PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge", options={"rescale": rescale})
        return get_strategy("merge").reduce(ReductionStep(0, scores, 5, streams, state, output, plan))

    (plain_streams, plain), (scaled_streams, scaled) = step("none"), step("norm")
    assert torch.equal(plain.positions, scaled.positions) and torch.equal(plain.sizes, scaled.sizes)
    for before, avg, out in zip(streams, plain_streams, scaled_streams, strict=True):
        for b in range(bsz):
            for n, pos in enumerate(plain.positions[b].tolist()):
                members = (plain.owner[b] == n).nonzero().flatten().tolist()  # the original tokens it stands for
                if members == [pos]:  # nothing merged into it: the same bits
                    assert torch.equal(out[b, n], avg[b, n])
                    continue
                norms = before[b, members].norm(dim=-1)
                goal = float((norms * sizes[b, members]).sum() / sizes[b, members].sum())
                assert float(out[b, n].norm()) == pytest.approx(goal, rel=1e-5)
                torch.testing.assert_close(F.normalize(out[b, n], dim=0), F.normalize(avg[b, n], dim=0))
