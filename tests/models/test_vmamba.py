"""VMamba (MzeroMiko/VMamba, released v2 classification models): checkpoints written here in the official layouts load
and give the logits of an independent re-implementation of the official forward (channel-first, 1x1 convs as in
``Linear2d``, the grouped-conv1d projections of ``forward_type='v05_noz'``, ``cross_scan`` / ``cross_merge`` and a
float64 selective-scan loop), written from the official source's semantics (shared/specs/MODELS.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ssmtrim
from ssmtrim.errors import CheckpointError
from ssmtrim.models.registry import get_family, get_spec
from ssmtrim.models.vmamba import VMambaConfig
from tests.conftest import randomize
from tests.tolerance import assert_close_across_cpus

# ----------------------------------------------------------------------------------------------------------------
# the official forward, re-implemented from its semantics on a state dict in the official layout (float64)


def _ln2d(x, sd, key, eps=1e-5):
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)
    return x.permute(0, 3, 1, 2)


def _linear2d(x, sd, key):
    w = sd[key + ".weight"]
    w = w if w.dim() == 4 else w[:, :, None, None]
    return F.conv2d(x, w, sd.get(key + ".bias"))


def _scan(u, delta, a, b, c, d, delta_bias):
    """selective_scan_ref with grouped B and C: u, delta (B KD L), a (KD N), b, c (B K N L), d (KD)."""
    bsz, kd, length = u.shape
    k = b.shape[1]
    rep = kd // k
    delta = F.softplus(delta + delta_bias[None, :, None])
    bx, cx = b.repeat_interleave(rep, dim=1), c.repeat_interleave(rep, dim=1)  # B KD N L
    h = u.new_zeros(bsz, kd, a.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * a) * h + delta[:, :, t, None] * bx[..., t] * u[:, :, t, None]
        ys.append((h * cx[..., t]).sum(-1))
    return torch.stack(ys, -1) + d[None, :, None] * u


def _ss2d(x, sd, key):
    x = _linear2d(x, sd, key + ".in_proj")
    x = F.silu(F.conv2d(x, sd[key + ".conv2d.weight"], sd.get(key + ".conv2d.bias"), padding=1, groups=x.shape[1]))
    bsz, d, h, w = x.shape
    length, k = h * w, 4
    xw = sd[key + ".x_proj_weight"]  # K (R+2N) D
    n = sd[key + ".A_logs"].shape[1]
    r = xw.shape[1] - 2 * n
    xs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
    xs = torch.cat([xs, xs.flip(-1)], dim=1)  # B K D L
    x_dbl = F.conv1d(xs.reshape(bsz, -1, length), xw.reshape(-1, d, 1), groups=k)
    dts, bs, cs = torch.split(x_dbl.view(bsz, k, -1, length), [r, n, n], dim=2)
    dts = F.conv1d(dts.reshape(bsz, -1, length), sd[key + ".dt_projs_weight"].reshape(k * d, -1, 1), groups=k)
    ys = _scan(xs.reshape(bsz, -1, length), dts, -torch.exp(sd[key + ".A_logs"]), bs, cs, sd[key + ".Ds"],
               sd[key + ".dt_projs_bias"].reshape(-1)).view(bsz, k, d, length)
    y = ys[:, 0:2] + ys[:, 2:].flip(-1)
    y = y[:, 0] + y[:, 1].view(bsz, d, w, h).transpose(2, 3).reshape(bsz, d, length)
    y = _ln2d(y.view(bsz, d, h, w), sd, key + ".out_norm")
    return _linear2d(y, sd, key + ".out_proj")


def official_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    x = x.double()
    if "patch_embed.5.weight" in sd:
        x = F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=2, padding=1)
        x = F.gelu(_ln2d(x, sd, "patch_embed.2"))
        x = F.conv2d(x, sd["patch_embed.5.weight"], sd["patch_embed.5.bias"], stride=2, padding=1)
        x = _ln2d(x, sd, "patch_embed.7")
    else:
        p = sd["patch_embed.0.weight"].shape[-1]
        x = _ln2d(F.conv2d(x, sd["patch_embed.0.weight"], sd["patch_embed.0.bias"], stride=p), sd, "patch_embed.2")
    stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(stages):
        j = 0
        while f"layers.{i}.blocks.{j}.norm.weight" in sd:
            key = f"layers.{i}.blocks.{j}"
            x = x + _ss2d(_ln2d(x, sd, key + ".norm"), sd, key + ".op")
            x = x + _linear2d(F.gelu(_linear2d(_ln2d(x, sd, key + ".norm2"), sd, key + ".mlp.fc1")), sd,
                              key + ".mlp.fc2")
            j += 1
        if f"layers.{i}.downsample.1.weight" in sd:
            ds = sd[f"layers.{i}.downsample.1.weight"]
            x = F.conv2d(x, ds, sd[f"layers.{i}.downsample.1.bias"], stride=2, padding=1 if ds.shape[-1] == 3 else 0)
            x = _ln2d(x, sd, f"layers.{i}.downsample.3")
    x = F.adaptive_avg_pool2d(_ln2d(x, sd, "classifier.norm"), 1).flatten(1)
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


# ----------------------------------------------------------------------------------------------------------------


def _official_sd(config: VMambaConfig, seed: int = 0, conv_linear: bool = False) -> dict[str, torch.Tensor]:
    model = randomize(ssmtrim.create_model(config), seed)
    with torch.no_grad():  # a trained-like spread of A, D and dt, so that every route's scan matters
        for name, p in model.named_parameters():
            if name.endswith(("A_logs", "Ds", "dt_projs_bias")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if conv_linear:  # Linear2d weights saved as 1x1 convs
        for k in [k for k in sd if k.endswith(("in_proj.weight", "out_proj.weight", "fc1.weight", "fc2.weight"))]:
            sd[k] = sd[k][:, :, None, None]
    return sd


CONFIGS = {
    "v2v": VMambaConfig(dims=(16, 32, 48), depths=(1, 2, 1), img_size=40, num_classes=7),  # 10x10 -> 5x5 -> 3x3
    "v2-ratio2-state4": VMambaConfig(dims=(16, 32), depths=(2, 1), img_size=(24, 40), num_classes=5, ssm_ratio=2.0,
                                     d_state=4, conv_bias=True),
    "v1-stem-v2-down": VMambaConfig(dims=(16, 32), depths=(1, 1), img_size=32, num_classes=3, stem="v1",
                                    downsample_kernel=2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("wrapper", ["release", "state_dict", "conv_linear"])
def test_official_layouts_load_and_match_the_official_forward(tmp_path, name, wrapper):
    config = CONFIGS[name]
    sd = _official_sd(config, conv_linear=wrapper == "conv_linear")
    path = tmp_path / "vssm_ckpt_epoch_1.pth"
    if wrapper == "release":  # the release files: {'model': ..., 'epoch': ..., 'max_accuracy': ...}
        torch.save({"model": sd, "epoch": 264, "max_accuracy": 82.6}, path)
    else:
        torch.save(sd, path)
    model = ssmtrim.load_model(str(path))
    assert type(model).__name__ == "VMamba"
    assert model.config.dims == config.dims and model.config.depths == config.depths
    h, w = (config.img_size, config.img_size) if isinstance(config.img_size, int) else config.img_size
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    # two code paths (float32 against the float64 reference): top-1 compared where the margin exceeds the tolerance
    assert_close_across_cpus(got.double(), official_logits(sd, x), rtol=1e-4)


def test_every_stage_and_backend_matches(tmp_path):
    """The cross-scan on the C kernel (``cpu``), the readable loop (``ref``) and the parallel ``portable`` scan."""
    config = CONFIGS["v2v"]
    sd = _official_sd(config, seed=3)
    model = ssmtrim.create_model(config).eval()
    model.load_state_dict(sd)
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    want = official_logits(sd, x)
    for backend in ("ref", "cpu", "portable"):
        with torch.no_grad(), ssmtrim.use_backend(backend):
            got = model(x)
        rel = float((got.double() - want).abs().max() / want.abs().max())
        assert rel <= 1e-4, (backend, rel)
    maps = model.forward_stages(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 10, 10), (32, 5, 5), (48, 3, 3)]
    assert [m.shape[-2:] for m in maps] == [torch.Size(g) for g in config.grids()]


def test_legacy_names_are_renamed_as_the_official_loader_does(tmp_path):
    sd = _official_sd(CONFIGS["v2v"], seed=4)
    legacy = {}
    for k, v in sd.items():
        k = k.replace("classifier.norm.", "norm.").replace("classifier.head.", "head.")
        k = k.replace(".op.", ".self_attention.")
        legacy["module." + k] = v
    torch.save({"model": legacy}, tmp_path / "old.pth")
    model = ssmtrim.load_model(str(tmp_path / "old.pth"))
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        rel = float((model(x).double() - official_logits(sd, x)).abs().max() / official_logits(sd, x).abs().max())
    assert rel <= 1e-4


def test_a_training_file_with_a_pickled_config_object_is_refused_in_one_sentence(tmp_path):
    sd = _official_sd(CONFIGS["v1-stem-v2-down"])
    torch.save({"model": sd, "config": _Config(), "epoch": 3}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError) as err:
        ssmtrim.load_model(str(tmp_path / "train.pth"))
    message = str(err.value)
    assert "refuses" in message and message.count(". ") <= 1 and message.endswith(".")


class _Config:  # stands in for the yacs CfgNode a VMamba training file holds
    pass


def test_a_gated_forward_type_is_refused_with_what_loads():
    sd = _official_sd(CONFIGS["v2v"])
    sd["layers.0.blocks.0.op.in_proj.weight"] = torch.randn(32, 16)  # x and z: a v0/v2 gated forward type
    with pytest.raises(CheckpointError, match="v05_noz"):
        get_family("vmamba").infer_config(sd)


def test_released_sizes_count_their_published_gflops_and_parameters():
    """VMamba's README (classification table): T[s1l8] 30M / 4.9G, S[s2l15] 50M / 8.7G, B[s2l15] 89M / 15.4G, counted
    by the official ``flops()`` (fvcore plus 9LDN + LD per scan). Both conventions within 2%."""
    from ssmtrim.flops import count_flops

    published = {"vmamba_tiny": (30, 4.9), "vmamba_small": (50, 8.7), "vmamba_base": (89, 15.4)}
    for name, (params, gflops) in published.items():
        with torch.device("meta"):
            meta = ssmtrim.create_model(name)
        assert abs(sum(p.numel() for p in meta.parameters()) / 1e6 - params) < 0.6, name
        if name != "vmamba_tiny":
            continue  # one count suffices here (each takes seconds); the others: benchmarks/flops_table.py
        model = ssmtrim.create_model(name).eval()
        for convention in ("paper", "full"):
            total = count_flops(model, convention=convention).total / 1e9
            assert abs(total / gflops - 1) < 0.02, (name, convention, total)


def test_infer_config_finds_the_registered_size():
    with torch.device("meta"):
        sd = ssmtrim.create_model("vmamba_tiny").state_dict()
    config = get_family("vmamba").infer_config(sd)
    assert config == get_spec("vmamba_tiny").arch
    assert math.isclose(config.ssm_ratio, 1.0) and config.dt_rank == 0


def test_the_engine_follows_the_stages():
    """Dense through the reduction engine: the tokens change grid at each downsample (tokens per block measured) and
    the logits are the model's."""
    from ssmtrim.pruning.config import PruneConfig
    from ssmtrim.pruning.engine import reduced_forward

    model = randomize(ssmtrim.create_model(CONFIGS["v2v"]))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out = reduced_forward(model, x, PruneConfig(layers=(1,), keep=(1.0,)))
        dense = model(x)
    assert torch.equal(out.logits, dense)
    assert out.stats.tokens_per_block == [100.0, 25.0, 25.0, 9.0]
    assert out.state.grid == (3, 3)
