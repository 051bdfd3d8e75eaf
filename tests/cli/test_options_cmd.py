"""``ssmtrim options`` and ``ssmtrim.describe_options``: every option a registered strategy or score reads, how it is
given, its default and allowed values, and who reads it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.pruning.config import declared_options
from ssmtrim.pruning.options import Option
from ssmtrim.pruning.strategies import Strategy, register_strategy, unregister_strategy


def test_every_declared_option_is_listed_with_its_readers():
    rows = {row["name"]: row for row in ssmtrim.describe_options()}
    assert set(rows) == set(declared_options())
    share = rows["reach_share"]
    assert share["given_as"] == "--option reach_share=VALUE" and share["default"] == 0.1
    assert (share["low"], share["high"], share["choices"]) == (0.01, 1.0, None)
    assert share["read_by"] == {"strategies": ["unmerge"], "scores": []}
    gap = rows["gap"]  # one of the plan's own fields: given by its flag
    assert gap["given_as"] == "--gap" and gap["choices"] == ["bias", "mean", "zero"]
    assert {"merge", "unmerge"} <= set(gap["read_by"]["strategies"])


def test_the_command_prints_them_and_a_plug_in_s_too():
    class Toy(Strategy):
        name = "toy-listed"
        options = (Option("toy_listed", 2, "a plug-in's own option", low=0),)

    register_strategy(Toy())
    try:
        out = CliRunner().invoke(app, ["options", "--json"])
        assert out.exit_code == 0, out.output
        rows = {row["name"]: row for row in json.loads(out.stdout)}
        assert rows["toy_listed"]["read_by"]["strategies"] == ["toy-listed"]
        text = CliRunner().invoke(app, ["options"], env={"COLUMNS": "200"})
        assert text.exit_code == 0, text.output
        assert "--option mlp_share=V  default 1.0, in [0.01, 1]; read by unmerge" in text.output
        assert "--option toy_listed=V  default 2, in [0, inf]; read by toy-listed" in text.output
        assert "--gap V  default bias, one of bias, mean, zero" in text.output
    finally:
        unregister_strategy("toy-listed")
    assert "toy_listed" not in {row["name"] for row in ssmtrim.describe_options()}
