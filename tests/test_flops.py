"""FLOP counting: the peers' published numbers, the full count, token pruning, the CLI."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import types

import pytest
import torch
import typer
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.flops_cmd import flops
from ssmtrim.errors import ConfigError
from ssmtrim.flops import TOP_LEVEL, FlopReport, count_flops, count_flops_all

# published GFLOPs (peer convention) of the released models
PAPER_GFLOPS = {
    "vim_tiny": 1.449, "vim_small": 5.077, "vim_base": 18.87,
    "plainmamba_l1": 3.0, "plainmamba_l2": 8.1, "plainmamba_l3": 14.4,
}  # fmt: skip
FAST = ("vim_tiny", "vim_small", "plainmamba_l1")
SLOW = ("vim_base", "plainmamba_l2", "plainmamba_l3")
ALL = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]


@functools.cache
def reports(name: str) -> dict[str, FlopReport]:
    """Both conventions of a registered architecture (random weights), traced once per session."""
    return count_flops_all(name)


def drop_tokens(model: torch.nn.Module, keep: dict[int, int]) -> torch.nn.Module:
    """Patch a Vim in place so that block i (0-based) and the following ones see only the first ``keep[i]`` tokens:
    a stand-in for token pruning. The class token (index 98) stays where the head reads it when keep > 98."""

    def forward_features(self, x):
        hidden, residual = self.embed(x), None
        for i, block in enumerate(self.layers):
            if i in keep:
                hidden, residual = hidden[:, : keep[i]], residual[:, : keep[i]]
            hidden, residual, _ = block(hidden, residual)
        return self.norm_f((residual + hidden.float()).to(self.norm_f.weight.dtype))

    model.forward_features = types.MethodType(forward_features, model)
    return model


def _close(got: float, want: float, rel: float = 0.01) -> bool:
    return abs(got - want) <= rel * want


@pytest.mark.parametrize("name", ALL)
def test_paper_convention_reproduces_published_numbers(name):
    got = reports(name)["paper"].gflops
    print(f"{name}: paper {got:.4f} G, published {PAPER_GFLOPS[name]} G ({got / PAPER_GFLOPS[name] - 1:+.2%})")
    assert _close(got, PAPER_GFLOPS[name])


@pytest.mark.parametrize("name", ALL)
def test_every_op_is_counted_or_declared_free(name):
    for report in reports(name).values():
        assert report.unsupported == {}


@pytest.mark.parametrize("name", ALL)
def test_by_module_sums_to_total(name):
    for report in reports(name).values():
        assert sum(report.by_module.values()) == report.total
        assert sum(report.by_operator.values()) == pytest.approx(report.total, abs=len(report.by_operator))
        assert report.by_module["patch_embed"] > 0 and report.by_module["head"] > 0
        depth = ssmtrim.get_spec(name).arch.depth
        assert all(report.by_module[f"layers.{i}"] > 0 for i in range(depth))


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small", pytest.param("vim_base", marks=pytest.mark.slow)])
def test_full_counts_the_second_vim_direction(name):
    paper, full = reports(name)["paper"], reports(name)["full"]
    print(f"{name}: full {full.gflops:.4f} G / paper {paper.gflops:.4f} G = {full.total / paper.total:.3f}")
    # the backward branch (conv, x_proj, dt_proj, scan) alone is ~20 % of the paper count
    assert full.total > 1.1 * paper.total


def test_full_at_least_paper_for_plainmamba():
    paper, full = reports("plainmamba_l1")["paper"], reports("plainmamba_l1")["full"]
    print(f"plainmamba_l1: full {full.gflops:.4f} G / paper {paper.gflops:.4f} G = {full.total / paper.total:.3f}")
    assert full.total > paper.total


def test_paper_terms_agree_with_the_traced_ops():
    """The paper formula (from traced token counts) against fvcore's own counts of the same layers."""
    cfg = ssmtrim.get_spec("vim_tiny").arch
    paper, full = reports("vim_tiny")["paper"].by_operator, reports("vim_tiny")["full"].by_operator
    head = cfg.embed_dim * cfg.num_classes
    # the trace holds both directions; the paper counts one (in_proj and out_proj are shared)
    assert full["linear"] == paper["in_proj"] + paper["out_proj"] + 2 * paper["x_proj"] + head
    assert full["matmul"] == 2 * paper["dt_proj"]
    assert full["conv"] == 2 * paper["conv"] + paper["conv+linear outside mixers"] - head
    assert full["selective_scan"] == 2 * paper["scan"]
    cfg = ssmtrim.get_spec("plainmamba_l1").arch
    paper, full = reports("plainmamba_l1")["paper"].by_operator, reports("plainmamba_l1")["full"].by_operator
    head = cfg.embed_dim * cfg.num_classes
    assert full["selective_scan"] == paper["scan"]  # all four scans in both
    assert full["linear"] == sum(paper[k] for k in ("in_proj", "x_proj", "dt_proj", "out_proj")) + head
    assert full["conv"] == paper["conv"] + paper["conv+linear outside mixers"] - head


