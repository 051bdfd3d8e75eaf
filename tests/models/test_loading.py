"""load_model from every official layout (local files and a pre-filled Hub cache, no network) and its typed errors.

The checkpoints are written by the tests in the official layouts with random weights: hustvl/Vim training
checkpoints (``model`` next to optimizer, lr_scheduler, epoch, model_ema, scaler, args) and mmcls PlainMamba files
(``meta`` + ``state_dict`` with ``backbone.`` / ``head.fc.`` keys).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import ssmtrim
from ssmtrim.checkpoint import load_model
from ssmtrim.errors import CheckpointError, SourceNotFoundError, SsmtrimError, StateDictMismatchError
from ssmtrim.models.loading import read_checkpoint, resolve_source
from ssmtrim.models.registry import get_spec

VIM_HUB = "hustvl/Vim-tiny-midclstok"
VIM_FILE = "vim_t_midclstok_76p1acc.pth"
PM_HUB = "ChenhongyiYang/PlainMamba"


def logits(model: torch.nn.Module, size: int = 224, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1 if size > 64 else 2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def assert_same_weights(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    assert type(loaded) is type(source)
    assert loaded.config == source.config
    assert not loaded.training
    src, got = source.state_dict(), loaded.state_dict()
    assert list(got) == list(src)
    for key, value in src.items():
        assert torch.equal(got[key], value), key


def assert_same_model(loaded: torch.nn.Module, source: torch.nn.Module, size: int = 224) -> None:
    assert_same_weights(loaded, source)
    y = logits(loaded, size)
    assert y.shape[1] == source.config.num_classes and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, logits(source, size), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the official layouts themselves: exact key names and shapes, built on the meta device


def official_vim_shapes(d: int) -> dict[str, tuple[int, ...]]:
    e, r = 2 * d, math.ceil(d / 16)
    shapes = {"patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,), "cls_token": (1, 1, d),
              "pos_embed": (1, 197, d), "head.weight": (1000, d), "head.bias": (1000,), "norm_f.weight": (d,)}
    for i in range(24):
        p = f"layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        shapes[p + "mixer.in_proj.weight"] = (2 * e, d)
        shapes[p + "mixer.out_proj.weight"] = (d, e)
        for s in ("", "_b"):
            shapes[p + f"mixer.conv1d{s}.weight"] = (e, 1, 4)
            shapes[p + f"mixer.conv1d{s}.bias"] = (e,)
            shapes[p + f"mixer.x_proj{s}.weight"] = (r + 32, e)
            shapes[p + f"mixer.dt_proj{s}.weight"] = (e, r)
            shapes[p + f"mixer.dt_proj{s}.bias"] = (e,)
            shapes[p + f"mixer.D{s}"] = (e,)
        shapes[p + "mixer.A_log"] = shapes[p + "mixer.A_b_log"] = (e, 16)
    return shapes


def official_plainmamba_shapes(c: int, depth: int, convs: int, dw: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """mmcls keys of ImageClassifier(PlainMamba backbone, LinearClsHead): patch_embed.py / plain_mamba*.py."""
    e, r = 2 * c, math.ceil(c / 16)

    def bn(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
        return {prefix + k: (n,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            prefix + "num_batches_tracked": ()}

    b = "backbone."
    shapes = {b + "patch_embed.stem.0.weight": (64, 3, 7, 7), **bn(b + "patch_embed.stem.1.", 64)}
    for j in range(convs):  # Conv2d, BatchNorm2d, ReLU per extra conv
        shapes[b + f"patch_embed.convs.{3 * j}.weight"] = (64, 64, 3, 3)
        shapes.update(bn(b + f"patch_embed.convs.{3 * j + 1}.", 64))
    shapes |= {b + "patch_embed.projection.weight": (c, 64, 8, 8), b + "patch_embed.projection.bias": (c,),
               b + "pos_embed": (1, 196, c), b + "ln1.weight": (c,), b + "ln1.bias": (c,),
               "head.fc.weight": (1000, c), "head.fc.bias": (1000,)}
    for i in range(depth):
        p = b + f"layers.{i}."
        shapes |= {p + "norm.weight": (c,), p + "norm.bias": (c,), p + "mamba.in_proj.weight": (2 * e, c),
                   p + "mamba.in_proj.bias": (2 * e,), p + "mamba.conv2d.weight": (e, 1, 7, 7),
                   p + "mamba.conv2d.bias": (e,), p + "mamba.x_proj.weight": (r + 32, e),
                   p + "mamba.dt_proj.weight": (e, r), p + "mamba.dt_proj.bias": (e,), p + "mamba.A_log": (e, 16),
                   p + "mamba.D": (e,), p + "mamba.out_proj.weight": (c, e), p + "mamba.out_proj.bias": (c,),
                   p + "mamba.direction_Bs": (5, 16)}
        if i in dw:
            shapes[p + "dw.0.weight"] = (c, 1, 3, 3)
            shapes.update(bn(p + "dw.1.", c))
    return shapes


OFFICIAL_LAYOUTS = {
    "vim_tiny": (official_vim_shapes(192), 7_148_008),
    "vim_small": (official_vim_shapes(384), 25_796_584),
    "vim_base": (official_vim_shapes(768), 97_598_440),  # published: ~97.6 M
    "plainmamba_l1": (official_plainmamba_shapes(192, 24, 1, (0,)), 7_551_656),  # official code, 1000-class head
    "plainmamba_l2": (official_plainmamba_shapes(384, 24, 2, ()), 25_760_832 + 385_000),  # published backbone 25.7 M
    "plainmamba_l3": (official_plainmamba_shapes(448, 36, 2, ()), 50_507_456 + 449_000),  # published backbone 50.5 M
}


@pytest.mark.parametrize("name", list(OFFICIAL_LAYOUTS))
def test_official_layout_keys_and_shapes(name):
    from tests.conftest import official_checkpoint

    expected, n_params = OFFICIAL_LAYOUTS[name]
    with torch.device("meta"):
        model = ssmtrim.create_model(name)
    ckpt = official_checkpoint(model)
    sd = ckpt["model"] if name.startswith("vim") else ckpt["state_dict"]
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == n_params


# ---------------------------------------------------------------------------------------------------------------
# local files in the official layouts


@pytest.mark.parametrize("name", ["vim_tiny", "vim_small", "plainmamba_l1", "plainmamba_l2", "plainmamba_l3"])
def test_official_file_loads_with_inferred_and_given_arch(write_official, name):
    source, path = write_official(name)
    loaded = load_model(path)
    assert_same_model(loaded, source)
    spec = get_spec(name)
    assert loaded.config == spec.arch  # inferred from the tensors alone
    assert loaded.source.kind == "file" and loaded.source.path == str(path) and loaded.source.spec == name
    assert loaded.data_config == spec.data
    forced = load_model(str(path), arch=name)  # the same tensors, so the same logits as checked above
    assert forced.source.spec == name
    assert_same_weights(forced, source)


def test_vim_base_official_file(write_official):
    """Vim-B (~98 M parameters), once, with the architecture inferred (about 5 s on 2 cores)."""
    source, path = write_official("vim_base")
    loaded = load_model(path)
    assert loaded.config == get_spec("vim_base").arch and loaded.source.spec == "vim_base"
    assert_same_model(loaded, source)


def test_vim_checkpoint_reads_model_not_model_ema(write_official):
    _, path = write_official("vim_test")
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch", "model_ema", "scaler", "args"}
    sd, meta = read_checkpoint(path)
    assert meta == {} and list(sd) == list(ckpt["model"])
    assert torch.equal(sd["head.weight"], ckpt["model"]["head.weight"])
    assert not torch.equal(sd["head.weight"], ckpt["model_ema"]["head.weight"])


def test_plainmamba_ema_buffers_are_ignored(tmp_path):
    from tests.conftest import plainmamba_mmcls_checkpoint, randomize

    model = randomize(ssmtrim.create_model("plainmamba_test"))
    ckpt = plainmamba_mmcls_checkpoint(model.state_dict(), ema=True)
    assert "ema_backbone_layers_0_mamba_direction_Bs" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "ema.pth")
    assert_same_model(load_model(tmp_path / "ema.pth"), model, size=64)


def test_numpy_scalars_in_training_args_load(tmp_path):
    """Training arguments may hold numpy scalars; numpy 1 pickles them as numpy.core.multiarray.scalar, which
    numpy 2 renamed: both spellings must load (and without numpy's deprecation warning)."""
    import warnings
    import zipfile

    np = pytest.importorskip("numpy")
    from tests.conftest import randomize

    model = randomize(ssmtrim.create_model("vim_test"))
    path = tmp_path / "written.pth"
    torch.save({"model": model.state_dict(), "args": {"lr": np.float64(5e-4), "seed": np.int64(0)}}, path)
    other = tmp_path / "other.pth"  # the same file as the other numpy major version writes it
    spellings = (b"numpy.core.multiarray\nscalar", b"numpy._core.multiarray\nscalar")
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(other, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                here = next(s for s in spellings if s in data)
                data = data.replace(here, spellings[1 - spellings.index(here)])
            zout.writestr(item, data)
    for p in (path, other):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            assert_same_model(load_model(p), model, size=32)


@pytest.mark.parametrize("name", ["vim_test", "plainmamba_test"])
def test_plain_state_dicts_load(tmp_path, name):
    """A bare state dict (no container) as .pth, and as .safetensors in our and in the official key layout."""
    from safetensors.torch import save_file

    from tests.conftest import official_checkpoint, randomize

    model = randomize(ssmtrim.create_model(name))
    size = model.config.img_size
    sd = model.state_dict()
    torch.save(sd, tmp_path / "bare.pth")
    save_file(sd, str(tmp_path / "ours.safetensors"))
    official = official_checkpoint(model)
    save_file(dict(official["model"] if name.startswith("vim") else official["state_dict"]),
              str(tmp_path / "official.safetensors"))
    for file in ("bare.pth", "ours.safetensors", "official.safetensors"):
        loaded = load_model(tmp_path / file)
        assert_same_model(loaded, model, size)
        assert loaded.source.spec == name


# ---------------------------------------------------------------------------------------------------------------
# the Hugging Face Hub cache, offline


@pytest.fixture(scope="module")
def vim_tiny_file(tmp_path_factory):
    """A Vim-T training checkpoint, written once for the Hub tests."""
    from tests.conftest import official_checkpoint, randomize

    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_tiny"))
    path = tmp_path_factory.mktemp("vim_tiny") / VIM_FILE
    torch.save(official_checkpoint(model), path)
    return model, path


@pytest.fixture
def vim_in_cache(hub_cache, vim_tiny_file):
    model, path = vim_tiny_file
    commit = hub_cache.add(VIM_HUB, VIM_FILE, path)
    return model, commit


@pytest.mark.parametrize("source", ["vim_tiny", VIM_HUB, f"{VIM_HUB}:{VIM_FILE}", "vim_t"])
def test_hub_vim_offline(vim_in_cache, hub_cache, source):
    model, commit = vim_in_cache
    loaded = load_model(source)
    assert_same_model(loaded, model)
    assert loaded.source.kind == "hub" and loaded.source.hub_id == VIM_HUB and loaded.source.filename == VIM_FILE
    assert loaded.source.spec == "vim_tiny"
    assert loaded.source.path.startswith(str(hub_cache.root)) and f"/snapshots/{commit}/" in loaded.source.path


def test_hub_vim_offline_at_revision(vim_in_cache, hub_cache, write_official):
    model, commit = vim_in_cache
    other, path = write_official("vim_tiny", "other.pth", seed=1)
    newer = hub_cache.add(VIM_HUB, VIM_FILE, path)  # refs/main now points at another commit
    assert newer != commit
    assert_same_model(load_model(VIM_HUB), other)
    for source in ("vim_tiny", f"{VIM_HUB}:{VIM_FILE}"):
        loaded = load_model(source, revision=commit)
        assert loaded.source.revision == commit
        assert_same_model(loaded, model)
    with pytest.raises(SourceNotFoundError, match="not in the Hugging Face cache"):
        load_model("vim_tiny", revision="0" * 40)


def test_hub_file_of_another_architecture(hub_cache, write_official):
    """The official file of a registered name must hold that architecture (not whatever its tensors suggest)."""
    _, path = write_official("vim_test")
    hub_cache.add(VIM_HUB, VIM_FILE, path)
    with pytest.raises(StateDictMismatchError, match="wrong shape: .*patch_embed"):
        load_model("vim_tiny")
    assert load_model(f"{VIM_HUB}:{VIM_FILE}", arch="vim_test").config == get_spec("vim_test").arch


def test_hub_plainmamba_offline(hub_cache, write_official):
    model, path = write_official("plainmamba_l1", "l1.pth")
    hub_cache.add(PM_HUB, "l1.pth", path)
    for source in (f"{PM_HUB}:l1.pth", "plainmamba_l1", PM_HUB):
        loaded = load_model(source)
        assert_same_model(loaded, model)
        assert (loaded.source.kind, loaded.source.hub_id, loaded.source.filename) == ("hub", PM_HUB, "l1.pth")
        assert loaded.source.spec == "plainmamba_l1"
    # another file of the same repo is not cached: l2 must not silently fall back to l1
    with pytest.raises(SourceNotFoundError, match="l2.pth"):
        load_model("plainmamba_l2")


def test_hub_ssmtrim_folder_offline(hub_cache, tmp_path):
    from tests.conftest import randomize

    model = randomize(ssmtrim.create_model("vim_test"))
    folder = ssmtrim.save_model(model, tmp_path / "export")
    commit = hub_cache.add("someone/vim-test-pruned", "config.json", folder / "config.json")
    hub_cache.add("someone/vim-test-pruned", "model.safetensors", folder / "model.safetensors", commit=commit)
    loaded = load_model("someone/vim-test-pruned")
    assert loaded.source.kind == "folder" and loaded.source.hub_id == "someone/vim-test-pruned"
    assert_same_model(loaded, model, size=32)
    with pytest.raises(SourceNotFoundError, match="someone/other"):
        load_model("someone/other")


@pytest.mark.parametrize("source", ["vim_small", "hustvl/Vim-small-midclstok", f"{VIM_HUB}:missing.pth",
                                    "nobody/nothing:weights.pth"])
def test_hub_missing_entry_offline(hub_cache, vim_in_cache, source):
    with pytest.raises(SourceNotFoundError) as info:
        resolve_source(source)
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_hub_offline_through_environment_only(tmp_path, write_official):
    """What a user does: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before the process starts (a fresh import)."""
    from tests.conftest import HubCache

    root = tmp_path / "cache"
    model, path = write_official("vim_test", "t.pth")
    commit = HubCache(root).add("someone/vim-test", "t.pth", path)
    code = ("import sys, ssmtrim; m = ssmtrim.load_model('someone/vim-test:t.pth'); "
            "print(m.source.path); print(sum(p.numel() for p in m.parameters()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root), "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=_repo_root())
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == str(root / "models--someone--vim-test" / "snapshots" / commit / "t.pth")
    assert int(lines[1]) == sum(p.numel() for p in model.parameters())


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(ssmtrim.__file__).resolve().parent.parent)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one typed error each, nothing executed


def test_bad_source_raises_typed_error(bad_source):
    with pytest.raises(bad_source.error) as info:
        load_model(bad_source.source, arch=bad_source.arch)
    assert isinstance(info.value, SsmtrimError)
    message = str(info.value)
    assert re.search(bad_source.match, message), message
    assert "\n" not in message and message.endswith(".")
    if bad_source.marker is not None:
        assert not bad_source.marker.exists()


def test_refused_pickle_would_execute(tmp_path):
    """The command payload is real: plain unpickling runs it, so its refusal is what kept it from running."""
    from tests.conftest import RunsCommand

    marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.pth"
    torch.save({"model": ssmtrim.create_model("vim_test").state_dict(), "args": RunsCommand(f"touch {marker}")}, path)
    with pytest.raises(CheckpointError, match=r"\(posix\.system\) that ssmtrim refuses"):
        load_model(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_hub_source_forms_are_not_local_paths():
    """`owner/repo:file.pth` is a Hub file; a missing `dir/file.pth` or `./x` is a missing local path."""
    with pytest.raises(SourceNotFoundError, match="no such file"):
        resolve_source("checkpoints/vim.pth")
    with pytest.raises(SourceNotFoundError, match="no such file"):
        resolve_source("./vim_tiny")
