"""Training from scratch (the bundled models' path) and continuing a trained checkpoint with --init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.training import TrainConfig, train_from_scratch

runner = CliRunner()
CFG = TrainConfig(epochs=1, batch_size=10, lr=1e-3, warmup_epochs=0.5, checkpoint_every=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 1)):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")
    return root


def test_train_from_scratch_writes_a_loadable_folder_with_its_record(data, tmp_path):
    result = train_from_scratch("vim_test", data / "train", tmp_path / "run", CFG, eval_data=data / "val")
    model = ssmtrim.load_model(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["from"] == "scratch" and config["training"]["train_images"] == 30
    assert [r["epoch"] for r in config["training"]["curve"]] == [1] and "eval_top1" in result
    assert model.config == ssmtrim.create_model("vim_test").config
    assert (tmp_path / "run" / "train_log.jsonl").exists()


def test_init_continues_from_the_given_weights(data, tmp_path):
    torch.manual_seed(5)
    start = ssmtrim.save_model(ssmtrim.create_model("vim_test"), tmp_path / "start")
    still = TrainConfig(epochs=1, batch_size=10, lr=1e-12, weight_decay=0.0, warmup_epochs=0.0, min_lr=0.0)
    train_from_scratch("vim_test", data / "train", tmp_path / "same", still, init=start)
    train_from_scratch("vim_test", data / "train", tmp_path / "fresh", still)
    before, after = ssmtrim.load_model(start).state_dict(), ssmtrim.load_model(tmp_path / "same").state_dict()
    fresh = ssmtrim.load_model(tmp_path / "fresh").state_dict()
    for k in before:  # a negligible learning rate: the run ends where its init began, not at a random start
        torch.testing.assert_close(after[k], before[k], atol=1e-9, rtol=0)
    assert any(not torch.allclose(fresh[k], before[k]) for k in before)
    train_from_scratch("vim_test", data / "train", tmp_path / "moved", CFG, init=tmp_path / "same")
    config = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert config["training"]["from"] == str(tmp_path / "same")
    assert config["training"]["previous"]["recipe"]["lr"] == 1e-12  # the earlier record is kept
    assert "trained from" in (tmp_path / "moved" / "README.md").read_text()


def test_init_refuses_other_architectures_and_pruned_checkpoints(data, tmp_path):
    other = ssmtrim.save_model(ssmtrim.create_model("vim_test", depth=1), tmp_path / "other")
    pruned = ssmtrim.save_model(apply_pruning(ssmtrim.create_model("vim_test"), PruneConfig(layers=(1,), keep=(0.5,))),
                                tmp_path / "pruned")
    with pytest.raises(ConfigError, match="different architecture"):
        train_from_scratch("vim_test", data / "train", tmp_path / "a", CFG, init=other)
    with pytest.raises(ConfigError, match="is pruned"):
        train_from_scratch("vim_test", data / "train", tmp_path / "b", CFG, init=pruned)
    result = runner.invoke(app, ["train", "vim_test", "--data", str(data / "train"), "-o", str(tmp_path / "c"),
                                 "--init", str(other), "--epochs", "1"])
    assert result.exit_code == 1 and "different architecture" in result.output


@pytest.mark.parametrize("arch,size", [("vim_test", 48), ("plainmamba_test", (32, 48))])
def test_train_at_another_input_size(data, tmp_path, arch, size):
    """--img-size: the architecture trained at that size (its token grid follows), its images read at that size."""
    out = tmp_path / "run"
    text = str(size) if isinstance(size, int) else f"{size[0]},{size[1]}"
    result = runner.invoke(app, ["train", arch, "--data", str(data / "train"), "--eval-data", str(data / "val"), "-o",
                                 str(out), "--epochs", "1", "--batch-size", "10", "--img-size", text, "-q"])
    assert result.exit_code == 0, result.output
    model = ssmtrim.load_model(out)
    hw = (size, size) if isinstance(size, int) else size
    assert model.config.input_hw == hw and tuple(model.data_config.input_size[-2:]) == hw
    assert model.config != ssmtrim.create_model(arch).config
    with torch.no_grad():
        assert model(torch.randn(2, 3, *hw)).shape == (2, 10)
    assert f"at {text.replace(',', 'x')}" in (out / "README.md").read_text()


def test_train_img_size_resizes_the_init_checkpoint_and_refuses_a_bad_size(data, tmp_path):
    start = ssmtrim.save_model(ssmtrim.create_model("vim_test"), tmp_path / "start")  # at vim_test's own 32x32
    train_from_scratch("vim_test", data / "train", tmp_path / "big", CFG, init=start, img_size=48)
    assert ssmtrim.load_model(tmp_path / "big").config.input_hw == (48, 48)
    result = runner.invoke(app, ["train", "vim_test", "--data", str(data / "train"), "-o", str(tmp_path / "bad"),
                                 "--img-size", "30", "-q"])  # not a whole number of 8-pixel patches
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()
