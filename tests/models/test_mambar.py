"""Mamba® (Vim with registers) against an independent float64 reading of the official forward pass, in the official
checkpoint layouts, on every CPU backend; its registers protected by every reduction strategy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import ConfigError
from ssmtrim.models.mambar import MambaRConfig
from ssmtrim.ops import use_backend
from ssmtrim.pruning import PruneConfig, strategy_names
from ssmtrim.pruning.engine import reduced_forward
from ssmtrim.pruning.strategies import get_strategy
from tests.conftest import vim_training_checkpoint
from tests.models.test_vim import naive_blocks, naive_rms, randomise
from tests.tolerance import assert_close_across_cpus

CFG = MambaRConfig(embed_dim=32, depth=3, img_size=40, patch_size=8, stride=8, num_classes=7, num_registers=4,
                   cls_reduce=2)


def naive_mambar_forward(sd: dict[str, torch.Tensor], cfg: MambaRConfig, images: torch.Tensor) -> torch.Tensor:
    """From the official forward: patches + pos_embed, registers (cls_token + pos_embed_cls) interleaved after every
    n // (P + 1) patches, the Vim blocks, the registers read after norm_f, neck and norm_neck, head. Float64, no code
    shared with ssmtrim.models."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.stride)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, p = x.shape[1], cfg.num_registers
    regs = (sd["cls_token"] + sd["pos_embed_cls"]).expand(x.shape[0], -1, -1)
    per = n // (p + 1)
    pieces, where, length = [], [], 0
    for j in range(p):
        pieces += [x[:, j * per : (j + 1) * per], regs[:, j : j + 1]]
        length += per
        where.append(length)
        length += 1
    seq = torch.cat([*pieces, x[:, p * per :]], 1)
    final = naive_blocks(sd, cfg, seq)[:, where]  # B P D
    if "neck.weight" in sd:
        feats = naive_rms((final @ sd["neck.weight"].t()).reshape(x.shape[0], -1), sd["norm_neck.weight"])
    else:
        feats = final.reshape(x.shape[0], -1)
    return feats @ sd["head.weight"].t() + sd["head.bias"]


def _model(cfg: MambaRConfig = CFG, seed: int = 0):
    torch.manual_seed(seed)
    model = ssmtrim.create_model(cfg).eval()
    randomise(model, seed)
    return model


@pytest.mark.parametrize("reduce", [1, 2])
def test_official_layouts_load_and_match_the_official_forward(tmp_path, hub_cache, reduce):
    """The DeiT-style training file (weights under ``model`` beside the optimizer, args...) the release ships, from a
    path and from the Hub cache; the architecture (registers, neck) inferred from the tensors."""
    import dataclasses

    cfg = dataclasses.replace(CFG, cls_reduce=reduce)
    model = _model(cfg)
    sd = model.state_dict()
    path = tmp_path / "mambar_cifar_run.pth"  # not a registered file name: the architecture is inferred
    torch.save(vim_training_checkpoint(sd), path)
    images = torch.randn(2, 3, 40, 40)
    expected = naive_mambar_forward(sd, cfg, images)
    hub_cache.add("Wangf3014/Mamba-Reg", path.name, path)
    for source in (str(path), f"Wangf3014/Mamba-Reg:{path.name}"):
        loaded = ssmtrim.load_model(source)
        assert loaded.config == cfg, source
        with torch.no_grad():
            assert_close_across_cpus(loaded(images).double(), expected, rtol=1e-4)


@pytest.mark.parametrize("backend", ["ref", "cpu", "portable"])
def test_every_backend_matches_the_official_forward(backend):
    model = _model()
    images = torch.randn(2, 3, 40, 40)
    expected = naive_mambar_forward(model.state_dict(), CFG, images)
    with use_backend(backend), torch.no_grad():
        assert_close_across_cpus(model(images).double(), expected, rtol=1e-4)


def test_registers_sit_where_the_official_layout_puts_them():
    # 25 patches, 4 registers: groups of 25 // 5 = 5 patches, a register after each of the first four
    assert CFG.register_positions == (5, 11, 17, 23)
    model = _model()
    order = model.order.tolist()
    assert [order[i] for i in CFG.register_positions] == [25, 26, 27, 28]
    assert sorted(order) == list(range(29))


def test_families_are_told_apart_by_their_tensors():
    from ssmtrim.models.loading import detect_family

    assert detect_family(_model().state_dict(), "x") == "mambar"
    assert detect_family(ssmtrim.create_model("vim_test").state_dict(), "x") == "vim"


@pytest.mark.parametrize("arrangement", strategy_names())
def test_every_strategy_keeps_the_registers(arrangement):
    model = _model()
    images = torch.randn(3, 3, 40, 40)
    plan = PruneConfig(arrangement=arrangement, keep=(0.7, 0.7), layers=(1, 2))
    if "subsampled_scan" in get_strategy(arrangement).needs(plan):  # QuarterMap: a 2-D cross-scan's, refused here
        with pytest.raises(ConfigError, match="strided part of the grid"):
            reduced_forward(model, images, plan)
        return
    with torch.no_grad():
        out = reduced_forward(model, images, plan)
    state = out.state
    assert state.cls_index.shape == (3, 4)
    registers = state.positions.gather(1, state.cls_index)
    assert registers.tolist() == [list(CFG.register_positions)] * 3  # each register, in order, at its own slot
    assert out.stats.tokens_per_block[0] == 29 and out.stats.tokens_per_block[-1] < 29
    assert torch.isfinite(out.logits).all()


def test_keeping_everything_is_the_dense_model_and_a_pruned_folder_reloads(tmp_path):
    model = _model()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        dense = model(images)
        assert torch.equal(reduced_forward(model, images, PruneConfig(keep=(1.0,), layers=(1,))).logits, dense)
    pruned = ssmtrim.prune(model, PruneConfig.recommended(model, keep=(0.7,)), torch.randn(8, 3, 40, 40)).model
    folder = ssmtrim.save_model(pruned, tmp_path / "pruned")
    again = ssmtrim.load_model(str(folder))
    with torch.no_grad():
        assert torch.equal(again(images), pruned(images))


def test_another_input_size_resizes_the_patch_positions_only():
    from ssmtrim.models.resize import resize_model

    model = _model()
    resized = resize_model(model, 56)
    assert resized.config.grid_size == (7, 7) and resized.pos_embed.shape == (1, 49, 32)
    assert torch.equal(resized.pos_embed_cls, model.pos_embed_cls)
    with torch.no_grad():
        assert resized(torch.randn(1, 3, 56, 56)).shape == (1, 7)


def test_released_sizes_have_the_official_shapes():
    """Head width D x (P / r) and the neck of each released size, as the official constructors build them."""
    for name, dim, registers, reduce in (("mambar_small", 384, 12, 2), ("mambar_base", 768, 12, 4),
                                         ("mambar_large", 1024, 16, 8)):
        spec = ssmtrim.models.registry.get_spec(name)
        cfg = spec.arch
        assert (cfg.embed_dim, cfg.num_registers, cfg.cls_reduce) == (dim, registers, reduce)
        assert cfg.head_features == dim * (registers // reduce)
        assert spec.pretrained[0].hub_id == "Wangf3014/Mamba-Reg"
        assert spec.data.crop_pct == 1.0


@pytest.mark.parametrize("name, millions", [("mambar_tiny", 9), ("mambar_small", 28), ("mambar_base", 99)])
def test_parameter_counts_are_the_papers(name, millions):
    """The paper's Table (arXiv 2405.14858): 9M, 28M, 99M parameters."""
    model = ssmtrim.create_model(name)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.5
