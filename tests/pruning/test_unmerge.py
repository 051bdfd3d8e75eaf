"""``unmerge``: tokens merged for the blocks, their updates un-merged onto the whole residual stream (ToMe for Stable
Diffusion's scheme, on the importance-ranked merge)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError
from ssmtrim.models.registry import family_of
from ssmtrim.models.tokens import Unmerge
from ssmtrim.pruning import PruneConfig, apply_pruning, dense_of, feature_maps, remove_pruning
from ssmtrim.pruning.engine import check_plan_for, reduced_forward
from ssmtrim.pruning.scores import get_score

from ..conftest import randomize

# model, reduction points (1-based), images' size; the points leave blocks after them in the same stage
CASES = [("vim_test", (1, 2), 32), ("vmamba_test", (2,), 32), ("mambavision_test", None, None)]


def _model_and_input(name: str, size: int | None):
    model = randomize(ssmtrim.create_model(name))
    hw = size or model.config.img_size
    hw = hw if isinstance(hw, tuple) else (hw, hw)
    return model, torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(3))


def _plan(model, layers, keep: float, match: str = "auto") -> PruneConfig:
    fields = {"layers": layers} if layers else {}
    return PruneConfig.recommended(model, arrangement="unmerge", keep=(keep,), compensate="none",
                                   options={"match": match, "mixer": "tokens", "mlp_groups": "step"}, **fields)


def test_merge_averages_the_positions_a_token_owns_and_unmerge_gives_them_its_value():
    gen = torch.Generator().manual_seed(0)
    owner = torch.tensor([[0, 0, 1, 2, 1, 2, 2], [2, 1, 0, 0, 0, 1, 2]])
    sizes = torch.stack([torch.bincount(o, minlength=3) for o in owner]).float()
    x = torch.randn(2, 7, 5, generator=gen)
    u = Unmerge(owner, sizes)
    merged = u.merge(x)
    for b in range(2):
        for k in range(3):
            torch.testing.assert_close(merged[b, k], x[b, owner[b] == k].mean(0))
    spread = u.unmerge(merged)
    assert spread.shape == x.shape
    for b in range(2):
        for i in range(7):
            assert torch.equal(spread[b, i], merged[b, owner[b, i]])
    torch.testing.assert_close(u.merge(spread), merged)  # merging what was un-merged gives it back


@pytest.mark.parametrize("match", ["importance", "bipartite"])
@pytest.mark.parametrize("name,layers,size", CASES)
def test_every_position_keeps_its_own_residual_and_a_token_adds_one_update_to_all_it_owns(name, layers, size, match,
                                                                                          monkeypatch):
    torch.manual_seed(0)
    model, x = _model_and_input(name, size)
    family = type(family_of(model))
    seen = []
    run_block = family.run_block

    def spy(self, model, index, streams, state, geometry, *rest):
        out = run_block(self, model, index, streams, state, geometry, *rest)
        u = getattr(geometry, "unmerge", None)
        if u is not None:
            seen.append((streams[0], out.streams[0], u, state))
        return out

    monkeypatch.setattr(family, "run_block", spy)
    with torch.no_grad():
        reduced_forward(model, x, _plan(model, layers, 0.5, match))
    assert seen, "no block ran on merged tokens"
    for before, after, u, state in seen:
        assert state.full_streams and before.shape == after.shape  # the streams hold every position
        assert before.shape[1] == state.length > state.num_tokens
        # the mixer's (and MLP's) update: one value per token, given to every position it owns
        update = after if name == "vim_test" else after - before  # Vim's hidden stream is the mixer's output
        bsz, length = u.owner.shape
        sizes = torch.stack([torch.bincount(o, minlength=state.num_tokens) for o in u.owner]).float()
        assert torch.equal(sizes, u.sizes)  # a token's size is the number of positions it owns
        assert torch.equal(u.owner.gather(1, state.positions),  # each token owns the position it stands at
                           torch.arange(state.num_tokens).expand(bsz, -1))
        per_token = u.merge(update)
        torch.testing.assert_close(update, u.unmerge(per_token), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,layers,size", CASES[:2])  # MambaVision's 3x3 test windows merge in steps of 1/9
def test_merging_a_few_tokens_changes_little_and_nothing_reduced_is_dense(name, layers, size):
    """A step that merges a few tokens stays near dense (the class token and the head read the right positions);
    keep 1 is the dense model exactly."""
    torch.manual_seed(0)
    model, x = _model_and_input(name, size)
    with torch.no_grad():
        dense = model(x)
        same = reduced_forward(model, x, _plan(model, layers, 1.0)).logits
        near = reduced_forward(model, x, _plan(model, layers, 0.85))
    assert torch.equal(same, dense)
    assert near.stats.kept_fraction[0] < 1.0
    scale = float(dense.abs().max())
    assert float((near.logits - dense).abs().max()) < 0.2 * scale


def test_feature_maps_are_whole_and_a_saved_folder_reloads(tmp_path):
    torch.manual_seed(0)
    model, x = _model_and_input("vmamba_test", 32)
    apply_pruning(model, _plan(model, (2,), 0.5))
    with torch.no_grad():
        maps, logits = feature_maps(model, x), model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    folder = ssmtrim.save_model(model, tmp_path / "reduced")
    again = ssmtrim.load_model(folder)
    assert again.prune_config.arrangement == "unmerge"
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits, rtol=1e-5, atol=1e-6)
    remove_pruning(model)


def test_what_unmerge_cannot_run_is_refused_in_one_sentence():
    plain = ssmtrim.create_model("plainmamba_test")
    with pytest.raises(ConfigError, match="un-merge the updates onto the full residual stream"):
        apply_pruning(plain, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge", conv="original"))
    vim = ssmtrim.create_model("vim_test")
    with pytest.raises(ConfigError, match="use --mode count"):  # before any calibration's work
        check_plan_for(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge", mode="threshold"),
                       runnable=False)
    with pytest.raises(ConfigError, match="drop_fraction"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge",
                                       options={"drop_fraction": 0.5}))


@pytest.mark.parametrize("name,classify,dense", [("vmamba_test", "unmerge", "unmerge"),
                                                 ("mambavision_test", "unmerge", "unmerge"),
                                                 ("vim_test", "merge", "merge")])
def test_the_family_picks_the_strategy_for_the_task(name, classify, dense):
    """Every family's dense outputs take its classification plan (on the segmentation proxy's training mosaics
    unmerge's maps agreed with dense far more than merge's: benchmarks/seg_select.py)."""
    model = ssmtrim.create_model(name)
    assert PruneConfig.recommended(model).arrangement == classify
    assert PruneConfig.recommended(model, task="classify").arrangement == classify
    assert PruneConfig.recommended(model, task="dense").arrangement == dense
    # what the user gives wins over either
    assert PruneConfig.recommended(model, task="dense", arrangement="unmerge").arrangement == "unmerge"
    with pytest.raises(ConfigError, match="--task 'seg' is not one of classify, dense"):
        PruneConfig.recommended(model, task="seg")


def test_only_mambavision_sets_a_plan_for_dense_outputs():
    """Dense outputs take each family's classification plan but on MambaVision, whose plan for them differs only in
    unmerge's reach_share (a fifth for a tenth; docs/ARCHITECTURE.md says so)."""
    from ssmtrim.models.registry import list_models

    differs = {}
    for spec in list_models(include_test=True):
        if spec.test_only and spec.arch.family not in differs:
            model = ssmtrim.create_model(spec.name)
            dense, classify = PruneConfig.recommended(model, task="dense"), PruneConfig.recommended(model)
            differs[spec.arch.family] = {k: v for k, v in dense.options if dict(classify.options).get(k) != v}
            assert dense.replace(options=classify.options) == classify, spec.name
    assert len(differs) >= 5, differs
    assert differs.pop("mambavision") == {"reach_share": 0.2}
    assert not any(differs.values()), differs


