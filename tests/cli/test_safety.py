"""Nothing lost, environment errors in one sentence, checked early: ``-o``/``--force``/``--resume`` and ``--device``
where the user meets them, on tiny models."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError
from tests.cli.workspace import build_workspace

REPO = Path(ssmtrim.__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(autouse=True)
def _plain_env(monkeypatch):
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A dense checkpoint file and an ssmtrim folder of it (vim_test, 2 classes), a pruned folder, and 2 x 4 images."""
    return build_workspace(tmp_path_factory.mktemp("safety"))


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def fails(args: list[str], *needles: str) -> str:
    """Run the CLI; it must exit 1 with one line on stderr (notes aside) that holds every needle; returns it."""
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    lines = [v for v in res.stderr.splitlines() if v.strip() and not v.startswith("ssmtrim: note:")]
    assert len(lines) == 1 and lines[0].startswith("ssmtrim: "), res.stderr
    assert "unexpected" not in lines[0] and "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def succeeds(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def prune_args(inputs, source, out, *more) -> list:
    return ["prune", source, "--data", inputs["images"], "--layers", "1", "--num-images", "8", "--batch-size", "4",
            "--quiet", "-o", out, *more]


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if the calibration starts (the checks must come before it)."""
    import ssmtrim.pruning.calibrate

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration ran before the check")

    monkeypatch.setattr(ssmtrim.pruning.calibrate, "calibrate", calibrate)


# ---------------------------------------------------------------------------------------------------------------
# --force never destroys what ssmtrim did not write, nor its inputs


def test_force_on_a_project_folder_deletes_nothing(inputs, tmp_path, no_calibration):
    """`prune proj/model --data proj/data -o proj --force`, where proj also holds the user's own files."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "model.pth").write_bytes(inputs["dense_file"].read_bytes())
    (proj / "notes.txt").write_text("my notes")
    os.symlink(inputs["images"], proj / "data_link")
    before = snapshot(proj)
    fails(prune_args(inputs, proj / "model.pth", proj, "--force"), f"'{proj}'", "contains the source model")
    # the data folder reached through a symlink is protected too
    fails(["prune", inputs["dense_file"], "--data", proj / "data_link", "--layers", "1", "-o", inputs["images"],
           "--force"], "is the --data folder")
    assert snapshot(proj) == before
    # a folder of the user's own files that is no input is not replaced either, and every file stays
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("chapter 1")
    (mine / "config.json").write_text('{"format": "ssmtrim"}')  # even beside something that looks like ssmtrim's
    before = snapshot(mine)
    fails(prune_args(inputs, inputs["dense_file"], mine, "--force"), f"'{mine}'", "did not write (thesis.tex)")
    assert snapshot(mine) == before


def test_output_equal_to_the_source_model_folder_is_refused(inputs, tmp_path, no_calibration):
    model = tmp_path / "mymodel"
    model.mkdir()
    for f in inputs["dense"].iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "classes.txt").write_text("a\nb\n")
    before = snapshot(model)
    fails(prune_args(inputs, model, model, "--force"), "is the source model")
    os.symlink(tmp_path, tmp_path / "alias")  # the same folder under another name
    fails(prune_args(inputs, model, tmp_path / "alias" / "mymodel", "--force"), "is the source model")
    fails(prune_args(inputs, model, model / "inside", "--force"), "lies inside the source model")
    fails(["convert", model, "-o", model, "--force"], "is the source model")
    assert snapshot(model) == before
    # the library refuses the same: a model saved over its own source
    with pytest.raises(ConfigError, match="is the source model"):
        ssmtrim.save_model(ssmtrim.load_model(model), model, force=True)
    assert snapshot(model) == before


def test_output_inside_the_data_folder_is_refused(inputs, tmp_path, no_calibration):
    before = snapshot(inputs["images"])
    fails(prune_args(inputs, inputs["dense_file"], inputs["images"] / "pruned"), "lies inside the --data folder")
    fails(["train", "vim_test", "--data", inputs["images"], "-o", inputs["images"] / "a" / "run"],
          "lies inside the --data folder")
    assert snapshot(inputs["images"]) == before


def test_force_replaces_ssmtrim_output_and_an_empty_folder_needs_no_force(inputs, tmp_path):
    """The control for the refusals above: ssmtrim's own output folder is replaced with --force (and only with it)."""
    out = tmp_path / "out"
    out.mkdir()  # an empty folder loses nothing
    succeeds(prune_args(inputs, inputs["dense_file"], out))
    first = snapshot(out)
    assert "config.json" in first
    fails(prune_args(inputs, inputs["dense_file"], out), "already exists; pass --force")
    assert snapshot(out) == first
    succeeds(prune_args(inputs, inputs["dense_file"], out, "--force", "--keep", "0.5"))
    assert sorted(snapshot(out)) == sorted(first) and snapshot(out) != first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


