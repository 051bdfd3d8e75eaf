"""ssmtrim's folder format (config.json + model.safetensors): round trip, contents, overwrite rules, atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open

import ssmtrim
from ssmtrim.checkpoint import load_model, save_model
from ssmtrim.errors import CheckpointError, ConfigError, SourceNotFoundError
from ssmtrim.models.registry import DataConfig, get_spec
from tests.conftest import randomize


def logits(model: torch.nn.Module) -> torch.Tensor:
    size = model.config.img_size
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)))


@pytest.fixture(params=["vim_test", "plainmamba_test"])
def model(request) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(ssmtrim.create_model(request.param))


def test_round_trip(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    assert out == tmp_path / "export"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(out)
    assert type(loaded) is type(model) and loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.source.kind == "folder" and loaded.source.path == str(out)
    assert loaded.data_config == DataConfig(input_size=(3, model.config.img_size, model.config.img_size))


def test_config_json_contents(model, tmp_path):
    out = save_model(model, tmp_path / "export", extra_config={"pruning": {"keep": 0.7}}, readme="# card\n")
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "ssmtrim" and config["ssmtrim_version"] == ssmtrim.__version__
    assert config["family"] == model.config.family
    assert config["arch"] == json.loads(json.dumps(model.config.to_dict()))
    assert config["arch"]["family"] == model.config.family
    assert type(model.config).from_dict(config["arch"]) == model.config
    assert config["data"] == {"input_size": [3, model.config.img_size, model.config.img_size], "crop_pct": 0.875,
                              "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert config["pruning"] == {"keep": 0.7} and "source" not in config  # created in memory: no provenance
    assert (out / "README.md").read_text() == "# card\n"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(model.state_dict())
    assert meta["format"] == "pt" and json.loads(meta["ssmtrim_config"]) == config


def test_provenance_and_preprocessing_travel_with_the_folder(write_official, tmp_path):
    """A model loaded from an official file keeps its registered name and eval preprocessing through a save."""
    _, path = write_official("plainmamba_l1")
    loaded = load_model(path)
    out = save_model(loaded, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["spec"] == "plainmamba_l1" and config["source"]["kind"] == "file"
    assert config["data"]["input_size"] == [3, 224, 224]
    again = load_model(out)
    assert again.source.spec == "plainmamba_l1" and again.data_config == get_spec("plainmamba_l1").data
    assert torch.equal(logits(again), logits(loaded))
    info = ssmtrim.describe_model(out)
    assert info.name == "plainmamba_l1" and info.parameters == 7_551_656 and info.weights == f"folder: {out}"


def test_refuses_to_overwrite_without_force(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    before = (out / "model.safetensors").read_bytes()
    (out / "README.md").write_text("from an older export")
    other = randomize(ssmtrim.create_model(model.config.family + "_test"), seed=1)
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        save_model(other, out)
    assert (out / "model.safetensors").read_bytes() == before and (out / "README.md").exists()
    # a file ssmtrim does not write is the user's: the folder is never replaced, not even with force
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"did not write \(notes.txt\)"):
        save_model(other, out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").read_bytes() == before
    (out / "notes.txt").unlink()
    save_model(other, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # replaced, not merged
    assert torch.equal(logits(load_model(out)), logits(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folders left


def test_refuses_a_file_as_output(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        save_model(model, tmp_path / "file", force=True)
    assert (tmp_path / "file").read_text() == "x"


def test_folder_gets_ordinary_permissions(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    (tmp_path / "made_by_mkdir").mkdir()
    mode = stat.S_IMODE(os.stat(out).st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "made_by_mkdir").st_mode), oct(mode)


def _failing_save_file(monkeypatch):
    """safetensors' save_file that writes half a file, then fails (a full disk)."""
    import safetensors.torch

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_failed_write_leaves_nothing(model, tmp_path, monkeypatch):
    _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_failed_replace_keeps_the_old_folder(model, tmp_path, monkeypatch):
    out = save_model(model, tmp_path / "export")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    _failing_save_file(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failed_rename_restores_the_old_folder(model, tmp_path, monkeypatch):
    """The last step (temporary folder -> output) fails after the old folder was moved aside: it comes back."""
    out = save_model(model, tmp_path / "export")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        save_model(model, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# ---------------------------------------------------------------------------------------------------------------
# folders that are not (or no longer) valid


def test_folder_errors(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    with pytest.raises(ConfigError, match="drop --arch"):
        load_model(out, arch=model.config.family + "_test")

    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "arch": {**config["arch"], "new_field": 1}}))
    with pytest.raises(ConfigError, match=r"unknown .* field\(s\) \['new_field'\]"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "format"}))
    with pytest.raises(CheckpointError, match="not an ssmtrim config"):
        load_model(out)
    (out / "config.json").write_text(json.dumps({"format": "ssmtrim"}))
    with pytest.raises(CheckpointError, match="no 'arch' entry"):
        load_model(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(out)
    (out / "config.json").unlink()
    with pytest.raises(SourceNotFoundError, match="does not hold config.json and model.safetensors"):
        load_model(out)


def test_folder_with_truncated_weights(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(out)


def test_folder_with_weights_of_another_architecture(model, tmp_path):
    out = save_model(model, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["arch"]["depth"] += 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing: layers\.\d+\."):
        load_model(out)


def test_a_relative_source_is_recorded_where_it_really_is(tmp_path, monkeypatch):
    """A folder's recorded source is found again from any working folder (a finetune's dense original is loaded from
    it): a local path is recorded absolute, a registered name as given."""
    monkeypatch.chdir(tmp_path)
    ssmtrim.save_model(ssmtrim.create_model("vim_test", num_classes=3), "dense")
    copy = ssmtrim.save_model(ssmtrim.load_model("dense"), "copy")
    recorded = json.loads((copy / "config.json").read_text())["source"]["source"]
    assert recorded == str((tmp_path / "dense").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert ssmtrim.load_model(recorded).config == ssmtrim.load_model(str(tmp_path / "copy")).config
    bundled = ssmtrim.save_model(ssmtrim.load_model("vim_cifar"), tmp_path / "b")
    assert json.loads((bundled / "config.json").read_text())["source"]["source"] == "vim_cifar"


def test_bundled_or_random_loads_shipped_weights_else_seeded_random_ones():
    """What the speed benchmarks run: a registered model's bundled weights where they ship, else its architecture
    with seeded random weights (the same for the same seed)."""
    from ssmtrim.bundled import bundled_folder, bundled_or_random

    shipped = bundled_or_random("vim_cifar")
    want = ssmtrim.load_model(bundled_folder("vim_cifar"))
    assert not shipped.training
    assert all(torch.equal(a, b) for a, b in zip(shipped.state_dict().values(), want.state_dict().values(),
                                                   strict=True))
    assert bundled_folder("vim_test") is None
    a, b, c = bundled_or_random("vim_test"), bundled_or_random("vim_test"), bundled_or_random("vim_test", seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.head.weight, c.head.weight)