def test_the_plan_that_reaches_further_takes_its_reach_share():
    """unmerge's reaching_further: the MLPs on reach_share of the tokens (a tenth by default), the plan's own
    mlp_share where it sets one."""
    from ssmtrim.pruning.strategies import get_strategy

    unmerge = get_strategy("unmerge")
    whole = PruneConfig(layers=(2,), keep=(0.5,), arrangement="unmerge", options={"mixer": "positions"})
    assert dict(unmerge.reaching_further(whole).options) == {"mixer": "tokens", "mlp_share": 0.1}
    given = whole.replace(options={"mixer": "positions", "reach_share": 0.2})
    assert dict(unmerge.reaching_further(given).options)["mlp_share"] == 0.2
    own = whole.replace(options={"mixer": "positions", "reach_share": 0.2, "mlp_share": 0.3})
    assert dict(unmerge.reaching_further(own).options)["mlp_share"] == 0.3
    assert unmerge.reaching_further(whole.replace(options={"mixer": "tokens"})) is None
    with pytest.raises(ConfigError, match="reach-share 0.0 is outside"):
        whole.replace(options={"reach_share": 0.0})


def test_a_family_plan_for_dense_outputs_is_laid_over_its_own():
    """The mechanism a family's ``recommended_plan`` offers for dense outputs: its "dense" fields replace the plan's
    for task "dense" only."""
    from ssmtrim.models.registry import recommended_plan_of

    class Family:
        def recommended_plan(self, config):
            return {"arrangement": "unmerge", "layers": (2,), "dense": {"arrangement": "merge"}}

    assert recommended_plan_of(Family(), None) == {"arrangement": "unmerge", "layers": (2,)}
    assert recommended_plan_of(Family(), None, "dense") == {"arrangement": "merge", "layers": (2,)}