# ---------------------------------------------------------------------------------------------------------------
# the output checked before any long work


def test_empty_output_is_an_error_not_the_current_folder(inputs, tmp_path, monkeypatch, no_calibration):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fails(prune_args(inputs, inputs["dense_file"], ""), "empty")
    fails(["convert", inputs["dense_file"], "-o", ""], "empty")
    fails(["finetune", inputs["pruned"], "--data", inputs["images"], "-o", ""], "empty")
    assert list(cwd.iterdir()) == []


def test_output_that_is_a_file(inputs, tmp_path, no_calibration):
    target = tmp_path / "results.csv"
    target.write_text("keep me")
    for force in ([], ["--force"]):
        line = fails(prune_args(inputs, inputs["dense_file"], target, *force), f"'{target}' is a file")
        assert "--force" not in line
    line = fails(["train", "vim_test", "--data", inputs["images"], "-o", target], "is a file")
    assert "--force" not in line and "--resume" not in line
    assert target.read_text() == "keep me"


def test_unwritable_output_fails_before_the_work_naming_the_users_path(inputs, tmp_path, monkeypatch,
                                                                       no_calibration):
    line = fails(prune_args(inputs, inputs["dense_file"], "/proc/ssmtrim-nowhere/out"), "'/proc/ssmtrim-nowhere/out'")
    assert ".tmp" not in line
    # a read-only folder (simulated: the tests may run as root, whom permissions do not stop)
    locked = tmp_path / "locked"
    locked.mkdir()
    import tempfile

    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    line = fails(prune_args(inputs, inputs["dense_file"], locked / "out"), f"'{locked / 'out'}'", "Permission denied")
    assert ".tmp" not in line
    fails(["finetune", inputs["pruned"], "--data", inputs["images"], "-o", locked / "run"], "Permission denied")
    assert list(locked.iterdir()) == []


def test_full_disk_while_writing_is_one_sentence_and_leaves_no_temporary_files(inputs, tmp_path, monkeypatch):
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    out = tmp_path / "out"
    line = fails(prune_args(inputs, inputs["dense_file"], out), f"'{out}'", "No space left on device")
    assert ".tmp" not in line
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_the_training_state(inputs, tmp_path, monkeypatch):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).rsplit(".", 1)[-1].startswith("tmp"):  # the state file's temporary name
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    fails(["finetune", inputs["pruned"], "--data", inputs["images"], "-o", run, "--epochs", "1", "--batch-size", "4",
           "--checkpoint-every", "1", "--quiet"], "No space left on device", "train_state.pt")
    assert not run.exists()  # no state was saved: no run folder left that would ask for --resume
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# runs: --resume, early failures, small data


def test_resume_with_nothing_to_resume_is_an_error(inputs, tmp_path):
    fails(["finetune", inputs["pruned"], "--data", inputs["images"], "-o", tmp_path / "none", "--resume"],
          "no training state", "drop --resume")
    fails(["train", "vim_test", "--data", inputs["images"], "-o", tmp_path / "none", "--resume"], "no training state")
    assert not (tmp_path / "none").exists()


def test_a_run_that_fails_leaves_no_folder_that_asks_for_resume(inputs, tmp_path):
    run = tmp_path / "run"
    args = ["finetune", inputs["pruned"], "--data", inputs["images"], "-o", run, "--epochs", "1", "--batch-size", "2",
            "--quiet"]
    fails([*args, "--lr", "1e30", "--clip-grad", "0", "--warmup-epochs", "0"], "loss became")
    assert not run.exists()
    succeeds(args)  # the same folder, no --force, no --resume
    assert (run / "model.safetensors").is_file() and (run / "train_state.pt").is_file()
    # a finished run is ssmtrim's own: without flags it says what to do, with --force it starts over
    fails(args, "already exists", "--resume", "--force")
    succeeds([*args, "--force"])


def test_fewer_images_than_a_batch_train_on_a_smaller_batch(inputs, tmp_path):
    res = succeeds(["finetune", inputs["pruned"], "--data", inputs["images"], "-o", tmp_path / "run", "--epochs",
                    "1", "--batch-size", "128", "--quiet"])
    assert "fewer than a batch of 128" in res.stderr
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert '"batch_size": 8' in log[0] and any('"epoch": 1' in v for v in log[1:])


# ---------------------------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("command", ["train", "finetune", "eval", "info", "report"])
@pytest.mark.parametrize("device", ["gpu0", "cuda:99"])
def test_bad_device_is_one_sentence_before_any_work(inputs, tmp_path, command, device):
    args = {"train": ["train", "vim_test", "--data", inputs["images"], "-o", tmp_path / "run"],
            "finetune": ["finetune", inputs["pruned"], "--data", inputs["images"], "-o", tmp_path / "run"],
            "eval": ["eval", inputs["pruned"], "--data", inputs["images"]],
            "info": ["info", inputs["pruned"]],
            "report": ["report", inputs["dense"], inputs["pruned"], "--data", inputs["images"], "-o",
                       tmp_path / "report"]}[command]
    fails([*args, "--device", device], f"--device '{device}'")
    assert list(tmp_path.iterdir()) == []  # no run folder, no report folder


