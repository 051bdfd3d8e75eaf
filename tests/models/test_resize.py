"""Models at another input size: the position embedding interpolated to the new token grid (ssmtrim/models/resize.py,
vim_resize.py, plainmamba_resize.py), through ``load_model(..., img_size=)`` and a saved folder."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.checkpoint import load_model
from ssmtrim.errors import ConfigError
from ssmtrim.models import registry
from ssmtrim.models.loading import num_tokens
from ssmtrim.models.resize import resize_model, resize_state_dict
from tests.conftest import randomize


def logits(model: torch.nn.Module, size: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(ssmtrim.create_model(name), seed)


# ---------------------------------------------------------------------------------------------------------------
# Vim: the middle class token comes out, the grid is resized, the token goes back in the new middle


def test_vim_32_to_64_keeps_the_class_token_and_resizes_the_grid():
    model = tiny("vim_test")  # patch 8 on 32: 4x4 grid, class token at 16 // 2 = 8
    config, sd = model.config, model.state_dict()
    new_config, new_sd = resize_state_dict(config, sd, 64)
    assert new_config == dataclasses.replace(config, img_size=64)
    assert (new_config.grid_size, new_config.cls_position, num_tokens(new_config)) == ((8, 8), 32, 65)
    old, new = sd["pos_embed"], new_sd["pos_embed"]
    assert new.shape == (1, 65, config.embed_dim) and new.dtype == old.dtype
    assert torch.equal(new[:, 32], old[:, 8])  # the class slot, moved to the new middle, unchanged
    # the patch slots: DeiT/Vim's bicubic resize (align_corners=False) of the 4x4 grid without the class slot
    grid = torch.cat([old[:, :8], old[:, 9:]], dim=1).reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(torch.cat([new[:, :32], new[:, 33:]], dim=1), want, rtol=0, atol=0)
    # every other tensor is passed through untouched
    assert all(new_sd[k] is v for k, v in sd.items() if k != "pos_embed")


def test_vim_class_slot_does_not_leak_into_the_grid_and_rows_stay_rows():
    config = registry.get_spec("vim_test").arch
    d = config.embed_dim
    cols = torch.arange(4, dtype=torch.float32).view(1, 1, 4, 1).expand(1, 4, 4, d).reshape(1, 16, d)  # x only
    pos = torch.cat([cols[:, :8], torch.full((1, 1, d), 1e6), cols[:, 8:]], dim=1)
    _, out = resize_state_dict(config, {"pos_embed": pos}, 64)
    new = out["pos_embed"]
    assert torch.equal(new[:, 32], torch.full((1, d), 1e6))
    grid = torch.cat([new[:, :32], new[:, 33:]], dim=1).reshape(8, 8, d)
    assert grid.abs().max() < 10  # no trace of the class slot's 1e6
    torch.testing.assert_close(grid, grid[:1].expand(8, 8, d))  # varies along x only, as the source did
    assert grid[0, -1, 0] > grid[0, 0, 0]


def test_vim_same_size_is_the_identity():
    model = tiny("vim_test")
    sd = model.state_dict()
    config, out = resize_state_dict(model.config, sd, 32)
    assert config == model.config
    assert all(torch.equal(out[k], v) for k, v in sd.items())
    assert resize_model(model, 32) is model


def test_vim_at_64_runs_and_its_folder_reloads_alone(write_official, tmp_path):
    model, path = write_official("vim_test")
    big = load_model(path, img_size=64)
    assert big.config.img_size == 64 and big.pos_embed.shape == (1, 65, 32) and not big.training
    assert big.data_config == dataclasses.replace(model_data := registry.get_spec("vim_test").data,
                                                  input_size=(3, 64, 64))
    assert big.data_config.crop_pct == model_data.crop_pct
    assert big.source.spec is None  # vim_test's name (and preprocessing) belongs to the 32x32 model
    y = logits(big, 64)
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    with pytest.raises(ConfigError, match="32x32"):  # the original model still takes only its own size
        logits(model, 64)

    folder = ssmtrim.save_model(big, tmp_path / "vim_64")
    again = load_model(folder)
    assert again.config == big.config and again.data_config == big.data_config
    torch.testing.assert_close(logits(again, 64), y, rtol=0, atol=0)
    # an ssmtrim folder resized again, and a plain state dict at 64 whose architecture is inferred
    back = load_model(folder, img_size=32)
    assert back.config == model.config and back.data_config.input_size == (3, 32, 32)
    torch.save(big.state_dict(), tmp_path / "vim_64.pth")
    assert load_model(tmp_path / "vim_64.pth").config == big.config


def test_bundled_vim_cifar_at_64_is_vim_cifar256():
    spec = registry.get_spec("vim_cifar256")
    assert (spec.arch.grid_size, spec.arch.num_patches, num_tokens(spec.arch)) == ((16, 16), 256, 257)
    assert spec.arch == dataclasses.replace(registry.get_spec("vim_cifar").arch, img_size=64)
    assert spec.data.input_size == (3, 64, 64) and spec.data.crop_pct == 1.0
    from ssmtrim.bundled import bundled_model

    small = load_model(bundled_model())
    big = load_model(bundled_model(), img_size=64)
    assert big.config == spec.arch and big.source.spec == "vim_cifar256" and big.data_config == spec.data
    assert torch.equal(big.pos_embed[:, 128], small.pos_embed[:, 32])
    assert bool(torch.isfinite(logits(big, 64)).all())


# ---------------------------------------------------------------------------------------------------------------
# PlainMamba: the grid only; the stored resize equals the one the official forward does on the fly


def test_plainmamba_resized_equals_its_on_the_fly_resize(write_official, tmp_path):
    model, path = write_official("plainmamba_test")  # patch 16 on 64: 4x4 grid
    big = load_model(path, img_size=128)
    assert big.config == dataclasses.replace(model.config, img_size=128)
    assert big.config.grid_size == (8, 8) and big.pos_embed.shape == (1, 64, 32)
    assert big.data_config.input_size == (3, 128, 128)
    y = logits(big, 128)
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, logits(model, 128), rtol=0, atol=1e-5)

    again = load_model(ssmtrim.save_model(big, tmp_path / "pm_128"))
    assert again.config == big.config and again.data_config == big.data_config
    torch.testing.assert_close(logits(again, 128), y, rtol=0, atol=0)


def test_plainmamba_same_size_is_the_identity():
    model = tiny("plainmamba_test")
    sd = model.state_dict()
    config, out = resize_state_dict(model.config, sd, 64)
    assert config == model.config and all(torch.equal(out[k], v) for k, v in sd.items())


# ---------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(("name", "size", "match"), [
    ("vim_test", 36, "does not tile into 8-pixel patches at stride 8; give 8 plus a multiple of 8, e.g. 32 or 40"),
    ("vim_test", 4, "smaller than one 8x8 patch"),
    ("vim_test", 0, "smaller than one 8x8 patch"),
    ("plainmamba_test", 72, "not a multiple of the patch stride 16; give e.g. 64 or 80"),
    ("plainmamba_test", 8, "smaller than one 16x16 patch"),
])  # fmt: skip
def test_bad_sizes_are_one_clear_sentence(name, size, match):
    model = tiny(name)
    with pytest.raises(ConfigError, match=match) as info:
        resize_model(model, size)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and message.replace("e.g.", "").count(". ") == 0


def test_a_pruned_model_is_refused():
    from ssmtrim.pruning import PruneConfig, apply_pruning

    model = apply_pruning(tiny("vim_test"), PruneConfig(layers=(2,), keep=(0.5,)))
    with pytest.raises(ConfigError, match="resize the dense model, then prune it again"):
        resize_model(model, 64)


class _Family:
    name = "fake"
    calls: list[int] = []

    def resize_state_dict(self, config, state_dict, img_size):
        self.calls.append(img_size)
        return config, state_dict


@dataclasses.dataclass(frozen=True)
class _FakeConfig:
    family = "fake"
    img_size: int = 8


def test_the_family_method_is_used_and_a_family_without_one_is_refused(monkeypatch):
    monkeypatch.setitem(registry._FAMILIES, "fake", _Family())
    assert resize_state_dict(_FakeConfig(), {}, 16) == (_FakeConfig(), {}) and _Family.calls == [16]

    class Bare:  # neither a method nor a tests.models.test_resize_resize module
        name = "fake"

    monkeypatch.setitem(registry._FAMILIES, "fake", Bare())
    with pytest.raises(ConfigError, match="the fake family cannot change its input size"):
        resize_state_dict(_FakeConfig(), {}, 16)