def test_a_family_plan_without_layers_reduces_after_the_quarters():
    """A family whose ``recommended_plan`` names no layers (or that has none) reduces after a quarter, half and three
    quarters of its blocks, never after the last: one rule for prune, report --sweep and the API."""
    from ssmtrim.models.registry import recommended_plan_of

    class Family:
        def depth(self, config):
            return 8

    class Planned(Family):
        def recommended_plan(self, config):
            return {"arrangement": "merge", "dense": {"arrangement": "align"}}

    assert recommended_plan_of(Family(), None) == {"layers": (2, 4, 6)}
    assert recommended_plan_of(Planned(), None) == {"arrangement": "merge", "layers": (2, 4, 6)}
    assert recommended_plan_of(Planned(), None, "dense") == {"arrangement": "align", "layers": (2, 4, 6)}

    class Shallow(Family):
        def depth(self, config):
            return 2

    assert recommended_plan_of(Shallow(), None) == {"layers": (1,)}  # not after the last block


def test_prune_task_dense_on_the_command_line(tmp_path):
    dense = ssmtrim.save_model(randomize(ssmtrim.create_model("vmamba_test")), tmp_path / "dense")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(images / f"{i}.png")
    runner = CliRunner()
    common = ["prune", str(dense), "--data", str(images), "--layers", "2", "--keep", "0.5", "--no-flops", "--json",
              "--quiet"]
    out = runner.invoke(app, [*common, "--task", "dense"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["plan"]["arrangement"] == "unmerge"
    out = runner.invoke(app, common)
    assert out.exit_code == 0 and json.loads(out.stdout)["plan"]["arrangement"] == "unmerge"
    bad = runner.invoke(app, [*common, "--task", "seg"])
    assert bad.exit_code != 0 and "--task 'seg' is not one of classify, dense" in bad.output


def test_bipartite_matching_keeps_half_or_more_and_auto_takes_it_where_it_can():
    torch.manual_seed(0)
    model, x = _model_and_input("vmamba_test", 32)  # 8x8 first stage, 4x4 second
    with pytest.raises(ConfigError, match="match=bipartite merges at most half"):
        apply_pruning(model, _plan(model, (2,), 0.4, "bipartite"))
    with torch.no_grad():
        for keep, same_as in ((0.75, "bipartite"), (0.25, "importance")):
            auto = reduced_forward(model, x, _plan(model, (2,), keep)).logits
            chosen = reduced_forward(model, x, _plan(model, (2,), keep, same_as)).logits
            assert torch.equal(auto, chosen)
        # the two choices differ, so the comparison above says which one auto took
        assert not torch.equal(reduced_forward(model, x, _plan(model, (2,), 0.75, "importance")).logits,
                               reduced_forward(model, x, _plan(model, (2,), 0.75, "bipartite")).logits)


def _mlps_silenced(model):
    """Every block's MLP made to output zero (its last Linear zeroed): what is left of a block is its mixer."""
    family = family_of(model)
    for i in range(family.depth(model.config)):
        mlp = family.token_mlp(model, i)
        if mlp is not None:
            last = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)][-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
    return model


@pytest.mark.parametrize("name,layers,size", CASES[1:])
def test_with_exact_mixers_only_the_mlps_see_merged_tokens(name, layers, size):
    """--option mixer=positions: the mixers read every position as dense does, so a model whose MLPs add nothing is
    its dense self to rounding (with the default, mixers on the merged tokens, it is not); with its MLPs it is
    reduced."""
    torch.manual_seed(0)
    model, x = _model_and_input(name, size)
    exact = _plan(model, layers, 0.5).replace(options=(("match", "auto"), ("mixer", "positions")))
    with torch.no_grad():
        dense = model(x)
        reduced = reduced_forward(model, x, exact)
        assert reduced.stats.kept_fraction[0] < 1.0
        assert float((reduced.logits - dense).abs().max()) > 1e-4 * float(dense.abs().max())
        _mlps_silenced(model)
        dense = model(x)
        torch.testing.assert_close(reduced_forward(model, x, exact).logits, dense, rtol=1e-5, atol=1e-5)
        merged_mixers = reduced_forward(model, x, _plan(model, layers, 0.5)).logits
    assert float((merged_mixers - dense).abs().max()) > 1e-3 * float(dense.abs().max())


@pytest.mark.parametrize("name,layers,size", CASES[1:])
def test_the_flops_estimate_of_exact_mixers_scales_the_mlps_alone(name, layers, size):
    """keep_for on a mixer=positions plan meets the FLOPs it promises when they are counted for real (every other
    plan's estimate scales whole blocks, which would overshoot here)."""
    from ssmtrim.flops import count_flops
    from ssmtrim.pruning.schedule import FlopsModel, keep_for

    model, x = _model_and_input(name, size)
    plan = _plan(model, layers, 1.0).replace(options=(("match", "auto"), ("mixer", "positions")))
    estimate = FlopsModel(model, "paper", plan)
    whole_blocks = FlopsModel(model, "paper")
    target = (1 + estimate.ratio(plan.layers, 0.01)) / 2  # halfway to the most the MLPs can save
    keep = keep_for(estimate, plan.layers, target)
    assert keep is not None and keep_for(whole_blocks, plan.layers, target) > keep
    apply_pruning(model, plan.replace(keep=(keep,)))
    measured = count_flops(model, "paper", images=x).total / estimate.total
    assert abs(measured - estimate.ratio(plan.layers, keep)) < 0.02
    assert measured <= target + 0.02


def test_exact_mixers_need_mlps_and_are_an_unmerge_option():
    vim = ssmtrim.create_model("vim_test")  # Vim's blocks are mixers alone
    with pytest.raises(ConfigError, match="per-token MLPs"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge",
                                       options={"mixer": "positions"}))
    vmamba = ssmtrim.create_model("vmamba_test")
    with pytest.raises(ConfigError, match="option of unmerge"):
        apply_pruning(vmamba, PruneConfig(layers=(2,), keep=(0.5,), arrangement="merge",
                                          options={"mixer": "positions"}))


