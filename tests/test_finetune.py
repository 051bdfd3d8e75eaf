"""Fine-tuning a pruned model: output format, exact resume after an interruption, bad input, two-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning, is_pruned
from ssmtrim.training import TrainConfig, finetune

runner = CliRunner()
CFG = TrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0.5, augment="rrc", distill_weight=0.5,
                  checkpoint_every=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(8 if split == "train" else 3):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", num_classes=3)
    dense = ssmtrim.save_model(model, root / "dense")
    pruned = ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(2,), keep=(0.5,))), root / "pruned")
    return root, dense, pruned


def _weights(folder):
    return ssmtrim.load_model(folder).state_dict()


def test_finetune_writes_a_pruned_folder_with_recipe_and_log(setup, tmp_path):
    root, _, pruned = setup
    result = finetune(pruned, root / "train", tmp_path / "out", CFG, eval_data=root / "val")
    model = ssmtrim.load_model(tmp_path / "out")
    assert is_pruned(model) and model.prune_config.layers == (2,)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["finetune"]["recipe"]["distill_weight"] == 0.5 and len(config["finetune"]["curve"]) == 2
    assert config["finetune"]["before"]["top1"] is not None and "eval_top1" in result
    lines = [json.loads(v) for v in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "eval_top1" in r] == [1, 2]
    before, after = _weights(pruned), model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "fine-tuned" in (tmp_path / "out" / "README.md").read_text()


class _Interrupt:
    """A progress callback that raises KeyboardInterrupt at a given step, as Ctrl-C would."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage.startswith("epoch"):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt


def test_resume_after_interruption_gives_the_same_weights(setup, tmp_path):
    root, _, pruned = setup
    finetune(pruned, root / "train", tmp_path / "straight", CFG)
    with pytest.raises(KeyboardInterrupt):
        finetune(pruned, root / "train", tmp_path / "cut", CFG, progress=_Interrupt(at=4))
    assert (tmp_path / "cut" / "train_state.pt").exists() and not (tmp_path / "cut" / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="--resume"):
        finetune(pruned, root / "train", tmp_path / "cut", CFG)
    finetune(pruned, root / "train", tmp_path / "cut", CFG, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # a resume file from another run (different recipe) is refused, and left in place
    other = TrainConfig(**{**CFG.to_dict(), "lr": 5e-4})
    with pytest.raises(CheckpointError, match="another run"):
        finetune(pruned, root / "train", tmp_path / "cut", other, resume=True)
    assert (tmp_path / "cut" / "train_state.pt").exists()


def test_resume_is_exact_with_stochastic_depth(setup, tmp_path):
    """PlainMamba's stochastic depth draws from torch's global generator; the resume file carries its state, so an
    interrupted and resumed run ends with the weights of an uninterrupted one."""
    root, _, _ = setup
    torch.manual_seed(0)
    model = ssmtrim.create_model("plainmamba_test", img_size=32, num_classes=3, drop_path_rate=0.5)
    pruned = ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,))), tmp_path / "pm")
    finetune(pruned, root / "train", tmp_path / "straight", CFG)
    with pytest.raises(KeyboardInterrupt):
        finetune(pruned, root / "train", tmp_path / "cut", CFG, progress=_Interrupt(at=4))
    finetune(pruned, root / "train", tmp_path / "cut", CFG, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_bad_input(setup, tmp_path):
    root, dense, pruned = setup
    cases = [
        (["finetune", str(dense), "--data", str(root / "train")], "is not pruned"),
        (["finetune", str(pruned), "--data", str(root / "val" / "a")], "no class sub-folders"),
        (["finetune", str(pruned), "--data", str(root / "train"), "--augment", "mixup"], "--augment 'mixup' is not"),
        (["finetune", str(pruned), "--data", str(root / "train"), "--distill-weight", "2"], "--distill-weight 2.0"),
    ]
    for args, message in cases:
        res = runner.invoke(app, [*args, "-o", str(tmp_path / "o")])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output, (args, res.output)
    # a fine-tuned folder whose dense source is unknown needs --teacher
    finetune(pruned, root / "train", tmp_path / "ft1", TrainConfig(epochs=1, batch_size=8, augment="none",
                                                                   distill_weight=0.0))
    cfg_path = tmp_path / "ft1" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["finetune"]["dense_source"] = None
    cfg_path.write_text(json.dumps(config))
    res = runner.invoke(app, ["finetune", str(tmp_path / "ft1"), "--data", str(root / "train"), "-o",
                              str(tmp_path / "ft2")])
    assert res.exit_code == 1 and "--teacher" in res.output, res.output
    res = runner.invoke(app, ["finetune", str(tmp_path / "ft1"), "--data", str(root / "train"), "-o",
                              str(tmp_path / "ft3"), "--teacher", str(dense), "--batch-size", "8", "--json"])
    assert res.exit_code == 0, res.output


def test_two_process_ddp_ranks_agree(setup, tmp_path):
    root, _, pruned = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m",
           "ssmtrim", "finetune", str(pruned), "--data", str(root / "train"), "-o", str(tmp_path / "ddp"),
           "--epochs", "2", "--batch-size", "8", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(v) for v in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    ends = [r for r in records if "rank_checksums" in r]
    assert len(ends) == 2 and all(r["world_size"] == 2 for r in ends)
    for r in ends:
        assert r["rank_checksums"][0] == r["rank_checksums"][1] and r["ranks_agree"]
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["finetune"]["world_size"] == 2
    assert is_pruned(ssmtrim.load_model(tmp_path / "ddp"))
