"""Bad or odd inputs beyond the first list (see benchmarks/bad_inputs.py for the whole tally): fvcore missing, notes
instead of raw log lines and warnings, the device checked by the library functions, Ctrl-C in one line, options
named in their errors, calibration images and plans checked, a pruned model refused as the dense reference, and a
run folder that cannot be fully deleted."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError, DeviceError, MissingDependencyError
from ssmtrim.notices import reset_notices
from ssmtrim.pruning import PruneConfig
from tests.cli.workspace import build_workspace


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    for name in ("SSMTRIM_DEBUG", "SSMTRIM_SCAN_BACKEND", "SSMTRIM_QUIET_NOTICES"):
        monkeypatch.delenv(name, raising=False)
    reset_notices()
    return CliRunner()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense model (file and folder), its pruned folder, and 2 class folders of 4 images."""
    return build_workspace(tmp_path_factory.mktemp("heldout"))


def prune_args(ws: dict[str, Path], out: Path, *more: str) -> list[str]:
    return ["prune", str(ws["dense_file"]), "--data", str(ws["images"]), "--layers", "1", "--num-images", "8",
            "--batch-size", "4", "--compensate", "none", "--quiet", "-o", str(out), *more]


def finetune_args(ws: dict[str, Path], out: Path, *more: str) -> list[str]:
    return ["finetune", str(ws["pruned"]), "--data", str(ws["images"]), "--epochs", "1", "--batch-size", "4",
            "--quiet", "-o", str(out), *more]


def one_line_error(result, *patterns: str, code: int = 1) -> str:
    """The command failed with one line on stderr (notes aside), no traceback, matching every pattern."""
    assert result.exit_code == code, result.output
    lines = [v for v in result.stderr.strip().splitlines() if v and not v.startswith("ssmtrim: note:")]
    assert len(lines) == 1 and lines[0].startswith("ssmtrim: "), result.stderr
    assert "unexpected" not in lines[0] and "Traceback" not in result.output
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


def only_notes(result) -> list[str]:
    """The command worked and wrote nothing to stderr but ``ssmtrim: note:`` lines; returns them."""
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert all(v.startswith("ssmtrim: note:") for v in lines), result.stderr
    return lines


@contextlib.contextmanager
def no_calibration():
    import ssmtrim.pruning.calibrate as calibrate_module

    real = calibrate_module.calibrate

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration started before the input was checked")

    calibrate_module.calibrate = calibrate
    try:
        yield
    finally:
        calibrate_module.calibrate = real


@pytest.fixture
def no_fvcore(monkeypatch):
    for name in [k for k in sys.modules if k == "fvcore" or k.startswith("fvcore.")] + ["fvcore", "fvcore.nn"]:
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------------------------------------------
# fvcore missing


def test_prune_without_fvcore_says_what_to_do_before_calibrating(runner, ws, tmp_path, no_fvcore):
    with no_calibration():
        one_line_error(runner.invoke(app, prune_args(ws, tmp_path / "o")), "pip install fvcore", "--no-flops")
        line = one_line_error(runner.invoke(app, [*prune_args(ws, tmp_path / "o")[:4], "--flops", "0.8",
                                                  *prune_args(ws, tmp_path / "o")[6:]]), "pip install fvcore")
    assert "--no-flops" not in line  # a FLOPs target cannot do without the count
    assert not (tmp_path / "o").exists()


def test_prune_no_flops_runs_without_fvcore(runner, ws, tmp_path, no_fvcore):
    result = runner.invoke(app, [*prune_args(ws, tmp_path / "o", "--no-flops"), "--json"])
    only_notes(result)
    assert (tmp_path / "o" / "model.safetensors").is_file() and '"flops"' not in result.stdout


def test_info_without_fvcore_leaves_the_gflops_out_aloud(runner, ws, no_fvcore):
    notes = only_notes(runner.invoke(app, ["info", str(ws["dense"])]))
    assert any("fvcore is not installed" in v for v in notes), notes
    with pytest.raises(MissingDependencyError, match="pip install fvcore"):
        ssmtrim.count_flops(ssmtrim.create_model("vim_test", depth=2, num_classes=2))


# ---------------------------------------------------------------------------------------------------------------
# notes, not raw log lines or warnings


def test_compensation_with_few_images_is_a_note(runner, ws, tmp_path):
    result = runner.invoke(app, prune_args(ws, tmp_path / "o", "--compensate", "head"))
    notes = only_notes(result)
    assert any("--compensate head" in v and "α raised" in v for v in notes), notes