def test_a_target_the_mlps_cannot_reach_runs_the_mixers_merged_too(capsys):
    """schedule.reachable_plan: a FLOPs target within the MLPs' reach keeps the plan; one beyond it takes the plan
    the strategy offers (the mixers on the merged tokens), said in a note; a plan that reaches anything is kept."""
    from ssmtrim.pruning.schedule import FlopsModel, reachable_plan

    model, _ = _model_and_input("vmamba_test", 32)
    plan = _plan(model, (2,), 1.0).replace(options=(("match", "auto"), ("mixer", "positions")))
    depth = family_of(model).depth(model.config)
    least = FlopsModel(model, "paper", plan).ratio(tuple(range(1, depth)), 0.01)
    assert reachable_plan(model, plan, least + 0.01, "paper") == plan
    further = reachable_plan(model, plan, least - 0.05, "paper")
    assert further.option("mixer") == "tokens" and further.replace(options=plan.options) == plan
    assert "runs with --option mixer=tokens" in capsys.readouterr().err
    merged = _plan(model, (2,), 1.0)
    assert reachable_plan(model, merged, 0.01, "paper") is merged


def test_exact_mixers_save_reload_and_refuse_a_family_without_mlps(tmp_path):
    from ssmtrim.pruning.schedule import FlopsModel

    torch.manual_seed(0)
    model, x = _model_and_input("mambavision_test", None)
    plan = _plan(model, None, 0.5).replace(options=(("match", "auto"), ("mixer", "positions")))
    apply_pruning(model, plan)
    with torch.no_grad():
        logits = model(x)
    again = ssmtrim.load_model(ssmtrim.save_model(model, tmp_path / "reduced"))
    assert again.prune_config.option("mixer") == "positions"
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits, rtol=1e-5, atol=1e-6)
    vim = ssmtrim.create_model("vim_test")
    with pytest.raises(ConfigError, match="per-token MLPs"):
        FlopsModel(vim, "paper", PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge",
                                             options={"mixer": "positions"}))