def test_tokens_per_layer():
    assert reports("vim_tiny")["paper"].tokens_per_layer == [197] * 24
    assert reports("plainmamba_l1")["full"].tokens_per_layer == [196] * 24


@pytest.mark.parametrize(
    "name, keep, want",
    [
        ("vim_small", {5: 157, 10: 125, 15: 101}, 3.565),  # pruning after blocks 5, 10, 15 at 0.8
        ("vim_tiny", {10: 157}, 1.281),  # pruning once after block 10 at 0.8
    ],
)
def test_paper_convention_follows_pruned_token_counts(name, keep, want):
    model = drop_tokens(ssmtrim.create_model(name).eval(), keep)
    got = count_flops_all(model)
    tokens, n = [], 197
    for i in range(24):
        n = keep.get(i, n)
        tokens.append(n)
    assert got["paper"].tokens_per_layer == tokens
    print(f"{name} pruned {keep}: paper {got['paper'].gflops:.4f} G (want {want}), full {got['full'].gflops:.4f} G")
    assert _close(got["paper"].gflops, want)
    assert got["full"].unsupported == {}
    assert got["full"].total < reports(name)["full"].total


@pytest.mark.parametrize("name", ["vim_test", "plainmamba_test"])
def test_per_image_counts_do_not_depend_on_the_batch(name):
    one, two = count_flops_all(name), count_flops_all(name, batch_size=2)
    assert two["paper"].total == one["paper"].total
    # parameter-only ops (A = -exp(A_log)) run once per forward, so per image they shrink a little with the batch
    assert two["full"].total == pytest.approx(one["full"].total, rel=0.02)
    images = torch.randn(3, *one["full"].input_size)
    assert count_flops(name, "paper", images=images).batch_size == 3


def test_model_is_left_as_it_was():
    model = ssmtrim.create_model("vim_test").train()
    count_flops(model)
    assert all(m.training for m in model.modules())
    assert not any("ssm_output" in vars(m) or "branch" in vars(m) for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_no_warnings_or_log_noise(recwarn, caplog):
    count_flops("plainmamba_test")
    assert [str(w.message) for w in recwarn] == []
    assert [r.getMessage() for r in caplog.records if r.levelname in ("WARNING", "ERROR")] == []


def test_fvcore_is_imported_lazily():
    code = "import sys, ssmtrim, ssmtrim.flops; assert 'fvcore' not in sys.modules, 'fvcore imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_arguments_raise_typed_errors():
    with pytest.raises(ConfigError, match="unknown FLOPs convention 'hooks'"):
        count_flops("vim_test", "hooks")
    with pytest.raises(ConfigError, match="batch_size"):
        count_flops("vim_test", batch_size=0)
    with pytest.raises(ConfigError, match="paper convention"):
        count_flops(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), "paper", images=torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------------------------
# CLI (registered into the real app by ssmtrim/cli/app.py; a local app here keeps the test self-contained)


@pytest.fixture
def app() -> typer.Typer:
    local = typer.Typer()
    local.command("flops")(flops)

    @local.callback()
    def _root() -> None:  # a callback keeps `flops` a sub-command, as in the real app
        pass

    return local


def test_cli_json(app):
    result = CliRunner().invoke(app, ["flops", "vim_test", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    want = count_flops_all("vim_test")
    assert set(out["conventions"]) == {"paper", "full"}
    for name, report in want.items():
        got = out["conventions"][name]
        assert got["total"] == report.total
        assert got["gflops"] == pytest.approx(report.gflops)
        assert got["by_module"] == report.by_module
        assert got["unsupported"] == {}
        assert got["tokens_per_layer"] == [17] * 4


def test_cli_table_and_single_convention(app):
    result = CliRunner().invoke(app, ["flops", "plainmamba_test", "--convention", "paper", "--by-module"])
    assert result.exit_code == 0, result.output
    assert "paper GFLOPs" in result.stdout and "full GFLOPs" not in result.stdout
    assert "layers.1" in result.stdout and TOP_LEVEL in result.stdout
    result = CliRunner().invoke(app, ["flops", "vim_test"])
    assert result.exit_code == 0, result.output
    assert "full / paper" in result.stdout


def test_cli_unknown_model_is_one_line(app):
    result = CliRunner().invoke(app, ["flops", "vim_enormous"])
    assert result.exit_code == 1
    assert "unknown model 'vim_enormous'" in result.stderr
    assert "Traceback" not in result.output
