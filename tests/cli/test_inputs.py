"""Bad or odd inputs where the user meets them: class folders matched by name, config.json fields and weights checked
on load, ``--labels`` files, options that must not be ignored, fallbacks said aloud, ``--mode threshold`` from the
command line, and the comparison of a fine-tuned folder named for what it is."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.notices import reset_notices
from ssmtrim.pruning import PruneConfig, apply_pruning

# class names in an order that is not the sorted one: matching folders by sorted position would shift every label
CLASSES = ["zebra", "ant", "moth"]
SIZES = {"zebra": 4, "ant": 2, "moth": 3}  # unequal, so a shifted label changes top-1


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    monkeypatch.delenv("SSMTRIM_SCAN_BACKEND", raising=False)
    monkeypatch.delenv("SSMTRIM_QUIET_NOTICES", raising=False)
    reset_notices()
    return CliRunner()


def one_line_error(result, *patterns: str) -> str:
    """The command failed with one line on stderr (no traceback) matching every pattern."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("ssmtrim: note:")]
    assert len(lines) == 1 and lines[0].startswith("ssmtrim: "), result.stderr
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert "unexpected" not in lines[0]  # a sentence, not the catch-all
    return lines[0]


def _images(root, sizes: dict[str, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, n in sizes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _tiny(num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = ssmtrim.create_model("vim_test", depth=4, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A dense folder that records CLASSES and always predicts "zebra" (class 0), and an image folder of them."""
    root = tmp_path_factory.mktemp("named")
    model = _tiny()
    with torch.no_grad():
        model.head.bias[0] = 100.0
    model.class_names = list(CLASSES)
    dense = ssmtrim.save_model(model, root / "dense")
    data = _images(root / "data", SIZES)
    return root, dense, data


# ---------------------------------------------------------------------------------------------------------------
# 1. class folders are matched to the recorded class names by name


def test_eval_matches_class_folders_by_name(runner, named):
    _, dense, data = named
    assert json.loads((dense / "config.json").read_text())["classes"] == CLASSES
    result = runner.invoke(app, ["eval", str(dense), "--data", str(data), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    # every image is predicted "zebra": top-1 is the zebra folder's share (by sorted position it would be ant's)
    assert json.loads(result.stdout)["top1"] == pytest.approx(100 * SIZES["zebra"] / sum(SIZES.values()))


def test_unknown_class_folder_is_named_or_skipped_on_request(runner, named, tmp_path):
    _, dense, _ = named
    data = _images(tmp_path / "data", {"zebra": 2, "ant": 1, "kitten": 2})
    one_line_error(runner.invoke(app, ["eval", str(dense), "--data", str(data), "--workers", "0"]),
                   "'kitten'", "not among the model's 3 classes", "--skip-unknown-classes")
    result = runner.invoke(app, ["eval", str(dense), "--data", str(data), "--json", "--workers", "0",
                                 "--skip-unknown-classes"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["num_images"] == 3 and out["top1"] == pytest.approx(100 * 2 / 3)
    assert "ssmtrim: note:" in result.stderr and "kitten" in result.stderr


def test_prune_calibration_and_eval_data_match_by_name(runner, named, tmp_path):
    _, dense, data = named
    result = runner.invoke(app, ["prune", str(dense), "--data", str(data), "--layers", "1", "--keep", "0.5",
                                 "--json", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["comparison"]["top1"] == pytest.approx(SIZES["zebra"] / sum(SIZES.values()))
    bad = _images(tmp_path / "bad", {"zebra": 1, "kitten": 1})
    for args in (["--data", str(bad)], ["--data", str(data), "--eval-data", str(bad)]):
        one_line_error(runner.invoke(app, ["prune", str(dense), *args, "--layers", "1", "--keep", "0.5"]),
                       "'kitten'")


def test_report_and_finetune_refuse_an_unknown_class_folder(runner, named, tmp_path):
    root, dense, _ = named
    pruned = ssmtrim.save_model(apply_pruning(ssmtrim.load_model(dense), PruneConfig(layers=(1,), keep=(0.5,))),
                                tmp_path / "pruned")
    assert json.loads((pruned / "config.json").read_text())["classes"] == CLASSES  # the names travel
    bad = _images(tmp_path / "bad", {"ant": 8, "kitten": 8})
    one_line_error(runner.invoke(app, ["report", str(dense), str(pruned), "--data", str(bad), "-o",
                                       str(tmp_path / "r"), "--no-speed"]), "'kitten'")
    one_line_error(runner.invoke(app, ["finetune", str(pruned), "--data", str(bad), "-o", str(tmp_path / "ft"),
                                       "--batch-size", "4"]), "'kitten'")
    # a report over two dense models is one sentence, not the catch-all
    one_line_error(runner.invoke(app, ["report", str(dense), str(dense), "--data", str(bad), "-o",
                                       str(tmp_path / "r2"), "--no-speed"]), "is not pruned")


# ---------------------------------------------------------------------------------------------------------------
# 2. config.json fields and weights are checked when a folder or file is loaded


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ssmtrim.save_model(_tiny(), tmp_path_factory.mktemp("cfg") / "model")


@pytest.mark.parametrize(("section", "field", "value", "pattern"), [
    ("data", "std", [0.0, 0.2, 0.2], r"data\.std .*positive"),
    ("data", "std", [-1.0, 0.2, 0.2], r"data\.std"),
    ("data", "mean", [0.5, 0.5], r"data\.mean .*one value per input channel"),
    ("data", "crop_pct", None, r"data\.crop_pct is null"),
    ("data", "crop_pct", "0.9", r"data\.crop_pct"),
    ("data", "interpolation", "cubic", r"data\.interpolation"),
    ("arch", "depth", "4", r"arch\.depth is \"4\", not of type int"),
    ("arch", "depth", 0, r"depth must be a positive integer"),
    ("data", "resize", 256, r"unknown field.*resize"),
    (None, "source", "somewhere", r"field source is \"somewhere\", not an object"),
    ("arch", "embed_dim", None, r"arch\.embed_dim is null"),
    ("arch", "norm_eps", True, r"arch\.norm_eps"),
    (None, "classes", ["a", "b"], r"classes lists 2 names .* 3 classes"),
    (None, "classes", ["a", "a", "b"], r"classes names a class twice"),
    (None, "data", None, r"\"data\" must be an object"),
])  # fmt: skip
def test_bad_config_field_is_one_sentence_naming_field_and_file(runner, folder, tmp_path, section, field, value,
                                                                 pattern):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (config[section] if section else config)[field] = value
    (copy / "config.json").write_text(json.dumps(config))
    line = one_line_error(runner.invoke(app, ["info", str(copy)]), pattern)
    assert str(copy / "config.json") in line


def test_bad_pruning_field_is_named(runner, tmp_path):
    out = ssmtrim.save_model(apply_pruning(_tiny(), PruneConfig(layers=(1,), keep=(0.5,))), tmp_path / "p")
    config = json.loads((out / "config.json").read_text())
    for value, pattern in ((["half"], r"pruning\.keep"), ([1.5], r"\"pruning\" entry is refused.*outside")):
        config["pruning"]["keep"] = value
        (out / "config.json").write_text(json.dumps(config))
        one_line_error(runner.invoke(app, ["info", str(out)]), pattern, str(out / "config.json"))


def test_hand_edited_pruning_layers_name_the_file_not_a_flag(runner, tmp_path):
    out = ssmtrim.save_model(apply_pruning(_tiny(), PruneConfig(layers=(1,), keep=(0.5,))), tmp_path / "p")
    config = json.loads((out / "config.json").read_text())
    config["pruning"]["layers"] = [40]
    (out / "config.json").write_text(json.dumps(config))
    line = one_line_error(runner.invoke(app, ["info", str(out)]), r"\"pruning\" entry does not fit this model",
                          str(out / "config.json"))
    assert "--layers" not in line and "ssmtrim prune" in line


def test_integer_weights_are_refused(runner, tmp_path):
    state = {k: (v * 1000).to(torch.int32) if v.is_floating_point() else v for k, v in _tiny().state_dict().items()}
    torch.save(state, tmp_path / "int.pth")
    one_line_error(runner.invoke(app, ["info", str(tmp_path / "int.pth")]), "torch.int32", "floating point")


# ---------------------------------------------------------------------------------------------------------------
# --labels files


@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root, ssmtrim.save_model(_tiny(), root.parent / (root.name + "_model"))


@pytest.mark.parametrize(("content", "pattern"), [
    (b"\x00\x01\xff\xfe binary \x00", "not UTF-8 text"),
    (b"img0.png 0\nimg1.png -1\nimg2.png 2\n", r"line 2 .*label -1, outside"),
    (b"img0.png 0\nimg1.png 1\nimg2.png 9\n", r"line 3 .*label 9, outside the model's 3 classes"),
    (b"img0.png 0\nimg1.png 1\nimg2.png 2\nimg0.png 2\n", r"'img0.png' twice .*line 1.* line 4"),
])  # fmt: skip
def test_bad_labels_file(runner, flat, tmp_path, content, pattern):
    data, model = flat
    (tmp_path / "labels.txt").write_bytes(content)
    one_line_error(runner.invoke(app, ["eval", str(model), "--data", str(data), "--labels",
                                       str(tmp_path / "labels.txt"), "--workers", "0"]), pattern)


def test_repeated_identical_labels_are_accepted(runner, flat, tmp_path):
    data, model = flat
    (tmp_path / "labels.txt").write_text("img0.png 0\nimg1.png 1\nimg2.png 2\nimg0.png 0\n")
    result = runner.invoke(app, ["eval", str(model), "--data", str(data), "--labels", str(tmp_path / "labels.txt"),
                                 "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] is not None


# ---------------------------------------------------------------------------------------------------------------
# 3. options are honoured or refused, never ignored


def test_info_refuses_a_revision_of_a_local_folder_and_an_unknown_device(runner, folder):
    one_line_error(runner.invoke(app, ["info", str(folder), "--revision", "x"]), "--revision 'x'", "local path")
    one_line_error(runner.invoke(app, ["info", str(folder), "--device", "gpu0"]), "gpu0")
    one_line_error(runner.invoke(app, ["info", "vim_test", "--device", "gpu0"]), "gpu0")


# ---------------------------------------------------------------------------------------------------------------
# 4. fallbacks said aloud once on stderr, without -v


def test_slow_scan_fallback_is_said_once(runner, monkeypatch):
    from ssmtrim.ops import _cpu_kernel, backend

    monkeypatch.setattr(_cpu_kernel, "_status", _cpu_kernel.KernelStatus(False, "no C compiler found"))
    monkeypatch.setattr(_cpu_kernel, "_lib", None)
    monkeypatch.setattr(backend, "_reported", set())
    first = runner.invoke(app, ["info", "vim_test", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["backend"] != "cpu"
    notes = [v for v in first.stderr.splitlines() if "slower" in v]
    assert len(notes) == 1 and "no C compiler" in notes[0], first.stderr
    again = runner.invoke(app, ["info", "vim_test", "--json"])
    assert "slower" not in again.stderr  # once per process


def test_explicit_cpu_backend_says_when_it_runs_the_reference(capsys):
    from ssmtrim.ops import _cpu_kernel, selective_scan, use_backend

    if not _cpu_kernel.status().available:
        pytest.skip("no C compiler here: the cpu backend cannot be chosen")
    reset_notices()
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, 4, 6, generator=g, dtype=torch.float64), torch.rand(1, 4, 6, generator=g).double()
    A = -torch.rand(4, 3, generator=g).double()
    B, C = torch.randn(1, 3, 6, generator=g).double(), torch.randn(1, 3, 6, generator=g).double()
    with use_backend("cpu"):
        selective_scan(u, dt, A, B, C)
        selective_scan(u, dt, A, B, C)
    err = capsys.readouterr().err
    assert err.count("ssmtrim: note:") == 1 and "fp64" in err


def test_unregistered_architecture_says_it_uses_imagenet_preprocessing(runner, tmp_path):
    torch.save(_tiny().state_dict(), tmp_path / "odd.pth")
    result = runner.invoke(app, ["info", str(tmp_path / "odd.pth"), "--json"])
    assert result.exit_code == 0, result.output
    assert "not a registered architecture" in result.stderr and "ImageNet" in result.stderr
    registered = tmp_path / "reg.pth"
    torch.save(ssmtrim.create_model("vim_test").state_dict(), registered)
    quiet = runner.invoke(app, ["info", str(registered), "--json"])
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def test_missing_matplotlib_is_said(monkeypatch, capsys):
    from ssmtrim.report import plot

    reset_notices()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot({"entries": []}, None) == []
    assert "matplotlib is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 5. --mode threshold from the command line


def test_prune_threshold_mode_from_the_command_line(runner, named, tmp_path):
    _, dense, data = named
    out = tmp_path / "thr"
    result = runner.invoke(app, ["prune", str(dense), "--data", str(data), "--layers", "1,3", "--keep", "0.6",
                                 "--mode", "threshold", "-o", str(out), "--json", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["plan"]["mode"] == "threshold" and len(summary["plan"]["thresholds"]) == 2
    reloaded = ssmtrim.load_model(out)
    assert reloaded.prune_config.mode == "threshold"
    assert reloaded.prune_config.thresholds == pytest.approx(tuple(summary["calibration"]["thresholds"]))
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.randn(2, 3, 32, 32))).all()


# ---------------------------------------------------------------------------------------------------------------
# 6. the comparison of a fine-tuned folder is named for what it is


def _finetuned(root, dense, record: dict):
    model = ssmtrim.load_model(dense)
    apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,)))
    with torch.no_grad():
        for p in model.parameters():  # "fine-tuned": the weights moved away from the dense ones
            p.add_(0.05)
    return ssmtrim.save_model(model, root, extra_config={"finetune": record})


def test_eval_of_a_finetuned_folder_compares_with_the_dense_original(runner, named, tmp_path):
    _, dense, data = named
    ft = _finetuned(tmp_path / "ft", dense, {"dense_source": str(dense)})
    result = runner.invoke(app, ["eval", str(ft), "--data", str(data), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    truth = json.loads(runner.invoke(app, ["eval", str(dense), "--data", str(data), "--json", "--workers",
                                           "0"]).stdout)
    assert out["reference"] == "dense original" and out["dense_top1"] == pytest.approx(truth["top1"])

    unknown = _finetuned(tmp_path / "ft2", dense, {"dense_source": None})
    result = runner.invoke(app, ["eval", str(unknown), "--data", str(data), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "unpruned (fine-tuned weights) top-1" in result.stdout and "dense top-1" not in result.stdout
    assert "ssmtrim: note:" in result.stderr and "--dense" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# evaluation during training reads images as `ssmtrim eval` does (crop_pct, interpolation)


def test_training_evaluation_reads_images_as_eval_does(tmp_path):
    from ssmtrim.data import eval_transform, load_rgb, scan_folder
    from ssmtrim.models.registry import DataConfig
    from ssmtrim.training.data import load_folder, normalise

    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            pixels = rng.integers(0, 255, (48 + 8 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    cfg = DataConfig(input_size=(3, 32, 32), crop_pct=0.5, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3)
    held = load_folder(tmp_path, 2, 32, classes=["a", "b"], eval_data=cfg)
    expected = torch.stack([eval_transform(load_rgb(p), cfg) for p in scan_folder(tmp_path).paths])
    torch.testing.assert_close(normalise(torch.from_numpy(held.images), cfg), expected, rtol=0, atol=1e-6)


def test_folders_a_class_layout_does_not_read_are_said(tmp_path, capsys):
    from PIL import Image

    from ssmtrim.data import scan_folder

    reset_notices()
    for name in ("cat/a.png", "cat/more/b.png", "dog/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes").mkdir()
    images = scan_folder(tmp_path)
    assert images.classes == ["cat", "dog"] and len(images) == 2
    err = capsys.readouterr().err
    assert "'cat/more'" in err and "move their images into the class folder" in err
    assert "notes" in err and "not classes here" in err
    reset_notices()
    (tmp_path / "cat/more/b.png").unlink()
    (tmp_path / "cat/more").rmdir()
    (tmp_path / "notes").rmdir()
    scan_folder(tmp_path)
    assert "note:" not in capsys.readouterr().err  # a clean layout says nothing