def test_an_option_the_user_set_is_held_and_the_target_refused(tmp_path):
    """prune --flops beyond the MLPs' reach: with the family's mixers-whole plan it runs the mixers merged (a note);
    with --option mixer=positions given by the user it is refused in one sentence that says what limits it."""
    from ssmtrim.pruning.schedule import FlopsModel, reachable_plan

    model, _ = _model_and_input("vmamba_test", 32)
    plan = _plan(model, (2,), 1.0).replace(options=(("match", "auto"), ("mixer", "positions")))
    depth = family_of(model).depth(model.config)
    beyond = FlopsModel(model, "paper", plan).ratio(tuple(range(1, depth)), 0.01) - 0.05
    assert reachable_plan(model, plan, beyond, "paper", held={"mixer"}) is plan
    assert reachable_plan(model, plan, beyond, "paper", held={"match"}).option("mixer") == "tokens"
    folder = tmp_path / "calib"
    for i in range(4):
        (folder / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(folder / "a" / f"{i}.png")
    source = ssmtrim.save_model(model, tmp_path / "dense")
    with pytest.raises(ConfigError, match="only the MLPs save FLOPs"):
        ssmtrim.prune_and_save(source, {"arrangement": "unmerge", "options": {"mixer": "positions"}}, folder,
                               target=ssmtrim.pruning.config.FlopsTarget(beyond, "paper"), count_flops=False)


def test_regrouping_puts_each_position_with_the_token_its_mlp_input_is_like():
    """Unmerge.for_mlp: positions whose MLP inputs form clusters around the tokens are grouped by those clusters,
    whatever groups the reduction step chose; every token keeps its own position, a protected token takes no other,
    and the groups cover every position once."""
    gen = torch.Generator().manual_seed(0)
    bsz, length, k, dim = 2, 12, 3, 8
    anchors = torch.tensor([[0, 5, 9], [2, 3, 11]])
    truth = torch.randint(0, k, (bsz, length), generator=gen).scatter(1, anchors, torch.arange(k).expand(bsz, -1))
    centres = torch.randn(bsz, k, dim, generator=gen) * 3
    z = centres.gather(1, truth[..., None].expand(-1, -1, dim)) + 0.05 * torch.randn(bsz, length, dim, generator=gen)
    step_owner = torch.roll(truth, 1, dims=1).scatter(1, anchors, torch.arange(k).expand(bsz, -1))  # other groups
    sizes = torch.stack([torch.bincount(o, minlength=k) for o in step_owner]).float()
    fixed = Unmerge(step_owner, sizes)
    assert fixed.for_mlp(z) is fixed  # without anchors the MLP runs on the step's groups
    groups = Unmerge(step_owner, sizes, anchors=anchors).for_mlp(z)
    assert torch.equal(groups.owner, truth)
    assert torch.equal(groups.sizes, torch.stack([torch.bincount(o, minlength=k) for o in truth]).float())
    torch.testing.assert_close(groups.merge(z), centres, atol=0.25, rtol=0)  # each group is its cluster
    alone = torch.zeros(bsz, k, dtype=torch.bool)
    alone[:, 1] = True
    lone = Unmerge(step_owner, sizes, anchors=anchors, alone=alone).for_mlp(z)
    assert torch.equal(lone.owner == 1, torch.zeros_like(truth, dtype=torch.bool).scatter(1, anchors[:, 1:2], True))
    assert torch.equal(lone.sizes.sum(1), torch.full((bsz,), float(length)))


@pytest.mark.parametrize("name,layers,size", CASES[1:])
def test_mlp_groups_by_block_regroup_the_mlps_alone(name, layers, size, tmp_path):
    """--option mlp_groups=block: each later block's MLP runs on its own groups, so the logits differ from the step's
    groups; with the MLPs silenced both are dense (the mixers read every position); the FLOPs counted for real are
    the estimate's (the regrouping is no Linear layer); a saved folder reloads to the same logits."""
    from ssmtrim.flops import count_flops
    from ssmtrim.pruning.schedule import FlopsModel

    torch.manual_seed(0)
    model, x = _model_and_input(name, size)
    step = _plan(model, layers, 0.5).replace(options=(("match", "auto"), ("mixer", "positions")))
    block = step.replace(options=(*step.options, ("mlp_groups", "block")))
    with torch.no_grad():
        dense = model(x)
        by_block = reduced_forward(model, x, block).logits
        by_step = reduced_forward(model, x, step).logits
        assert float((by_block - by_step).abs().max()) > 1e-5 * float(dense.abs().max())
    estimate = FlopsModel(model, "paper", block)
    apply_pruning(model, block)
    assert abs(count_flops(model, "paper", images=x).total / estimate.total
               - estimate.ratio(block.layers, 0.5)) < 0.02
    again = ssmtrim.load_model(ssmtrim.save_model(model, tmp_path / "reduced"))
    assert again.prune_config.option("mlp_groups") == "block"
    with torch.no_grad():
        torch.testing.assert_close(again(x), by_block, rtol=1e-5, atol=1e-5)
        _mlps_silenced(model)
        torch.testing.assert_close(model(x), dense_of(model)(x), rtol=1e-5, atol=1e-5)


def test_mlp_groups_need_mlps():
    vim = ssmtrim.create_model("vim_test")  # Vim's blocks are mixers alone
    with pytest.raises(ConfigError, match="per-token MLPs"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge",
                                       options={"mlp_groups": "block"}))


