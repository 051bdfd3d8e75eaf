"""MambaVision (NVlabs/MambaVision): checkpoints written here in the official layouts (the Hub's ``model.safetensors``
with the wrapper's ``model.`` prefix, the ``.pth.tar`` files' ``state_dict``) load and give the logits of an
independent re-implementation of the official forward on maps (``window_partition`` / ``window_reverse`` with
padding, the mixer's 'same' convs and float64 scan loop, attention written out), from the official source's
semantics (shared/specs/MODELS.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ssmtrim
from ssmtrim.models.mambavision import MambaVisionConfig
from ssmtrim.models.registry import get_family, get_spec
from tests.conftest import randomize


def _bn(x, sd, key, eps):
    return F.batch_norm(x, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"], sd[key + ".bias"],
                        False, 0.0, eps)


def _scan(u, delta, a, b, c, d):
    bsz, e, length = u.shape
    delta = F.softplus(delta)
    h = u.new_zeros(bsz, e, a.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * a) * h + delta[:, :, t, None] * b[:, None, :, t] * u[:, :, t, None]
        ys.append((h * c[:, None, :, t]).sum(-1))
    return torch.stack(ys, -1) + d[None, :, None] * u


def _mixer(x, sd, key):
    xz = F.linear(x, sd[key + ".in_proj.weight"]).transpose(1, 2)
    u, z = xz.chunk(2, dim=1)
    e = u.shape[1]
    u = F.silu(F.conv1d(u, sd[key + ".conv1d_x.weight"], padding="same", groups=e))
    z = F.silu(F.conv1d(z, sd[key + ".conv1d_z.weight"], padding="same", groups=e))
    n = sd[key + ".A_log"].shape[1]
    dbl = F.linear(u.transpose(1, 2), sd[key + ".x_proj.weight"])
    dt, b, c = torch.split(dbl, [dbl.shape[-1] - 2 * n, n, n], dim=-1)
    dt = F.linear(dt, sd[key + ".dt_proj.weight"], sd[key + ".dt_proj.bias"]).transpose(1, 2)
    y = _scan(u, dt + sd[key + ".dt_proj.bias"][None, :, None], -torch.exp(sd[key + ".A_log"]), b.transpose(1, 2),
              c.transpose(1, 2), sd[key + ".D"])  # the bias a second time, inside the scan
    return F.linear(torch.cat([y, z], dim=1).transpose(1, 2), sd[key + ".out_proj.weight"])


def _attention(x, sd, key, heads):
    bsz, length, dim = x.shape
    qkv = F.linear(x, sd[key + ".qkv.weight"], sd[key + ".qkv.bias"]).reshape(bsz, length, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(bsz, length, dim)
    return F.linear(out, sd[key + ".proj.weight"], sd[key + ".proj.bias"])


def official_logits(sd, cfg: MambaVisionConfig, x):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    x = F.relu(_bn(F.conv2d(x, sd["patch_embed.conv_down.0.weight"], stride=2, padding=1), sd,
                   "patch_embed.conv_down.1", 1e-4))
    x = F.relu(_bn(F.conv2d(x, sd["patch_embed.conv_down.3.weight"], stride=2, padding=1), sd,
                   "patch_embed.conv_down.4", 1e-4))
    for i, depth in enumerate(cfg.depths):
        key = f"levels.{i}"
        if f"{key}.blocks.0.conv1.weight" in sd:
            for j in range(depth):
                b = f"{key}.blocks.{j}"
                y = F.conv2d(x, sd[b + ".conv1.weight"], sd[b + ".conv1.bias"], padding=1)
                y = F.gelu(_bn(y, sd, b + ".norm1", 1e-5), approximate="tanh")
                y = _bn(F.conv2d(y, sd[b + ".conv2.weight"], sd[b + ".conv2.bias"], padding=1), sd, b + ".norm2", 1e-5)
                if b + ".gamma" in sd:
                    y = y * sd[b + ".gamma"].view(1, -1, 1, 1)
                x = x + y
        else:
            ws = cfg.window_size[i]
            _, c, h, w = x.shape
            pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
            x = F.pad(x, (0, pad_r, 0, pad_b))
            hp, wp = x.shape[-2:]
            t = x.view(x.shape[0], c, hp // ws, ws, wp // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
            for j in range(depth):
                b = f"{key}.blocks.{j}"
                y = F.layer_norm(t, (c,), sd[b + ".norm1.weight"], sd[b + ".norm1.bias"])
                y = _attention(y, sd, b + ".mixer", cfg.num_heads[i]) if b + ".mixer.qkv.weight" in sd else \
                    _mixer(y, sd, b + ".mixer")
                t = t + (sd[b + ".gamma_1"] * y if b + ".gamma_1" in sd else y)
                y = F.layer_norm(t, (c,), sd[b + ".norm2.weight"], sd[b + ".norm2.bias"])
                y = F.linear(F.gelu(F.linear(y, sd[b + ".mlp.fc1.weight"], sd[b + ".mlp.fc1.bias"])),
                             sd[b + ".mlp.fc2.weight"], sd[b + ".mlp.fc2.bias"])
                t = t + (sd[b + ".gamma_2"] * y if b + ".gamma_2" in sd else y)
            bsz = t.shape[0] // ((hp // ws) * (wp // ws))
            x = t.reshape(bsz, hp // ws, wp // ws, ws, ws, -1).permute(0, 5, 1, 3, 2, 4).reshape(bsz, c, hp, wp)
            x = x[:, :, :h, :w]
        if f"{key}.downsample.reduction.0.weight" in sd:
            x = F.conv2d(x, sd[f"{key}.downsample.reduction.0.weight"], stride=2, padding=1)
    x = _bn(x, sd, "norm", 1e-5).mean(dim=(2, 3))
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _sd(cfg: MambaVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    model = randomize(ssmtrim.create_model(cfg), seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_proj.bias")) or "gamma" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


CONFIGS = {
    # 48x48: levels at 12, 6, 3 (window 2: padded to 4) and 2 (window 2)
    "test": get_spec("mambavision_test").arch,
    # odd depth 3 (attention only in the last block), layer scale everywhere, non-square input
    "layer-scale": MambaVisionConfig(dim=16, in_dim=8, depths=(2, 1, 3, 1), num_heads=(2, 2, 4, 4),
                                     window_size=(8, 8, 4, 3), layer_scale=True, layer_scale_conv=True,
                                     img_size=(40, 56), num_classes=6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("layout", ["hub_safetensors", "pth_tar"])
def test_official_layouts_load_and_match_the_official_forward(tmp_path, name, layout):
    cfg = CONFIGS[name]
    sd = _sd(cfg)
    if layout == "hub_safetensors":  # the transformers wrapper holds the network as `self.model`
        path = tmp_path / "model.safetensors"
        save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "mambavision_tiny_1k.pth.tar"
        torch.save({"state_dict": sd, "epoch": 309, "arch": "mamba_vision_T", "version": 2}, path)
    model = ssmtrim.load_model(str(path), arch=cfg)
    assert type(model).__name__ == "MambaVision"
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    want = official_logits(sd, cfg, x)
    rel = float((got.double() - want).abs().max() / want.abs().max())
    assert rel <= 1e-4, rel


def test_backends_and_the_engine_follow_the_levels():
    from ssmtrim.pruning.config import PruneConfig
    from ssmtrim.pruning.engine import reduced_forward

    cfg = CONFIGS["test"]
    sd = _sd(cfg, seed=2)
    model = ssmtrim.create_model(cfg).eval()
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    want = official_logits(sd, cfg, x)
    for backend in ("ref", "cpu", "portable"):
        with torch.no_grad(), ssmtrim.use_backend(backend):
            rel = float((model(x).double() - want).abs().max() / want.abs().max())
        assert rel <= 1e-4, (backend, rel)
    with torch.no_grad():
        out = reduced_forward(model, x, PruneConfig(layers=(1,), keep=(1.0,)))
        assert torch.equal(out.logits, model(x))
    assert out.stats.tokens_per_block == [144.0, 36.0, 9.0, 9.0, 9.0, 4.0, 4.0]
    assert [tuple(m.shape[-2:]) for m in model.forward_stages(x)] == cfg.grids()


def test_infer_config_recognises_the_released_sizes():
    family = get_family("mambavision")
    for name in ("mambavision_t", "mambavision_b", "mambavision_l2"):
        with torch.device("meta"):
            sd = {f"model.{k}": v for k, v in ssmtrim.create_model(name).state_dict().items()}
        assert family.infer_config(sd) == get_spec(name).arch, name


def test_released_sizes_count_their_published_parameters_and_gflops():
    """The README's table (NVlabs/MambaVision, "ImageNet-1K"): T 31.8M / 4.4G, T2 35.1M / 5.1G, S 50.1M / 7.5G,
    B 97.7M / 15.0G, L 227.9M / 34.9G, L2 241.5M / 37.5G. The paper convention (multiply-accumulates of linear and
    conv layers, the scan's 9LEN + LE) within 2% (counted here for T; the others in the README's FLOPs table)."""
    from ssmtrim.flops import count_flops

    published = {"t": 31.8, "t2": 35.1, "s": 50.1, "b": 97.7, "l": 227.9, "l2": 241.5}
    for size, params in published.items():
        with torch.device("meta"):
            meta = ssmtrim.create_model(f"mambavision_{size}")
        assert abs(sum(p.numel() for p in meta.parameters()) / 1e6 / params - 1) < 1e-3, size  # the table rounds
    total = count_flops(ssmtrim.create_model("mambavision_t").eval(), convention="paper").total / 1e9
    assert abs(total / 4.4 - 1) < 0.02, total


def test_hub_model_safetensors_with_the_wrapper_prefix(hub_cache, tmp_path):
    cfg = get_spec("mambavision_t").arch
    sd = _sd(cfg, seed=5)
    path = tmp_path / "model.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    hub_cache.add("nvidia/MambaVision-T-1K", "model.safetensors", path)
    model = ssmtrim.load_model("mambavision_t")
    assert model.source.kind == "hub" and model.source.spec == "mambavision_t"
    assert torch.equal(model.state_dict()["head.weight"], sd["head.weight"])
