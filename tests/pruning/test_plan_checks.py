"""Plans whose printed and saved form would differ from what runs are refused in one sentence: a keep ratio below
what a step can keep, ToMe below keep 0.5, --gap with a strategy that keeps no positions; and how the family's
options meet the ones given."""

from __future__ import annotations

import pytest

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning, is_pruned, remove_pruning


@pytest.fixture
def vim():
    return ssmtrim.create_model("vim_test")  # 16 patches + a class token


@pytest.mark.parametrize("keep", [1e-9, 0.05])
def test_a_keep_below_what_a_step_keeps_is_refused(vim, keep):
    with pytest.raises(ConfigError, match=r"would keep 0 of 16 tokens, but a step keeps at least 2; use a keep ratio "
                                          r"of at least 0\.125"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(keep,)))
    assert not is_pruned(vim)
    apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.125,)))  # the least that runs as asked


def test_tome_below_half_is_refused(vim):
    with pytest.raises(ConfigError, match="merges at most half the tokens of a step"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.4,), arrangement="tome"))
    apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement="tome"))


@pytest.mark.parametrize("arrangement", ["keep-order", "reorder"])
def test_gap_with_a_condensing_strategy_is_refused(vim, arrangement):
    with pytest.raises(ConfigError, match=f"--gap sets the decay over pruned positions, which --arrangement "
                                          f"{arrangement} does not keep"):
        apply_pruning(vim, PruneConfig(layers=(1,), keep=(0.5,), arrangement=arrangement, gap="zero"))


def test_the_python_api_meets_wrong_objects_with_one_sentence(vim):
    with pytest.raises(ConfigError, match="not a model object"):
        ssmtrim.load_model(vim)
    with pytest.raises(ConfigError, match="float16; ssmtrim reduces float32 models, so pass model.float"):
        ssmtrim.prune(vim.half(), PruneConfig(layers=(1,), keep=(0.5,)))


def test_a_dense_reference_of_another_model_is_refused_or_said(vim, capsys):
    from ssmtrim.evaluate import check_compatible
    from ssmtrim.notices import reset_notices

    pruned = apply_pruning(ssmtrim.create_model("vim_test"), PruneConfig(layers=(1,), keep=(0.5,)))
    other_family = ssmtrim.create_model("plainmamba_test", img_size=32)  # the same input size: the family differs
    with pytest.raises(ConfigError, match="is not the model that was reduced"):
        check_compatible(pruned, other_family)
    reset_notices()
    check_compatible(pruned, vim)  # the same architecture, other (random) weights: said
    assert "has other weights than the ones the reduced model was pruned from" in capsys.readouterr().err


def test_the_familys_option_fields_hold_for_its_own_arrangement_only():
    """Vim's Δ̃ = 0 (no decay across the positions merged into a neighbour) is its merge plan's: ``--arrangement
    align`` gets the method's Δ̃ (bias) unless --gap is given, and a strategy that keeps no positions is not refused
    for a gap it never read."""
    vim = ssmtrim.create_model("vim_test")
    assert PruneConfig.recommended(vim).gap == "zero"
    assert PruneConfig.recommended(vim, arrangement="merge").gap == "zero"
    assert PruneConfig.recommended(vim, arrangement="align").gap == PruneConfig.gap == "bias"
    assert PruneConfig.recommended(vim, arrangement="align", gap="zero").gap == "zero"
    plan = PruneConfig.recommended(vim, arrangement="keep-order", keep=(0.5,))
    apply_pruning(vim, plan)
    remove_pruning(vim)


def test_the_familys_options_meet_what_the_user_gives():
    """The recommended plan's options (Vim: merging into neighbours, the class token's neighbours kept, merged tokens
    rescaled; unmerge reads the first two only) stay under
    options the user gives, lapse for another strategy that does not read them (so ``--arrangement tome`` runs), and
    an option given for a strategy that does not read it is still refused."""
    vim = ssmtrim.create_model("vim_test")
    assert dict(PruneConfig.recommended(vim).options) == {"merge_into": "adjacent", "protect_around": 4,
                                                          "rescale": "norm"}
    given = PruneConfig.recommended(vim, options={"merge_into": "similar"})
    assert dict(given.options) == {"merge_into": "similar", "protect_around": 4, "rescale": "norm"}
    assert dict(PruneConfig.recommended(vim, arrangement="unmerge").options) == {"merge_into": "adjacent",
                                                                                  "protect_around": 4}
    for arrangement in ("tome", "align", "keep-order"):
        plan = PruneConfig.recommended(vim, arrangement=arrangement, keep=(0.5,))
        assert dict(plan.options) == {}
        apply_pruning(vim, plan)
        remove_pruning(vim)
    with pytest.raises(ConfigError, match="--protect-around is an option of merge, unmerge"):
        apply_pruning(vim, PruneConfig.recommended(vim, arrangement="tome", options={"protect_around": 2}))
    # Mamba®'s registers are spread through the sequence: no protection of their neighbours by default
    assert dict(PruneConfig.recommended(ssmtrim.create_model("mambar_test")).options) == {"merge_into": "adjacent",
                                                                                          "rescale": "norm"}
