"""Vim against an independent, loop-by-loop reading of the official forward pass, and its facts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.models.vim import VimConfig, VisionMamba
from ssmtrim.ops import use_backend


def naive_vim_forward(sd: dict[str, torch.Tensor], cfg: VimConfig, images: torch.Tensor) -> torch.Tensor:
    """Written from the official forward pass, token by token, in float64: no code shared with ssmtrim.models.vim."""
    sd = {k: v.double() for k, v in sd.items()}
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.stride)
    x = x.flatten(2).transpose(1, 2)  # row-major patches
    m = x.shape[1]
    pos = m // 2
    cls = sd["cls_token"].expand(x.shape[0], 1, -1)
    x = torch.cat([x[:, :pos], cls, x[:, pos:]], 1) + sd["pos_embed"]
    final = naive_blocks(sd, cfg, x)
    return final[:, pos] @ sd["head.weight"].t() + sd["head.bias"]


def naive_rms(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def naive_blocks(sd: dict[str, torch.Tensor], cfg, x: torch.Tensor) -> torch.Tensor:
    """The official blocks ("add -> RMSNorm -> bidirectional v2 mixer", directions averaged) and the final norm over
    the token sequence x (B L D), float64 weights ``sd``, token by token: the final-normed tokens (B L D)."""

    def branch(p, s, xs, zs):  # xs, zs: (L, E) in scan order; s: "" forward, "_b" backward
        length, e = xs.shape
        w = sd[p + "conv1d" + s + ".weight"][:, 0]  # E K
        k = w.shape[1]
        xc = torch.zeros_like(xs)
        for t in range(length):
            acc = sd[p + "conv1d" + s + ".bias"].clone()
            for j in range(k):  # causal: position t sees t-k+1 .. t
                src = t - (k - 1) + j
                if src >= 0:
                    acc = acc + w[:, j] * xs[src]
            xc[t] = acc
        xc = F.silu(xc)
        dbl = xc @ sd[p + "x_proj" + s + ".weight"].t()
        r = cfg.dt_rank
        dt, bm, cm = dbl[:, :r], dbl[:, r : r + cfg.d_state], dbl[:, r + cfg.d_state :]
        delta = F.softplus(dt @ sd[p + "dt_proj" + s + ".weight"].t() + sd[p + "dt_proj" + s + ".bias"])
        a = -torch.exp(sd[p + ("A_b_log" if s else "A_log")])
        dvec = sd[p + "D" + s]
        h = torch.zeros(e, cfg.d_state, dtype=torch.float64)
        ys = torch.zeros_like(xs)
        for t in range(length):
            h = torch.exp(delta[t][:, None] * a) * h + (delta[t] * xc[t])[:, None] * bm[t][None, :]
            ys[t] = (h @ cm[t] + dvec * xc[t]) * F.silu(zs[t])
        return ys

    residual, hidden = None, x
    for i in range(cfg.depth):
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        normed = naive_rms(residual, sd[f"layers.{i}.norm.weight"])
        outs = []
        for b in range(normed.shape[0]):
            xz = normed[b] @ sd[p + "in_proj.weight"].t()
            xs, zs = xz[:, : cfg.d_inner], xz[:, cfg.d_inner :]
            y_f = branch(p, "", xs, zs)
            y_b = branch(p, "_b", xs.flip(0), zs.flip(0)).flip(0)
            outs.append(((y_f + y_b) / 2) @ sd[p + "out_proj.weight"].t())
        hidden = torch.stack(outs)
    return naive_rms(residual + hidden, sd["norm_f.weight"])


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value so that a wrong wiring cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "A_" in name or "dt_proj" in name else 0.2))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_vim_matches_independent_forward(backend):
    cfg = VimConfig(embed_dim=16, depth=2, img_size=24, patch_size=8, stride=8, num_classes=5)
    model = VisionMamba(cfg).eval()
    randomise(model)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    expected = naive_vim_forward(model.state_dict(), cfg, images)
    with torch.no_grad(), use_backend(backend):
        got = model(images)
    print(f"\nbackend {backend}: max |logit error| {(got.double() - expected).abs().max():.2e}")
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=2e-4)


def test_middle_class_token_position_and_head():
    cfg = VimConfig(embed_dim=16, depth=1, img_size=32, patch_size=8, stride=8, num_classes=3)
    assert cfg.num_patches == 16 and cfg.cls_position == 8
    model = VisionMamba(cfg).eval()
    tokens = model.embed(torch.zeros(1, 3, 32, 32))
    # with a zero image the patch tokens are the conv bias; the class token slot differs by cls_token
    diff = tokens[0] - model.pos_embed[0]
    torch.testing.assert_close(diff[8], model.cls_token[0, 0])
    torch.testing.assert_close(diff[0], model.patch_embed.proj.bias)


@pytest.mark.parametrize("name,params,tokens", [("vim_tiny", 7_148_008, 197), ("vim_small", 25_796_584, 197)])
def test_official_parameter_counts(name, params, tokens):
    model = ssmtrim.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.pos_embed.shape[1] == tokens
    assert model.config.dt_rank == math.ceil(model.config.embed_dim / 16)


def test_official_state_dict_keys_and_shapes():
    model = ssmtrim.create_model("vim_tiny")
    sd = model.state_dict()
    e, r = 384, 12
    expected = {
        "patch_embed.proj.weight": (192, 3, 16, 16), "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192),
        "head.weight": (1000, 192), "norm_f.weight": (192,), "layers.23.norm.weight": (192,),
        "layers.0.mixer.in_proj.weight": (2 * e, 192), "layers.0.mixer.conv1d.weight": (e, 1, 4),
        "layers.0.mixer.conv1d_b.bias": (e,), "layers.0.mixer.x_proj.weight": (r + 32, e),
        "layers.0.mixer.x_proj_b.weight": (r + 32, e), "layers.0.mixer.dt_proj.weight": (e, r),
        "layers.0.mixer.dt_proj_b.bias": (e,), "layers.0.mixer.A_log": (e, 16), "layers.0.mixer.A_b_log": (e, 16),
        "layers.0.mixer.D": (e,), "layers.0.mixer.D_b": (e,), "layers.0.mixer.out_proj.weight": (192, e),
    }  # fmt: skip
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.endswith(".bias") for k in sd if "in_proj" in k or "out_proj" in k)
    assert len(sd) == 7 + 24 * 17  # 7 top-level tensors; per layer norm, in/out_proj, 2 x 5 branch tensors, A, D


def test_infer_config_round_trip():
    from ssmtrim.models.vim import FAMILY

    for cfg in (VimConfig(embed_dim=192, depth=24), VimConfig(embed_dim=384, depth=24, stride=8),
                VimConfig(embed_dim=32, depth=3, img_size=32, patch_size=8, stride=8, num_classes=10)):
        shapes = {k: torch.empty(v.shape) for k, v in VisionMamba(cfg).state_dict().items()} if cfg.depth < 24 else \
            {k: torch.empty(v.shape) for k, v in ssmtrim.create_model(cfg).state_dict().items()}
        assert FAMILY.infer_config(shapes) == cfg


def test_batch_equals_single_images():
    model = ssmtrim.create_model("vim_test").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_wrong_input_size_is_a_clear_error():
    from ssmtrim.errors import ConfigError

    model = ssmtrim.create_model("vim_test")
    with pytest.raises(ConfigError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))


def test_registry_lists_every_family_whichever_is_imported_first():
    import subprocess
    import sys

    code = ("import ssmtrim.models.plainmamba; from ssmtrim.models.registry import find_spec; "
            "print(find_spec('vim_test') is not None, find_spec('plainmamba_test') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True True"