def test_compensation_with_one_image_is_refused_before_calibrating(runner, ws, tmp_path):
    with no_calibration():
        one_line_error(runner.invoke(app, prune_args(ws, tmp_path / "o", "--compensate", "head", "--num-images", "1")),
                       "--compensate head needs at least 2")


def test_a_huge_image_is_read_with_a_note_not_a_pillow_warning(tmp_path, monkeypatch, capsys, recwarn):
    from ssmtrim.data import load_rgb

    reset_notices()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is past it, below twice it (Pillow's refusal)
    Image.new("L", (40, 40)).save(tmp_path / "big.png")
    assert load_rgb(str(tmp_path / "big.png")).size == (40, 40)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert "very large image (40x40 pixels)" in capsys.readouterr().err


def test_images_without_labels_say_top1_is_not_measured(runner, ws, tmp_path):
    for i, p in enumerate(sorted((ws["images"] / "a").iterdir())):
        (tmp_path / f"{i}.png").write_bytes(p.read_bytes())
    notes = only_notes(runner.invoke(app, ["eval", str(ws["dense"]), "--data", str(tmp_path), "--workers", "0",
                                           "--quiet"]))
    assert any("top-1 and top-5 are not measured" in v for v in notes), notes


# ---------------------------------------------------------------------------------------------------------------
# the library functions check the device themselves


def test_library_functions_check_the_device_first(ws, tmp_path):
    from ssmtrim.evaluate import evaluate
    from ssmtrim.report import build_report

    model = ssmtrim.load_model(ws["dense"])
    with pytest.raises(DeviceError, match="'gpu0'"):
        ssmtrim.describe_model(model, device="gpu0")
    with pytest.raises(DeviceError, match="'gpu0'"):  # before the (missing) folder is looked at
        evaluate(model, tmp_path / "missing", device="gpu0")
    with pytest.raises(DeviceError, match="'gpu0'"):
        build_report(model, tmp_path / "missing", [], sweep="keep=0.5", device="gpu0")


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_is_one_line_with_exit_130_and_leaves_nothing(runner, ws, tmp_path, monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "c"
    one_line_error(runner.invoke(app, ["convert", str(ws["dense"]), "-o", str(out)]), "interrupted", code=130)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder


# ---------------------------------------------------------------------------------------------------------------
# options named in their errors, values checked


@pytest.mark.parametrize("flag, value", [
    ("--warmup-epochs", "nan"), ("--lr", "inf"), ("--epochs", "0"), ("--label-smoothing", "1.5"),
    ("--clip-grad", "-1"), ("--checkpoint-every", "-2"), ("--distill-temperature", "0"), ("--weight-decay", "nan"),
])
def test_training_options_are_named_and_checked(runner, ws, tmp_path, flag, value):
    one_line_error(runner.invoke(app, finetune_args(ws, tmp_path / "run", flag, value)), re.escape(flag))
    assert not (tmp_path / "run").exists()


def test_scan_backend_and_img_size_are_named(runner, ws):
    one_line_error(runner.invoke(app, ["info", str(ws["dense"]), "--backend", "bogus"]), "--backend 'bogus'")
    one_line_error(runner.invoke(app, ["info", str(ws["dense"]), "--img-size", "33"]), "--img-size 33 does not tile")
    one_line_error(runner.invoke(app, ["info", "  "]), "the model is empty")


def test_a_bad_sweep_is_said_before_the_images_are_read(runner, ws, tmp_path):
    one_line_error(runner.invoke(app, ["report", str(ws["dense"]), "--data", str(ws["images"]), "-o",
                                       str(tmp_path / "r"), "--sweep", "abc", "--no-speed"]), "--sweep")


def test_finetune_eval_data_is_checked_and_named_first(runner, ws, tmp_path, monkeypatch):
    import ssmtrim.training.recipes as recipes

    monkeypatch.setattr(recipes, "load_folder", lambda *a, **k: pytest.fail("training images decoded first"))
    one_line_error(runner.invoke(app, finetune_args(ws, tmp_path / "run", "--eval-data", str(tmp_path / "none"))),
                   "--eval-data")


def test_a_pruned_reference_is_refused_naming_its_option(runner, ws, tmp_path):
    one_line_error(runner.invoke(app, ["eval", str(ws["pruned"]), "--dense", str(ws["pruned"]), "--data",
                                       str(ws["images"]), "--workers", "0"]), r"\(--dense\) is pruned")
    one_line_error(runner.invoke(app, finetune_args(ws, tmp_path / "run", "--teacher", str(ws["pruned"]))),
                   r"\(--teacher\) is pruned")


# ---------------------------------------------------------------------------------------------------------------
# the Python API refuses what it would otherwise round, crash on or compute silently


@pytest.mark.parametrize("fields, match", [
    ({"layers": (1.5,), "keep": (0.5,)}, "whole block numbers, got 1.5"),
    ({"layers": (True,), "keep": (0.5,)}, "whole block numbers, got True"),
    ({"layers": 1, "keep": (0.5,)}, "sequence"),
    ({"layers": (1,), "keep": ("0.5",)}, "numbers in"),
])
def test_prune_config_never_rounds_a_plan(fields, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**fields)


@pytest.mark.parametrize("images, batch_size, match", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 2, "torch.uint8"),
    (torch.zeros(0, 3, 32, 32), 2, "non-empty"),
    (torch.zeros(2, 1, 32, 32), 2, r"\(2, 1, 32, 32\)"),
    (torch.full((2, 3, 32, 32), math.nan), 2, "NaN"),
    ([torch.zeros(2, 3, 32, 32)], 2, "list"),
    (torch.zeros(2, 3, 32, 32), 0, "--batch-size"),
])
def test_calibration_images_are_checked(images, batch_size, match):
    model = ssmtrim.create_model("vim_test", depth=2, num_classes=2)
    with pytest.raises(ConfigError, match=match):
        ssmtrim.calibrate(model, PruneConfig(layers=(1,), keep=(0.5,)), images, batch_size=batch_size)


