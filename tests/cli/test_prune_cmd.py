"""``ssmtrim prune``: calibrate on a folder, write a pruned folder that reloads to the same logits; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.evaluate import dense_of
from ssmtrim.pruning import PruneConfig, apply_pruning

runner = CliRunner()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Images of every awkward kind, in two class folders, plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8), "L").save(root / "cat" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (36, 36, 4), dtype=np.uint8), "RGBA").save(root / "cat" / "rgba.png")
    Image.new("CMYK", (36, 36), (10, 200, 30, 0)).save(root / "dog" / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (36, 36), dtype=np.uint16)).save(root / "dog" / "deep.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def write_checkpoint(path, name: str):
    torch.manual_seed(0)
    model = ssmtrim.create_model(name, depth=4, num_classes=2) if name == "vim_test" else \
        ssmtrim.create_model(name, depth=4, layers_with_dwconv=(0,), num_classes=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return model


@pytest.mark.parametrize("name", ["vim_test", "plainmamba_test"])
def test_prune_writes_a_folder_that_reloads_to_the_same_logits(tmp_path, image_dir, name):
    ckpt = tmp_path / "dense.pth"
    write_checkpoint(ckpt, name)
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--layers", "1,3", "--keep", "0.5",
                              "-o", str(out), "--json", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["unreadable"] == 1  # the broken file is counted, not fatal
    assert summary["comparison"]["num_images"] == 16
    assert set(summary["flops"]) == {"paper", "full"} and summary["flops"]["full"]["ratio"] < 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["pruning"]["layers"] == [1, 3] and len(config["pruning"]["thresholds"]) == 2
    assert len(config["source_sha256"]) == 64 and config["calibration"]["num_images"] == 16
    assert (out / "README.md").read_text().startswith("# ")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    reloaded = ssmtrim.load_model(out)
    assert reloaded.prune_config.thresholds == tuple(config["pruning"]["thresholds"])
    # the default plan (the family's recommendation) compensates the classifier: the folder holds those weights and
    # the dense values of what changed; the plan applied to the source plus the folder's classifier is the same model
    assert config["pruning"]["compensate"] == "head" and summary["compensation"]["kind"] == "head"
    assert sorted(config["dense_weights"]["tensors"]) == ["head.bias", "head.weight"]
    source = ssmtrim.load_model(ckpt)
    in_memory = apply_pruning(ssmtrim.load_model(ckpt), PruneConfig.from_dict(config["pruning"]))
    with torch.no_grad():
        in_memory.head.weight.copy_(reloaded.head.weight)
        in_memory.head.bias.copy_(reloaded.head.bias)
    x = torch.randn(3, 3, 32, 32) if name == "vim_test" else torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), in_memory(x))
        assert torch.equal(dense_of(reloaded)(x), source(x))  # the true dense model comes back from the folder

    # pruning a pruned folder, or writing over it without --force, is refused and changes nothing
    before = (out / "config.json").read_bytes()
    res = runner.invoke(app, ["prune", str(out), "--data", str(image_dir), "--layers", "1", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "already pruned" in res.output
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--layers", "1", "-o", str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    assert (out / "config.json").read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--layers", "1", "--keep", "1.5"], "outside (0, 1]"),
    (["--layers", "9"], "out of range"),
    (["--layers", "a,b"], "comma-separated"),
    (["--layers", "1", "--arrangement", "shuffle"], "arrangement"),
    ([], "--layers"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path, image_dir, args, message):
    ckpt = tmp_path / "dense.pth"
    write_checkpoint(ckpt, "vim_test")
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "-o", str(tmp_path / "out"), *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_bad_data_folders(tmp_path):
    ckpt = tmp_path / "dense.pth"
    write_checkpoint(ckpt, "vim_test")
    (tmp_path / "empty").mkdir()
    for data, message in ((tmp_path / "empty", "holds no images"), (tmp_path / "missing", "does not exist")):
        res = runner.invoke(app, ["prune", str(ckpt), "--data", str(data), "--layers", "1", "-o", str(tmp_path / "o")])
        assert res.exit_code == 1 and message in res.output, res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(bad), "--layers", "1", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "could be read" in res.output
    assert not (tmp_path / "o").exists()


def test_flops_target_chooses_a_schedule(tmp_path, image_dir):
    ckpt = tmp_path / "dense.pth"
    write_checkpoint(ckpt, "vim_test")
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--flops", "0.75", "-o",
                              str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["flops"]["paper"]["ratio"] <= 0.755  # the paper convention unless told, as report --sweep
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--layers", "2", "--keep", "0.5",
                              "--flops-convention", "full"])
    assert res.exit_code == 1 and "there is no --flops" in res.output
    assert tuple(summary["plan"]["layers"]) == tuple(summary["schedule_search"]["chosen"]["layers"])
    # fixed layers + a target: only the keep ratio is solved for
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--flops", "0.8", "--layers", "1,3",
                              "--flops-convention", "paper", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["plan"]["layers"] == [1, 3] and summary["output"] is None
    assert 0.7 < summary["flops"]["paper"]["ratio"] <= 0.8 + 1e-6
    assert not (tmp_path / "o2").exists()
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--flops", "0.7", "--layers", "2",
                              "--keep", "0.5", "-o", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "conflict" in res.output
    # a keep ratio per step, allocated by sensitivity, within the same budget
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--flops", "0.8", "--layers", "1,3",
                              "--allocate-keeps", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["plan"]["keep"] == summary["keep_allocation"]["keep"] and len(summary["plan"]["keep"]) == 2
    assert summary["flops"]["paper"]["ratio"] <= 0.8 + 0.01
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--layers", "1,3", "--keep", "0.8",
                              "--allocate-keeps"])
    assert res.exit_code == 1 and "there is no --flops" in res.output
    res = runner.invoke(app, ["prune", str(ckpt), "--data", str(image_dir), "--flops", "0.05", "--layers", "3"])
    assert res.exit_code == 1 and "cannot be reached" in res.output