def test_a_share_regroups_around_the_largest_groups():
    """Unmerge.for_mlp with share < 1: the MLP runs on mlp_tokens(K, share) groups, formed around the tokens of the
    step's largest groups (each keeps its own position), and every position belongs to one of them."""
    from ssmtrim.models.tokens import mlp_tokens

    gen = torch.Generator().manual_seed(1)
    anchors = torch.tensor([[0, 3, 6, 9]])
    step_owner = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 3, 3, 3]])  # sizes 2, 4, 1, 3: the largest are tokens 1 and 3
    sizes = torch.bincount(step_owner[0], minlength=4).float()[None]
    z = torch.randn(1, 10, 6, generator=gen)
    assert mlp_tokens(4, 0.5) == 2 and mlp_tokens(4, 0.1) == 1 and mlp_tokens(4, 1.0) == 4
    groups = Unmerge(step_owner, sizes, anchors=anchors, share=0.5).for_mlp(z)
    assert groups.sizes.shape == (1, 2) and float(groups.sizes.sum()) == 10
    assert groups.owner[0, 3] == 0 and groups.owner[0, 9] == 1  # the largest groups' tokens, in sequence order
    alone = torch.tensor([[False, False, True, False]])  # a protected token is kept first, and alone
    lone = Unmerge(step_owner, sizes, anchors=anchors, alone=alone, share=0.5).for_mlp(z)
    assert lone.owner[0, 3] == 0 and lone.owner[0, 6] == 1 and int((lone.owner == 1).sum()) == 1


@pytest.mark.parametrize("name,layers,size", CASES[1:])
@pytest.mark.parametrize("mixer,share", [("tokens", 0.25), ("positions", 0.5)])
def test_the_flops_estimate_of_an_mlp_share_is_what_runs(name, layers, size, mixer, share):
    """--option mlp_share: the MLPs after a step run on that share of its tokens (mixers merged or whole), even after
    a step at keep 1 that removes none; the FLOPs estimate behind --flops is what fvcore counts on the reduced model,
    and less than without the share."""
    from ssmtrim.flops import count_flops
    from ssmtrim.pruning.schedule import FlopsModel

    model, x = _model_and_input(name, size)
    dense = count_flops(model, "paper", images=x).total
    plan = _plan(model, layers, 0.75).replace(options=(("mixer", mixer), ("mlp_share", share)))
    estimate = FlopsModel(model, "paper", plan)
    whole = FlopsModel(model, "paper", plan.replace(options=(("mixer", mixer),)))
    assert estimate.ratio(plan.layers, 0.75) < whole.ratio(plan.layers, 0.75)
    assert whole.ratio(plan.layers, 1.0) == 1.0  # without a share a step that removes nothing is no step
    assert estimate.ratio(plan.layers, 0.75) < estimate.ratio(plan.layers, 1.0) < 1.0
    for keep in (0.75, 1.0):
        reduced = apply_pruning(copy.deepcopy(model), plan.replace(keep=(keep,)))
        assert count_flops(reduced, "paper", images=x).total / dense == pytest.approx(
            estimate.ratio(plan.layers, keep), abs=1e-3)


