"""The ``ssmtrim`` command line through Typer's CliRunner (and a subprocess where the process itself matters)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.checkpoint import load_model
from ssmtrim.cli.app import app

REPO = Path(ssmtrim.__file__).resolve().parent.parent
OFFICIAL = {
    "vim_tiny": "hustvl/Vim-tiny-midclstok:vim_t_midclstok_76p1acc.pth",
    "vim_small": "hustvl/Vim-small-midclstok:vim_s_midclstok_80p5acc.pth",
    "vim_base": "hustvl/Vim-base-midclstok:vim_b_midclstok_81p9acc.pth",
    "plainmamba_l1": "ChenhongyiYang/PlainMamba:l1.pth",
    "plainmamba_l2": "ChenhongyiYang/PlainMamba:l2.pth",
    "plainmamba_l3": "ChenhongyiYang/PlainMamba:l3.pth",
}


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    monkeypatch.delenv("SSMTRIM_SCAN_BACKEND", raising=False)
    return CliRunner()


def ok(runner: CliRunner, *args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def run_json(runner: CliRunner, *args: str):
    return json.loads(ok(runner, *args, "--json").stdout)


def python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


# ---------------------------------------------------------------------------------------------------------------
# models, info, convert


def test_models_json(runner):
    listed = {m["name"]: m for m in run_json(runner, "models")}
    assert set(OFFICIAL) <= set(listed)
    assert not {"vim_test", "plainmamba_test"} & set(listed)  # test models only with --all
    for name, hub_file in OFFICIAL.items():
        first = listed[name]["pretrained"][0]
        assert f"{first['hub_id']}:{first['filename']}" == hub_file
        assert listed[name]["family"] == name.split("_")[0]
    assert listed["vim_tiny"]["arch"]["embed_dim"] == 192 and listed["plainmamba_l3"]["arch"]["depth"] == 36
    everything = {m["name"] for m in run_json(runner, "models", "--all")}
    assert {"vim_test", "plainmamba_test"} <= everything


def test_models_table(runner):
    out = ok(runner, "models").stdout
    for name in OFFICIAL:
        assert name in out
    assert "hustvl/Vim-tiny-midclstok" in out


@pytest.mark.parametrize(("name", "parameters"), [("vim_tiny", 7_148_008), ("vim_small", 25_796_584)])
def test_info_registered_name_json(runner, name, parameters):
    info = run_json(runner, "info", name)
    assert info["name"] == name and info["family"] == "vim"
    assert info["parameters"] == parameters
    assert info["tokens"] == 197
    assert info["input_size"] == [3, 224, 224]
    assert info["preprocessing"] == {"resize_short_side": 256, "center_crop": 224, "interpolation": "bicubic",
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert info["backend"] in ("ref", "cpu", "cuda")
    assert set(info["backends"]) >= {"requested", "cpu tensors", "mamba-ssm"}
    assert info["weights"] == "not loaded (architecture only)"
    assert f"{info['pretrained'][0]['hub_id']}:{info['pretrained'][0]['filename']}" == OFFICIAL[name]


def test_info_backend_option(runner):
    from ssmtrim.ops.backend import requested_backend

    assert run_json(runner, "info", "vim_test", "--backend", "ref")["backend"] == "ref"
    assert requested_backend() == "auto"  # the option lasts for the command only, not for the process
    bad = runner.invoke(app, ["info", "vim_test", "--backend", "gpu"])
    assert bad.exit_code == 1 and "choose one of auto, ref, cpu, cuda" in bad.stderr


def test_info_table(runner):
    out = ok(runner, "info", "plainmamba_l1").stdout
    assert "7,551,656" in out and "plainmamba" in out and "196" in out


def test_info_convert_info(runner, write_official, tmp_path):
    model, path = write_official("plainmamba_test")
    info = run_json(runner, "info", str(path))
    assert info["name"] == "plainmamba_test" and info["family"] == "plainmamba"
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) and info["tokens"] == 4 * 4
    assert info["weights"] == f"file: {path}"
    assert info["arch"] == json.loads(json.dumps(model.config.to_dict()))

    out = tmp_path / "converted"
    converted = run_json(runner, "convert", str(path), "-o", str(out))
    assert converted == {"output": str(out), "family": "plainmamba", "arch": info["arch"]}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    again = run_json(runner, "info", str(out))
    assert {k: v for k, v in again.items() if k != "weights"} == {k: v for k, v in info.items() if k != "weights"}
    assert again["weights"] == f"folder: {out}"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), model(x), rtol=0, atol=1e-6)

    refused = runner.invoke(app, ["convert", str(path), "-o", str(out)])
    assert refused.exit_code == 1 and "already exists; pass --force" in refused.stderr
    ok(runner, "convert", str(path), "-o", str(out), "--force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "plainmamba_test.pth"]


def test_convert_with_arch_and_table_output(runner, write_official, tmp_path):
    _, path = write_official("vim_test")
    result = ok(runner, "convert", str(path), "-o", str(tmp_path / "out"), "--arch", "vim_test")
    assert re.search(r"wrote .*out \(vim, [\d,]+ parameters\)", result.stdout.replace("\n", ""))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["family"] == "vim" and config["source"]["spec"] == "vim_test"


def test_info_from_hub_cache(runner, hub_cache, write_official):
    _, path = write_official("vim_test", "t.pth")
    commit = hub_cache.add("someone/vim-test", "t.pth", path)
    info = run_json(runner, "info", "someone/vim-test:t.pth", "--revision", commit)
    assert info["name"] == "vim_test" and info["weights"].startswith("hub: ")
    assert f"/snapshots/{commit}/t.pth" in info["weights"]
    missing = runner.invoke(app, ["info", "someone/vim-test:t.pth", "--revision", "f" * 40])
    assert missing.exit_code == 1 and "not in the Hugging Face cache" in missing.stderr


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 1, no traceback


def assert_one_line_error(result, match: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # handled, not a crash
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ssmtrim: ") and re.search(match, lines[0]), lines[0]


def test_bad_source_convert(runner, bad_source, tmp_path):
    out = tmp_path / "out"
    args = ["convert", bad_source.source, "-o", str(out)] + (["--arch", bad_source.arch] if bad_source.arch else [])
    assert_one_line_error(runner.invoke(app, args), bad_source.match)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders
    if bad_source.marker is not None:
        assert not bad_source.marker.exists()


def test_bad_source_info(runner, bad_source):
    if bad_source.arch is not None:
        pytest.skip("info has no --arch")
    assert_one_line_error(runner.invoke(app, ["info", bad_source.source]), bad_source.match)


def test_unknown_arch_name(runner, write_official, tmp_path):
    _, path = write_official("vim_test")
    result = runner.invoke(app, ["convert", str(path), "-o", str(tmp_path / "o"), "--arch", "vim_huge"])
    assert_one_line_error(result, "unknown model 'vim_huge'; run `ssmtrim models`")


def test_debug_variable_shows_the_traceback(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"model": ssmtrim.create_model("vim_test").state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    quiet = python("-m", "ssmtrim", "info", str(path), env={"SSMTRIM_DEBUG": "0"})
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr.strip().splitlines() == [
        f"ssmtrim: {path} is not a PyTorch checkpoint (or it is truncated); download it again."]
    loud = python("-m", "ssmtrim", "info", str(path), env={"SSMTRIM_DEBUG": "1"})
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert "ssmtrim.errors.CheckpointError" in loud.stderr


# ---------------------------------------------------------------------------------------------------------------
# the process: version, light import


def test_version_subprocess():
    result = python("-m", "ssmtrim", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ssmtrim {ssmtrim.__version__}"


def test_import_is_light():
    code = ("import sys, ssmtrim; heavy = ('mamba_ssm', 'huggingface_hub', 'fvcore'); "
            "print([m for m in sys.modules if m.split('.')[0] in heavy])")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_local_load_and_cli_stay_off_the_hub_and_cuda(tmp_path):
    """Loading a local file and running a command import neither huggingface_hub nor mamba_ssm."""
    path = tmp_path / "t.pth"
    torch.save(ssmtrim.create_model("vim_test").state_dict(), path)
    code = ("import sys, ssmtrim, torch; from ssmtrim.cli.app import app; "
            f"m = ssmtrim.load_model({str(path)!r}); m(torch.zeros(1, 3, 32, 32)); "
            "print([m for m in sys.modules if m.split('.')[0] in ('mamba_ssm', 'huggingface_hub', 'fvcore')])")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
