"""``ssmtrim convert SRC --img-size N -o OUT``: a folder for another input size, and a bad size as one line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ssmtrim.checkpoint import load_model
from ssmtrim.cli.app import app


def test_convert_at_another_size_writes_a_folder_that_reloads(write_official, tmp_path, monkeypatch):
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    _, path = write_official("vim_test")
    out = tmp_path / "vim_64"
    result = CliRunner().invoke(app, ["convert", str(path), "--img-size", "64", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["arch"]["img_size"] == 64
    model = load_model(out)
    assert model.config.img_size == 64 and model.data_config.input_size == (3, 64, 64)


def test_convert_refuses_a_size_the_patches_do_not_tile(write_official, tmp_path, monkeypatch):
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    _, path = write_official("vim_test")
    out = tmp_path / "bad"
    result = CliRunner().invoke(app, ["convert", str(path), "--img-size", "30", "-o", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not tile into 8-pixel patches" in lines[0], result.output
    assert not out.exists()