@pytest.mark.parametrize("name,layers,size", CASES[1:])
def test_a_step_at_keep_1_runs_the_later_mlps_on_their_share_alone(name, layers, size, tmp_path, monkeypatch):
    """With an MLPs' share a step at keep 1 removes no token and still runs the later MLPs on that share: the mixers
    read every position (with the MLPs silenced the model is its dense self, as with mixer=positions), no score is
    computed, the blocks get only the un-merge (no reduced geometry), and a saved folder reloads to the same logits."""
    torch.manual_seed(0)
    model, x = _model_and_input(name, size)
    plan = _plan(model, layers, 1.0).replace(options=(("mixer", "tokens"), ("mlp_share", 0.3)))
    family, seen, scored = family_of(model), [], []
    score = type(get_score(plan.score))
    monkeypatch.setattr(score, "__call__", lambda self, output, generator=None: scored.append(1))
    with torch.no_grad():
        dense = model(x)
        geometry = family.geometry
        try:
            family.geometry = lambda *a: seen.append(geometry(*a)) or seen[-1]
            reduced = reduced_forward(model, x, plan)
        finally:
            del family.geometry
        assert reduced.stats.kept_fraction and set(reduced.stats.kept_fraction) == {1.0} and not scored
        assert seen and all(g.unmerge is not None and g.unmerge.identity and g.owners is None for g in seen)
        assert float((reduced.logits - dense).abs().max()) > 1e-4 * float(dense.abs().max())
        positions = plan.replace(options=(("mixer", "positions"), ("mlp_share", 0.3)))
        torch.testing.assert_close(reduced_forward(model, x, positions).logits, reduced.logits, rtol=0, atol=0)
        apply_pruning(model, plan)
        again = ssmtrim.load_model(ssmtrim.save_model(model, tmp_path / "reduced"))
        torch.testing.assert_close(again(x), reduced.logits, rtol=1e-5, atol=1e-5)
        _mlps_silenced(model)
        torch.testing.assert_close(model(x), dense_of(model)(x), rtol=1e-5, atol=1e-5)


def test_a_strategy_without_such_steps_skips_a_step_at_keep_1_in_the_engine_and_the_estimate():
    """The engine and the FLOPs estimate read Strategy.steps_without_removal alike: a strategy with an MLPs' share
    that does not run steps removing nothing is its dense self at keep 1, and its estimate there is dense."""
    from ssmtrim.pruning.schedule import FlopsModel
    from ssmtrim.pruning.strategies.base import register_strategy, unregister_strategy
    from ssmtrim.pruning.strategies.unmerge import Unmerge

    class NoEmptySteps(Unmerge):
        name = "unmerge_no_empty_steps"

        def steps_without_removal(self, plan) -> bool:
            return False

    register_strategy(NoEmptySteps())
    try:
        model, x = _model_and_input("vmamba_test", 32)
        plan = _plan(model, (2,), 1.0).replace(arrangement="unmerge_no_empty_steps",
                                               options=(("mixer", "tokens"), ("mlp_share", 0.3)))
        assert FlopsModel(model, "paper", plan).ratio(plan.layers, 1.0) == 1.0
        assert FlopsModel(model, "paper", plan.replace(arrangement="unmerge")).ratio(plan.layers, 1.0) < 1.0
        with torch.no_grad():
            torch.testing.assert_close(reduced_forward(model, x, plan).logits, model(x), rtol=1e-5, atol=1e-5)
    finally:
        unregister_strategy("unmerge_no_empty_steps")


def test_a_plan_that_removes_nothing_is_said_unless_its_steps_still_act(capsys):
    """Every keep 1 in count mode: one note that the model runs as dense, and what to give instead; not where a step
    at keep 1 still acts (an MLPs' share)."""
    from ssmtrim.notices import reset_notices

    model, _ = _model_and_input("vmamba_test", 32)
    reset_notices()
    apply_pruning(copy.deepcopy(model), _plan(model, (2,), 1.0))
    assert "no step removes a token" in capsys.readouterr().err
    reset_notices()
    apply_pruning(copy.deepcopy(model), _plan(model, (2,), 1.0).replace(options=(("mlp_share", 0.3),)))
    apply_pruning(copy.deepcopy(model), _plan(model, (2,), 0.9))
    assert "no step removes" not in capsys.readouterr().err


def test_an_identity_unmerge_passes_its_rows_through():
    x, update, scale = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(3)
    u = Unmerge(torch.arange(5).expand(2, -1), torch.ones(2, 5), identity=True)
    assert u.merge(x) is x and u.unmerge(x) is x
    torch.testing.assert_close(u.add_to(x, update, scale), x + scale * update, rtol=0, atol=0)
    general = Unmerge(torch.arange(5).expand(2, -1), torch.ones(2, 5))
    torch.testing.assert_close(general.merge(x), x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(general.add_to(x, update, scale), x + scale * update, rtol=1e-6, atol=1e-6)


def test_an_mlp_share_needs_mlps():
    vim = ssmtrim.create_model("vim_test")
    with pytest.raises(ConfigError, match="per-token MLPs"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="unmerge", options={"mlp_share": 0.5}))