# ---------------------------------------------------------------------------------------------------------------
# --eval-data found before the calibration, named as --eval-data


def test_bad_eval_data_is_found_before_calibration(inputs, tmp_path, no_calibration):
    unreadable = tmp_path / "unreadable"
    for c in ("a", "b"):
        (unreadable / c).mkdir(parents=True)
        (unreadable / c / "x.png").write_bytes(b"not a png")
    three = tmp_path / "three"
    for c in ("a", "b", "c"):
        (three / c).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(three / c / "0.png")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty", unreadable, three):
        line = fails(prune_args(inputs, inputs["dense_file"], tmp_path / "out", "--eval-data", folder),
                     "--eval-data", str(folder))
        assert "--data folder" not in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# no network


def test_unreachable_hub_is_one_sentence_at_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ssmtrim", "info", "someone/some-model:weights.pth"],
                          capture_output=True, text=True, env=env, timeout=120)
    took = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    lines = [v for v in proc.stderr.splitlines() if v.strip()]
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0], proc.stderr
    assert "someone/some-model:weights.pth" in lines[0] and took < 60  # no 25 s of retries on top of the start-up


# ---------------------------------------------------------------------------------------------------------------
# the error table; the optional cache


@pytest.mark.parametrize(("exc", "words"), [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.npz"), ("no space left", "'/data/x.npz'")),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), ("permission denied", "'/data/x'")),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/x"), ("read-only file system", "'/mnt/x'")),
    (MemoryError(), ("out of memory", "--batch-size")),
    (RuntimeError("Found no NVIDIA driver on your system.\nPlease check CUDA ..."), ("--device cpu",)),
    (ValueError("first line\nsecond line"), ("unexpected ValueError: first line",)),
])  # fmt: skip
def test_environment_errors_are_one_sentence(exc, words):
    import typer

    from ssmtrim.cli._errors import handle_errors

    one = typer.Typer()

    @one.command()
    @handle_errors
    def boom() -> None:
        raise exc

    res = CliRunner().invoke(one, [])
    assert res.exit_code == 1 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssmtrim: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert ("unexpected" in lines[0]) == isinstance(exc, ValueError)


def test_image_cache_on_a_full_disk_is_skipped_and_leaves_no_temporary_file(inputs, tmp_path, monkeypatch, capsys):
    from ssmtrim.data import scan_folder
    from ssmtrim.notices import reset_notices
    from ssmtrim.training.data import load_array_set

    def savez(file, **arrays):
        Path(file).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez)
    reset_notices()
    result = load_array_set(scan_folder(inputs["images"]), 32, cache_dir=tmp_path / "cache")
    assert len(result) == 8 and result.images.shape == (8, 32, 32, 3)
    assert list((tmp_path / "cache").iterdir()) == []
    assert "could not cache" in capsys.readouterr().err


def test_ssmtrim_recognises_its_own_folders_and_only_those(tmp_path):
    import json

    from ssmtrim.outputs import not_own_output

    def folder(name: str, files: dict[str, str]) -> Path:
        (tmp_path / name).mkdir()
        for f, text in files.items():
            (tmp_path / name / f).write_text(text)
        return tmp_path / name

    report = {"report.json": json.dumps({"ssmtrim_version": "0.1.0"}), "report.md": "#",
              "accuracy_vs_gflops.png": ""}
    started_run = {"train_state.pt": "", "train_log.jsonl": json.dumps({"ssmtrim_version": "0.1.0"}) + "\n",
                   "train_state.pt.tmp123": ""}
    older_run = {"train_state.pt": "", "train_log.jsonl": json.dumps({"step": 50, "loss": 1.0}) + "\n"}
    for files in (report, started_run, older_run):
        assert not_own_output(folder(f"own{len(list(tmp_path.iterdir()))}", files)) is None, files
    assert "holiday.png" in not_own_output(folder("photos", {**report, "holiday.png": ""}))
    assert "no config.json" in not_own_output(folder("unmarked", {"train_state.pt": ""}))
    assert "no config.json" in not_own_output(folder("hf", {"config.json": '{"model_type": "bert"}',
                                                            "model.safetensors": ""}))
    with_subfolder = folder("sub", {"config.json": '{"format": "ssmtrim"}'})
    assert not_own_output(with_subfolder) is None
    (with_subfolder / "notes").mkdir()  # a folder of the user's inside ssmtrim's output
    assert "(notes)" in not_own_output(with_subfolder)