def test_save_and_create_refuse_what_they_cannot_handle(tmp_path):
    with pytest.raises(ConfigError, match="Linear"):
        ssmtrim.save_model(torch.nn.Linear(2, 2), tmp_path / "lin")
    with pytest.raises(ConfigError, match="no field 'bogus'"):
        ssmtrim.create_model("vim_test", bogus=1)
    assert not (tmp_path / "lin").exists()


# ---------------------------------------------------------------------------------------------------------------
# --force over a run folder holding a file that cannot be deleted


def test_a_run_that_cannot_be_fully_deleted_is_moved_aside_and_said(ws, tmp_path, monkeypatch, capsys):
    import shutil

    from ssmtrim.outputs import clear_own_output

    reset_notices()
    run = tmp_path / "run"
    shutil.copytree(ws["pruned"], run)  # ssmtrim's own folder
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    clear_own_output(run)
    assert not run.exists()  # the name is free for the new run at once
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".run.old-")]
    assert len(left) == 1 and (left[0] / "run" / "config.json").exists()
    assert "delete them by hand" in capsys.readouterr().err


def test_evaluation_and_flops_arguments_are_checked(ws):
    from ssmtrim.evaluate import evaluate, evaluate_tensors

    model = ssmtrim.load_model(ws["dense"])
    for kwargs, match in (({"batch_size": 0}, "--batch-size"), ({"num_images": -1}, "--num-images"),
                          ({"workers": -1}, "--workers")):
        with pytest.raises(ConfigError, match=match):
            evaluate(model, ws["images"], **kwargs)
    x = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ConfigError, match="one label per image"):
        evaluate_tensors(model, x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="0 to 1"):
        evaluate_tensors(model, x, torch.full((4,), 7))
    with pytest.raises(ConfigError, match="--batch-size"):
        ssmtrim.prune(ssmtrim.create_model("vim_test", depth=2, num_classes=2), PruneConfig(layers=(1,), keep=(0.5,)),
                      ws["images"], batch_size=0)
    with pytest.raises(ConfigError, match=r"\(B 3 H W\)"):
        ssmtrim.count_flops(model, images=torch.zeros(1, 1, 32, 32))


def test_a_replaced_output_that_cannot_be_fully_deleted_is_said(runner, ws, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ws["pruned"], out)  # ssmtrim's own folder, replaced with --force
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "model.safetensors":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    notes = only_notes(runner.invoke(app, ["convert", str(ws["dense"]), "-o", str(out), "--force"]))
    assert any("delete them by hand" in v for v in notes), notes
    assert (out / "model.safetensors").is_file() and "pruning" not in (out / "config.json").read_text()


def test_sigterm_stops_like_ctrl_c_with_exit_143_and_leaves_nothing(ws, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM through the real entry point: one line, exit 143, no output and no temporary folder."""
    import os
    import signal
    import sys

    import safetensors.torch

    from ssmtrim.cli.app import main

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode, inside the write

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "c"
    monkeypatch.setattr(sys, "argv", ["ssmtrim", "convert", str(ws["dense"]), "-o", str(out)])
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssmtrim: stopped by SIGTERM"), err
    assert list(tmp_path.iterdir()) == []