def test_the_search_also_tries_the_plan_that_reaches_further(capsys):
    """search_schedule with the mixers-whole plan: the plan reaching_further offers (mixers merged, the MLPs on a tenth
    of the tokens) gives candidates too; the chosen one is the closest to dense of all, search.plan carries its
    options (said in a note when they are the other plan's), and an option the user set holds the search to the
    base plan."""
    from ssmtrim.pruning.schedule import search_schedule

    torch.manual_seed(0)
    model, x = _model_and_input("vmamba_test", 32)
    images = torch.cat([x, torch.randn(6, *x.shape[1:], generator=torch.Generator().manual_seed(5))])
    with torch.no_grad():
        dense = model(images)
    base = _plan(model, (2,), 1.0).replace(options=(("match", "auto"), ("mixer", "positions")))
    target = 0.9
    found = search_schedule(model, base, target, images, dense, "paper")
    kinds = {c.options is None for c in found.candidates}
    assert kinds == {True, False}
    further = [c for c in found.candidates if c.options is not None]
    assert all(c.options["mixer"] == "tokens" and c.options["mlp_share"] >= 0.1 for c in further)
    # where even keep 1 saves more than asked, the share is fitted to the target (fitted_plan): raised from a tenth
    assert any(c.keep == 1.0 and c.options["mlp_share"] > 0.1 for c in further)
    assert all(c.estimated_ratio <= target for c in found.candidates)
    seen: set = set()  # the first round: one candidate per plan and layers (a tightened keep comes after)
    first = [c for c in found.candidates
             if (key := (c.layers, str(c.options))) not in seen and not seen.add(key)]
    winner = min(first, key=lambda c: c.kl)
    assert (winner.layers, winner.options) == (found.chosen.layers, found.chosen.options)
    chosen_plan = found.plan(base)
    assert chosen_plan.layers == found.chosen.layers and chosen_plan.keep == (found.chosen.keep,)
    assert chosen_plan.option("mixer") == ("positions" if found.chosen.options is None else "tokens")
    held = search_schedule(model, base, target, images, dense, "paper", held={"mixer"})
    assert all(c.options is None for c in held.candidates)


@pytest.mark.parametrize("name,layers,size", CASES[1:])
def test_a_share_fitted_to_the_target_where_the_keep_cannot_fit_it(name, layers, size):
    """Where even keep 1 saves more than a target asks (a step that removes no token already runs the MLPs on their
    share), fitted_plan raises the MLPs' share to the largest that still meets it: the estimate then sits just under
    the target, fvcore counts what it says, and a share the user set, or a plan without a share, is left alone."""
    from ssmtrim.flops import count_flops
    from ssmtrim.pruning.schedule import FIT_SLACK, FlopsModel, fitted_plan

    model, x = _model_and_input(name, size)
    plan = _plan(model, layers, 1.0).replace(options=(("mixer", "tokens"), ("mlp_share", 0.1)))
    layers, flops, keep = plan.layers, FlopsModel(model, "paper"), 0.9
    least = flops.for_plan(plan).ratio(layers, keep)
    assert least < 0.95  # the step removes tokens: the MLPs after it run on a tenth
    target = least + 0.05
    fitted = fitted_plan(flops, plan, layers, keep, target)
    share = fitted.option("mlp_share")
    assert 0.1 < share < 1.0
    assert target - FIT_SLACK <= flops.for_plan(fitted).ratio(layers, keep) <= target
    assert flops.for_plan(fitted.replace(options={**dict(fitted.options), "mlp_share": share + 0.002})).ratio(
        layers, keep) > target  # the largest such share, to 1e-3
    assert fitted_plan(flops, plan, layers, keep, target, held={"mlp_share"}) is plan
    assert fitted_plan(flops, plan, layers, keep, least + 0.001) is plan  # close enough already
    whole = plan.replace(options=(("mixer", "positions"),))
    assert fitted_plan(flops, whole, layers, keep, target) is whole
    dense = count_flops(model, "paper", images=x).total
    apply_pruning(model, fitted.replace(keep=(keep,) * len(layers)))
    assert count_flops(model, "paper", images=x).total / dense == pytest.approx(
        flops.for_plan(fitted).ratio(layers, keep), abs=1e-3)
