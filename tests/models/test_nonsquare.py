"""Non-square input sizes, ``img_size=(H, W)`` as the official Vim and PlainMamba take it: loading a square checkpoint
at (H, W) (the position embedding interpolated as the official fine-tuning code does), checkpoints whose position
embedding is not square, forwards against independent references, FLOPs, pruning + save + reload, and the CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.checkpoint import load_model
from ssmtrim.cli.app import app
from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.flops import count_flops_all
from ssmtrim.models.vim import VimConfig, VisionMamba
from ssmtrim.pruning import PruneConfig, apply_pruning
from tests.conftest import official_checkpoint, randomize
from tests.models.test_plainmamba import naive_model
from tests.models.test_plainmamba import randomise as randomise_plainmamba
from tests.models.test_vim import naive_vim_forward
from tests.models.test_vim import randomise as randomise_vim


def images(hw: tuple[int, int], n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.replace("e.g.", "").count(". ") == 0


def official_vim_resize(pos: torch.Tensor, cls_index: int, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Vim's fine-tuning resize written out: class slot out of the middle, bicubic (align_corners=False) on the
    (rows, columns) grid, class slot back at the new middle M' // 2."""
    cls = pos[:, cls_index : cls_index + 1]
    grid = torch.cat([pos[:, :cls_index], pos[:, cls_index + 1 :]], dim=1)
    grid = grid.reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    middle = dst[0] * dst[1] // 2
    return torch.cat([grid[:, :middle], cls, grid[:, middle:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# a square checkpoint loaded at (H, W)


@pytest.mark.parametrize("hw", [(32, 48), (48, 32)])  # 4x6 and 6x4: the same token count, so a swap would show
def test_vim_square_checkpoint_at_hw_interpolates_as_the_official_code(write_official, hw):
    model, path = write_official("vim_test")  # patch 8 on 32x32: a 4x4 grid, class slot at 8
    wide = load_model(path, img_size=hw)
    grid = (hw[0] // 8, hw[1] // 8)
    assert wide.config.img_size == hw and wide.config.grid_size == grid
    assert wide.config.cls_position == 12 and wide.pos_embed.shape == (1, 25, 32)
    assert wide.data_config.input_size == (3, *hw)
    want = official_vim_resize(model.pos_embed.detach(), 8, (4, 4), grid)
    torch.testing.assert_close(wide.pos_embed.detach(), want, rtol=0, atol=0)
    assert torch.equal(wide.pos_embed[:, 12], model.pos_embed[:, 8])  # the class slot itself is not interpolated
    y = logits(wide, images(hw))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    with pytest.raises(ConfigError, match=f"{hw[0]}x{hw[1]} images") as info:
        logits(wide, images((hw[1], hw[0])))
    assert one_sentence(str(info.value))


def test_plainmamba_square_checkpoint_at_hw_is_its_official_on_the_fly_resize(write_official):
    model, path = write_official("plainmamba_test")  # patch 16 on 64x64: a 4x4 grid
    wide = load_model(path, img_size=(64, 96))
    assert wide.config.img_size == (64, 96) and wide.config.grid_size == (4, 6) and wide.pos_embed.shape == (1, 24, 32)
    grid = model.pos_embed.detach().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(wide.pos_embed.detach(), want, rtol=0, atol=0)
    x = images((64, 96))
    # the official backbone takes any input and resizes pos_embed on the fly (mmcls resize_pos_embed): the same model
    torch.testing.assert_close(logits(wide, x), logits(model, x), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert wide.forward_features(x).shape == (2, 24, 32)


def test_square_pairs_and_lists_are_one_size_and_bad_sizes_are_one_sentence(write_official):
    _, path = write_official("vim_test")
    same = load_model(path, img_size=(32, 32))
    assert same.config == ssmtrim.get_spec("vim_test").arch and same.source.spec == "vim_test"
    assert load_model(path, img_size=[32, 48]).config.img_size == (32, 48)
    for size, match in [((32, 44), "--img-size width 44 does not tile into 8-pixel patches"),
                        ((4, 48), "--img-size height 4 is smaller than one 8x8 patch"),
                        ((32, 48, 3), "neither a whole number of pixels N nor a pair"),
                        ("32,48", "neither a whole number of pixels N nor a pair")]:
        with pytest.raises(ConfigError, match=match) as info:
            load_model(path, img_size=size)
        assert one_sentence(str(info.value))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints whose position embedding is not square


@pytest.mark.parametrize(("name", "hw", "other"), [("vim_test", (32, 48), (32, 64)),
                                                    ("plainmamba_test", (64, 96), (64, 128))])
def test_a_non_square_checkpoint_needs_its_size_and_loads_with_it(tmp_path, name, hw, other):
    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model(name, img_size=hw))
    path = tmp_path / f"{name}_wide.pth"
    torch.save(official_checkpoint(model), path)  # the official layout: nothing but tensors records the size
    with pytest.raises(CheckpointError, match="cannot be inferred; give that size with --img-size H,W") as info:
        load_model(path)
    assert one_sentence(str(info.value))
    with pytest.raises(CheckpointError, match="images do not make") as info:
        load_model(path, img_size=other)
    assert one_sentence(str(info.value))

    loaded = load_model(path, img_size=hw)
    assert loaded.config == model.config and loaded.data_config.input_size == (3, *hw)
    x = images(hw)
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)

    # an ssmtrim folder records the size: config.json holds it as a list, older square folders as an int
    folder = ssmtrim.save_model(loaded, tmp_path / "folder")
    assert json.loads((folder / "config.json").read_text())["arch"]["img_size"] == list(hw)
    again = load_model(folder)
    assert again.config == model.config and again.data_config == loaded.data_config
    torch.testing.assert_close(logits(again, x), logits(model, x), rtol=0, atol=0)
    # and so does the safetensors file taken out of its folder (its metadata carries the config)
    alone = tmp_path / "alone.safetensors"
    shutil.copyfile(folder / "model.safetensors", alone)
    assert load_model(alone).config == model.config
    # a non-square model resized again: from its own (h, w) grid, not a square one
    taller = load_model(folder, img_size=(hw[0] * 2, hw[1]))
    assert taller.config.img_size == (hw[0] * 2, hw[1])
    square = ssmtrim.save_model(ssmtrim.create_model(name), tmp_path / "square")
    assert isinstance(json.loads((square / "config.json").read_text())["arch"]["img_size"], int)


def test_vim_resize_from_a_non_square_grid_equals_the_official_resize():
    from ssmtrim.models.resize import resize_state_dict

    torch.manual_seed(0)
    model = randomize(ssmtrim.create_model("vim_test", img_size=(32, 48)))  # 4x6, class slot at 12
    config, sd = resize_state_dict(model.config, model.state_dict(), (48, 40))  # 6x5, class slot at 15
    assert config.grid_size == (6, 5) and config.cls_position == 15
    want = official_vim_resize(model.pos_embed.detach(), 12, (4, 6), (6, 5))
    torch.testing.assert_close(sd["pos_embed"], want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# the dense forward at (H, W) against independent references


def test_vim_at_hw_matches_the_independent_forward():
    cfg = VimConfig(embed_dim=16, depth=2, img_size=(16, 32), patch_size=8, stride=8, num_classes=5)  # 2x4, cls at 4
    model = VisionMamba(cfg).eval()
    randomise_vim(model)
    x = images((16, 32))
    expected = naive_vim_forward(model.state_dict(), cfg, x)  # its class slot is m // 2 of the real token count
    torch.testing.assert_close(logits(model, x).double(), expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("hw", [(64, 96), (96, 48)])
def test_plainmamba_at_hw_matches_the_independent_forward(hw):
    torch.manual_seed(0)
    model = ssmtrim.create_model("plainmamba_test", img_size=hw)
    randomise_plainmamba(model)
    model.eval()
    x = images(hw)
    # naive_model walks the four zig-zag paths itself, started where the official code starts them on an h x w grid
    torch.testing.assert_close(logits(model, x), naive_model(model, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def test_flops_follow_the_non_square_grid():
    vim = count_flops_all("vim_test", img_size=(32, 48))
    cfg = ssmtrim.create_model("vim_test", img_size=(32, 48)).config
    assert vim["paper"].input_size == (3, 32, 48) and vim["paper"].tokens_per_layer == [25] * cfg.depth
    patches = cfg.embed_dim * 3 * 8 * 8 * 24 + cfg.embed_dim * cfg.num_classes  # patch conv + head
    assert vim["paper"].by_operator["conv+linear outside mixers"] == patches
    assert vim["paper"].by_operator["in_proj"] == cfg.depth * 25 * cfg.embed_dim * 2 * cfg.d_inner

    plain = count_flops_all("plainmamba_test", img_size=(64, 96))
    c = ssmtrim.create_model("plainmamba_test", img_size=(64, 96)).config
    assert plain["paper"].tokens_per_layer == [24] * c.depth
    s = c.stem_channels
    stem = 32 * 48 * s * (3 * 49 + c.stem_convs * s * 9)  # 7x7/2 conv, then 3x3 convs, on the 32x48 stem grid
    outside = stem + 24 * c.embed_dim * s * 8 * 8 + 24 * c.embed_dim * 9 + c.embed_dim * c.num_classes  # + dw, head
    assert plain["paper"].by_operator["conv+linear outside mixers"] == outside
    assert plain["paper"].by_operator["in_proj"] == c.depth * 24 * c.embed_dim * 2 * c.d_inner


# ---------------------------------------------------------------------------------------------------------------
# pruning a non-square model


@pytest.mark.parametrize(("name", "hw", "layers"), [("vim_test", (32, 48), (1, 3)),
                                                     ("vim_test", (24, 40), (1, 3)),  # 3x5: an odd patch count
                                                     ("plainmamba_test", (64, 96), (1,))])
@pytest.mark.parametrize("arrangement", ["align", "keep-order", "merge"])
def test_pruned_non_square_model_saves_and_reloads(write_official, tmp_path, name, hw, layers, arrangement):
    _, path = write_official(name)
    model = load_model(path, img_size=hw)
    x = images(hw, n=3)
    dense = logits(model, x)
    full = apply_pruning(load_model(path, img_size=hw), PruneConfig(layers=layers, keep=(1.0,) * len(layers),
                                                                    arrangement=arrangement))
    torch.testing.assert_close(logits(full, x), dense, rtol=0, atol=1e-5)  # nothing removed: the dense model

    apply_pruning(model, PruneConfig(layers=layers, keep=(0.5,) * len(layers), arrangement=arrangement))
    before = logits(model, x)
    assert before.shape == (3, 10) and not torch.allclose(before, dense)
    folder = ssmtrim.save_model(model, tmp_path / "pruned")
    again = load_model(folder)
    assert again.config.img_size == hw and again.prune_config == model.prune_config
    torch.testing.assert_close(logits(again, x), before, rtol=0, atol=0)
    assert load_model(folder, img_size=hw).config.img_size == hw  # its own size: nothing to refuse
    with pytest.raises(ConfigError, match="resize the dense model, then prune it again") as info:
        load_model(folder, img_size=hw[::-1])
    assert one_sentence(str(info.value))


# ---------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def eval_images(root, hw: tuple[int, int], crop_pct: float, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's eval transform for a non-square size, written out: resize to (H, W) / crop_pct, center-crop (H, W)."""
    xs, ys = [], []
    for label, cls in enumerate(("cat", "dog")):
        for path in sorted((root / cls).iterdir()):
            img = Image.open(path).convert("RGB")
            big_h, big_w = math.floor(hw[0] / crop_pct), math.floor(hw[1] / crop_pct)
            img = img.resize((big_w, big_h), Image.Resampling.BICUBIC)
            left, top = round((big_w - hw[1]) / 2), round((big_h - hw[0]) / 2)
            arr = np.asarray(img.crop((left, top, left + hw[1], top + hw[0])), dtype=np.float32) / 255.0
            xs.append(torch.from_numpy(((arr - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1).copy()))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def test_eval_transform_at_hw_is_timms(image_folder):
    from ssmtrim.data import eval_transform, load_rgb
    from ssmtrim.models.registry import DataConfig

    data = DataConfig(input_size=(3, 32, 48), crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x, _ = eval_images(image_folder, (32, 48), data.crop_pct, data.mean, data.std)
    paths = [p for cls in ("cat", "dog") for p in sorted((image_folder / cls).iterdir())]
    got = torch.stack([eval_transform(load_rgb(str(p)), data) for p in paths])
    torch.testing.assert_close(got, x, rtol=0, atol=0)


def test_teacher_of_a_non_square_pruned_model_is_loaded_at_its_size(write_official):
    from ssmtrim.training.recipes import teacher_for

    _, path = write_official("vim_test")
    pruned = apply_pruning(load_model(path, img_size=(32, 48)), PruneConfig(layers=(2,), keep=(0.5,)))
    teacher = teacher_for(pruned, str(path))  # the square dense checkpoint, interpolated to the pruned model's grid
    assert teacher.config == load_model(path, img_size=(32, 48)).config
    torch.testing.assert_close(teacher.pos_embed, load_model(path, img_size=(32, 48)).pos_embed, rtol=0, atol=0)


def test_cli_eval_at_hw_on_a_tiny_folder(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    torch.manual_seed(0)
    dense = randomize(ssmtrim.create_model("vim_test", num_classes=2))
    path = tmp_path / "two_class.pth"
    torch.save({"model": dense.state_dict()}, path)
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(path), "--img-size", "32,48", "--data", str(image_folder), "--json",
                                 "--workers", "0", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    model = load_model(path, img_size=(32, 48))
    data = model.data_config
    x, y = eval_images(image_folder, (32, 48), data.crop_pct, data.mean, data.std)
    top1 = 100 * (logits(model, x).argmax(1) == y).float().mean().item()
    assert got["num_images"] == 6 and got["top1"] == pytest.approx(top1)

    for args, match in [(["--img-size", "32x"], "--img-size takes N or H,W"),
                        (["--img-size", "32,44"], "--img-size width 44 does not tile")]:
        result = runner.invoke(app, ["eval", str(path), "--data", str(image_folder), *args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and match in lines[0], result.output


def test_cli_flops_info_and_prune_take_hw(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("SSMTRIM_DEBUG", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["flops", "vim_test", "--img-size", "32,48", "--json"])
    assert result.exit_code == 0, result.output
    paper = json.loads(result.stdout)["conventions"]["paper"]
    assert paper["input_size"] == [3, 32, 48] and paper["tokens_per_layer"] == [25] * 4
    result = runner.invoke(app, ["info", "plainmamba_test", "--img-size", "64,96", "--json"])
    assert result.exit_code == 0, result.output
    described = json.loads(result.stdout)
    assert described["tokens"] == 24 and described["input_size"] == [3, 64, 96]
    assert described["preprocessing"]["center_crop"] == "64x96"

    torch.manual_seed(0)
    path = tmp_path / "dense.pth"
    torch.save({"model": randomize(ssmtrim.create_model("vim_test", num_classes=2)).state_dict()}, path)
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(path), "--img-size", "32,48", "--data", str(image_folder), "--layers",
                                 "2", "--keep", "0.5", "-o", str(out), "--json", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens_per_block"][:2] == [25, 25] and summary["tokens_per_block"][2] < 25
    pruned = load_model(out)
    assert pruned.config.img_size == (32, 48) and pruned.data_config.input_size == (3, 32, 48)
    result = runner.invoke(app, ["eval", str(out), "--img-size", "32,48", "--data", str(image_folder), "--json",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 6
