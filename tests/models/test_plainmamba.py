"""PlainMamba: zig-zag orders, the mixer and a whole tiny model against naive re-implementations written from the
semantics of the official code, checkpoint conversion from the mmcls layout, config inference and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ssmtrim.errors import ConfigError
from ssmtrim.models.plainmamba import FAMILY, PlainMamba, PlainMambaConfig, PlainMambaMixer, zigzag_orders
from ssmtrim.models.registry import create_model, get_spec
from ssmtrim.ops import use_backend

# ---------------------------------------------------------------------------------------------------------------
# independent references

MOVE_IDS = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}  # right, left, up, down; 0 = start


def walk(h: int, w: int, start: tuple[int, int], inner: tuple[int, int], outer: tuple[int, int]):
    """Snake from ``start``: move along ``inner`` until the grid edge, then one step along ``outer`` and turn back.
    Returns (raster indices in path order, id of the move that arrived at each element)."""
    i, j = start
    order, moves = [], [0]
    while True:
        order.append(i * w + j)
        if len(order) == h * w:
            return order, moves
        if 0 <= i + inner[0] < h and 0 <= j + inner[1] < w:
            move = inner
        else:
            move, inner = outer, (-inner[0], -inner[1])
        i, j = i + move[0], j + move[1]
        moves.append(MOVE_IDS[move])


def walks(h: int, w: int):
    """The four official paths, each started where plain_mamba_layer.py starts it (not built by reversal)."""
    return [
        walk(h, w, (0, 0), (0, 1), (1, 0)),
        walk(h, w, (h - 1, w - 1), (0, -1), (-1, 0)) if h % 2 else walk(h, w, (h - 1, 0), (0, 1), (-1, 0)),
        walk(h, w, (0, 0), (1, 0), (0, 1)),
        walk(h, w, (h - 1, w - 1), (-1, 0), (0, -1)) if w % 2 else walk(h, w, (0, w - 1), (1, 0), (0, -1)),
    ]


def naive_mixer(m: PlainMambaMixer, x: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One PlainMamba2D forward with Python loops; returns (gated pre-out_proj output (B L E), output (B L C))."""
    bsz, length, _ = x.shape
    h, w = hw
    e, n, r = m.d_inner, m.d_state, m.dt_rank
    xz = x @ m.in_proj.weight.T + m.in_proj.bias
    xs, z = xz[..., :e], xz[..., e:]
    k = m.conv2d.weight.shape[-1]
    img = xs.transpose(1, 2).reshape(bsz, e, h, w)
    u = F.silu(F.conv2d(img, m.conv2d.weight, m.conv2d.bias, padding=k // 2, groups=e)).reshape(bsz, e, length)
    dbl = u.transpose(1, 2) @ m.x_proj.weight.T
    dt_low, b_raster, c_raster = dbl[..., :r], dbl[..., r : r + n], dbl[..., r + n :]
    bias = m.dt_proj.bias
    dt = dt_low @ m.dt_proj.weight.T + bias  # dt_proj adds the bias ...
    delta = F.softplus(dt + bias)  # ... and the scan adds it again
    a = -torch.exp(m.A_log)
    total = torch.zeros(bsz, length, e)
    for order, moves in walks(h, w):
        state = torch.zeros(bsz, e, n)
        for t in range(length):
            tok = order[t]  # x of the t-th token in path order, with dt, B, C of raster token t
            d_t = delta[:, t, :, None]
            b_t = b_raster[:, t] + m.direction_Bs[moves[t]]
            state = torch.exp(d_t * a) * state + d_t * b_t[:, None, :] * u[:, :, tok, None]
            total[:, tok] += (state * c_raster[:, t, None, :]).sum(-1) + m.D * u[:, :, tok]
    y = total * F.silu(z)
    return y, y @ m.out_proj.weight.T + m.out_proj.bias


def naive_model(model: PlainMamba, x: torch.Tensor) -> torch.Tensor:
    """The whole classifier from functional ops; needs an input whose token grid matches pos_embed."""

    def bn(t, mod):
        return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

    pe = model.patch_embed
    t = F.relu(bn(F.conv2d(x, pe.stem[0].weight, None, 2, 3), pe.stem[1]))
    for i in range(0, len(pe.convs or []), 3):
        t = F.relu(bn(F.conv2d(t, pe.convs[i].weight, None, 1, 1), pe.convs[i + 1]))
    s = model.config.patch_size // 2
    t = F.pad(t, (0, -t.shape[-1] % s, 0, -t.shape[-2] % s))  # 'corner': bottom and right only
    t = F.conv2d(t, pe.projection.weight, pe.projection.bias, s)
    hw = (t.shape[-2], t.shape[-1])
    tokens = t.flatten(2).transpose(1, 2) + model.pos_embed
    c = tokens.shape[-1]
    for layer in model.layers:
        normed = F.layer_norm(tokens, (c,), layer.norm.weight, layer.norm.bias, 1e-5)
        tokens = tokens + naive_mixer(layer.mamba, normed, hw)[1]
        if hasattr(layer, "dw"):  # replaces the stream, no residual
            grid = tokens.transpose(1, 2).reshape(-1, c, *hw)
            grid = F.gelu(bn(F.conv2d(grid, layer.dw[0].weight, None, 1, 1, groups=c), layer.dw[1]))
            tokens = grid.flatten(2).transpose(1, 2)
    pooled = F.layer_norm(tokens, (c,), model.ln1.weight, model.ln1.bias, 1e-6).mean(1)
    return pooled @ model.head.weight.T + model.head.bias


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter and BN statistic away from its initial value so that no term can hide."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.add_(0.3 * torch.rand(p.shape, generator=g))
        elif name.endswith("dt_proj.bias"):
            p.copy_(torch.empty(p.shape).uniform_(-4.0, -1.0, generator=g))
        elif name.endswith("direction_Bs"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=g))


def official_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys -> the mmcls ImageClassifier keys of the released checkpoints."""
    return {(k.replace("head.", "head.fc.", 1) if k.startswith("head.") else "backbone." + k): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# zig-zag orders

GRIDS = [(3, 4), (1, 5), (4, 1), (1, 1), (2, 2), (5, 3), (4, 6), (14, 14)]


@pytest.mark.parametrize("hw", GRIDS)
def test_zigzag_orders_are_continuous_paths(hw):
    h, w = hw
    orders, inverse, directions = zigzag_orders(h, w)
    assert orders.shape == inverse.shape == directions.shape == (4, h * w)
    assert orders.dtype == inverse.dtype == directions.dtype == torch.long
    for k in range(4):
        assert sorted(orders[k].tolist()) == list(range(h * w))
        assert torch.equal(orders[k][inverse[k]], torch.arange(h * w))
        rows, cols = orders[k] // w, orders[k] % w
        steps = (rows.diff().abs() + cols.diff().abs()).tolist()
        assert all(s == 1 for s in steps), f"direction {k} jumps on a {h}x{w} grid"
        assert directions[k, 0] == 0 and ((directions[k, 1:] >= 1) & (directions[k, 1:] <= 4)).all()
    assert torch.equal(orders[1], orders[0].flip(0))
    assert torch.equal(orders[3], orders[2].flip(0))
    # o1 starts rightwards along the first row, o3 downwards along the first column
    assert orders[0, : w].tolist() == list(range(w))
    assert orders[2, : h].tolist() == [i * w for i in range(h)]


@pytest.mark.parametrize("hw", GRIDS)
def test_zigzag_orders_match_explicit_walks(hw):
    orders, _, directions = zigzag_orders(*hw)
    for k, (order, moves) in enumerate(walks(*hw)):
        assert orders[k].tolist() == order, k
        assert directions[k].tolist() == moves, k


# ---------------------------------------------------------------------------------------------------------------
# mixer and model against the naive references


@pytest.mark.parametrize("backend", ["auto", "ref"])
@pytest.mark.parametrize("hw", [(3, 4), (5, 2)])
def test_mixer_matches_naive(backend, hw):
    torch.manual_seed(0)
    cfg = PlainMambaConfig(embed_dim=16, depth=1, d_state=4, conv_size=3)
    mixer = PlainMambaMixer(cfg)
    randomise(mixer)
    x = torch.randn(2, hw[0] * hw[1], 16)
    with torch.no_grad(), use_backend(backend):
        y, out = mixer.ssm_output(x, hw), mixer(x, hw)
        y_ref, out_ref = naive_mixer(mixer, x, hw)
    err_y, err_out = (y - y_ref).abs().max().item(), (out - out_ref).abs().max().item()
    print(f"mixer {hw} {backend}: max err ssm_output {err_y:.2e} (scale {y_ref.abs().max():.2e}), out {err_out:.2e}")
    assert y.shape == (2, hw[0] * hw[1], cfg.d_inner)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)


def test_mixer_rejects_partial_grid():
    mixer = PlainMambaMixer(PlainMambaConfig(embed_dim=16, depth=1))
    with pytest.raises(ConfigError, match="4x4 grid"):
        mixer(torch.randn(1, 15, 16), (4, 4))


@pytest.mark.parametrize("size", [64, 60])  # 60: the stem output (30x30) is padded to 32x32
def test_tiny_model_matches_naive(size):
    torch.manual_seed(0)
    model = create_model("plainmamba_test")
    randomise(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        ref = naive_model(model, x)
        feats = model.forward_features(x)
    print(f"model {size}px: max err {(logits - ref).abs().max().item():.2e} (scale {ref.abs().max():.2e})")
    assert logits.shape == (2, 10) and feats.shape == (2, 16, 32)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.forward_head(feats), logits)


def test_other_resolution_resizes_pos_embed():
    model = create_model("plainmamba_test").eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 80, 64))  # 5x4 token grid against a stored 4x4
    assert feats.shape == (1, 20, 32)
    assert torch.equal(model.pos_embed_for((4, 4)), model.pos_embed)


def test_tiny_model_backward():
    torch.manual_seed(0)
    model = create_model("plainmamba_test").train()
    loss = model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean()
    loss.backward()
    for name in ("layers.1.mamba.direction_Bs", "layers.1.mamba.A_log", "layers.0.dw.0.weight", "pos_embed"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# checkpoints, config inference, registry


def test_convert_official_layout_loads_strictly():
    torch.manual_seed(0)
    model = create_model("plainmamba_test")
    randomise(model)
    model.eval()
    sd = official_layout(model.state_dict())
    assert "backbone.layers.0.mamba.direction_Bs" in sd and "head.fc.weight" in sd
    assert "backbone.patch_embed.stem.1.num_batches_tracked" in sd
    sd["ema_backbone_pos_embed"] = torch.zeros(1)  # the EMA hook registers flat buffers on the classifier
    fresh = create_model("plainmamba_test").eval()
    fresh.load_state_dict(FAMILY.convert_state_dict(sd), strict=True)
    # without num_batches_tracked (older mmcv saves) the converter adds them
    no_tracked = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    fresh.load_state_dict(FAMILY.convert_state_dict(no_tracked), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_convert_leaves_our_layout_unchanged():
    sd = create_model("plainmamba_test").state_dict()
    converted = FAMILY.convert_state_dict(sd)
    assert list(converted) == list(sd) and all(converted[k] is sd[k] for k in sd)


def test_detect():
    sd = create_model("plainmamba_test").state_dict()
    assert FAMILY.detect(sd) and FAMILY.detect(official_layout(sd))
    assert not FAMILY.detect({"layers.0.mixer.A_b_log": torch.zeros(1), "pos_embed": torch.zeros(1)})


@pytest.mark.parametrize("name", ["plainmamba_l1", "plainmamba_l2", "plainmamba_l3", "plainmamba_test"])
def test_infer_config_recovers_registered_arch(name):
    arch = get_spec(name).arch
    with torch.device("meta"):  # shapes only: L3 has 50 M parameters
        sd = PlainMamba(arch).state_dict()
    assert FAMILY.infer_config(official_layout(sd)) == arch
    assert FAMILY.infer_config(sd) == arch


def test_parameter_counts():
    counts = {}
    for size in ("l1", "l2", "l3"):
        with torch.device("meta"):
            model = create_model(f"plainmamba_{size}")
        total = sum(p.numel() for p in model.parameters())
        counts[size] = (total, total - sum(p.numel() for p in model.head.parameters()))
    print("PlainMamba parameters (total, backbone):", counts)
    assert counts["l1"] == (7_551_656, 7_358_656)  # the official code with a 1000-class head
    assert abs(counts["l2"][1] / 25.7e6 - 1) < 0.01  # published backbone sizes, rounded to 0.1 M
    assert abs(counts["l3"][1] / 50.5e6 - 1) < 0.01


def test_registered_specs():
    l1 = get_spec("plainmamba_l1")
    assert l1.arch.layers_with_dwconv == (0,) and l1.arch.stem_convs == 1 and l1.arch.dt_rank == 12
    assert [(p.hub_id, p.filename, p.top1) for p in l1.pretrained] == [("ChenhongyiYang/PlainMamba", "l1.pth", 77.9)]
    assert get_spec("plainmamba_l3").arch.depth == 36 and get_spec("plainmamba_test").test_only
    assert PlainMambaConfig.from_dict(l1.arch.to_dict()) == l1.arch
    assert l1.arch.grid_size == (14, 14) and get_spec("plainmamba_test").arch.grid_size == (4, 4)


@pytest.mark.parametrize(
    ("field", "value"),
    [("embed_dim", 0), ("depth", -1), ("patch_size", 15), ("conv_size", 4), ("layers_with_dwconv", (0, 9)),
     ("dt_rank", 0), ("final_norm_eps", 0.0), ("stem_convs", -1), ("num_classes", -1)],
)  # fmt: skip
def test_config_validation_names_the_field(field, value):
    base = PlainMambaConfig(embed_dim=32, depth=2)
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(base, **{field: value})
