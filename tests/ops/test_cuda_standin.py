"""The ``cuda`` backend on CPU, through the stand-in for mamba-ssm and causal-conv1d (``tests/ops/mamba_standin.py``):
first the stand-in's contracts, then the backend against ``ref``: the scan with its gap folded into Δ and u, every
dtype the kernel takes, bf16/fp16 autocast, the dense, pruned and aligned forwards of Vim and PlainMamba, and the
backward of a fine-tune."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ssmtrim
from ssmtrim.ops import selective_scan, selective_scan_ref, use_backend
from ssmtrim.ops.backends import cuda as cuda_backend
from ssmtrim.ops.conv import causal_conv1d_silu
from ssmtrim.pruning import PruneConfig, apply_pruning
from tests.ops import mamba_standin
from tests.ops.test_selective_scan import make_inputs, run


def detached(inputs: dict) -> dict:
    return {k: (v.detach() if v is not None else None) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------------------
# the stand-in keeps the kernels' contracts


@pytest.fixture
def standin():
    calls = mamba_standin.Calls()
    return mamba_standin.make_selective_scan_fn(calls), mamba_standin.make_causal_conv1d_fn(calls), calls


def test_standin_scan_refuses_what_the_kernel_refuses(standin):
    scan_fn, _, _ = standin
    x = detached(make_inputs(e=4, length=7, n=3))
    args = lambda **kw: {**{k: x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}, **kw}  # noqa: E731
    scan_fn(**args())  # the reference call is accepted
    bad = {
        "delta in another dtype than u": args(delta=x["delta"].bfloat16()),
        "B in another dtype than u": args(B=x["B"].half()),
        "fp64 input": {k: (v.double() if k in ("u", "delta", "B", "C", "z") else v) for k, v in args().items()},
        "A not fp32": args(A=x["A"].bfloat16()),
        "D not fp32": args(D=x["D"].bfloat16()),
        "delta_bias not fp32": args(delta_bias=x["delta_bias"].half()),
        "delta_bias with a stride": args(delta_bias=torch.randn(8)[::2]),
        "z in another dtype": args(z=x["z"].bfloat16()),
        "a state above 256": args(A=-torch.rand(4, 257), B=torch.randn(2, 257, 7), C=torch.randn(2, 257, 7)),
        "B and C with different groups": args(B=torch.randn(2, 2, 3, 7), C=torch.randn(2, 1, 3, 7)),
        "groups that do not divide the channels": args(B=torch.randn(2, 3, 3, 7), C=torch.randn(2, 3, 3, 7)),
        "a wrong length": args(B=torch.randn(2, 3, 6)),
    }
    for what, kwargs in bad.items():
        with pytest.raises(RuntimeError):
            scan_fn(**kwargs)
            pytest.fail(f"accepted {what}")
    with pytest.raises(NotImplementedError):
        scan_fn(**args(B=torch.randn(4, 3)))  # constant B: real, but not modelled


def test_standin_scan_layouts_dtypes_and_last_state(standin):
    scan_fn, _, calls = standin
    x = detached(make_inputs(e=4, length=9, n=3, dtype=torch.bfloat16))
    del x["gap"]  # not a kernel argument
    x["A"], x["D"], x["delta_bias"] = x["A"].float(), x["D"].float(), x["delta_bias"].float()
    out, last = scan_fn(**x, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32 and last.shape == (2, 4, 3)
    ref = selective_scan_ref(**x, delta_softplus=True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # the (batch, groups, dstate, L) layout: each half of the channels reads its own B and C
    g = torch.Generator().manual_seed(2)
    B4, C4 = torch.randn(2, 2, 3, 9, generator=g).bfloat16(), torch.randn(2, 2, 3, 9, generator=g).bfloat16()
    grouped = scan_fn(**dict(x, B=B4, C=C4), delta_softplus=True)
    for grp, ch in enumerate((slice(0, 2), slice(2, 4))):
        part = {k: (v[:, ch] if k in ("u", "delta", "z") else v[ch] if k in ("A", "D", "delta_bias") else v)
                for k, v in x.items()}
        expected = selective_scan_ref(**dict(part, B=B4[:, grp], C=C4[:, grp]), delta_softplus=True)
        torch.testing.assert_close(grouped[:, ch], expected, atol=0, rtol=0)
    # non-unit last strides are copied by the wrapper; a gradient reaching the last state is dropped, as documented
    leaves = {k: v.float().requires_grad_(True) for k, v in x.items()}
    leaves["B"] = torch.randn(2, 9, 3, generator=g).transpose(1, 2).requires_grad_(True)
    out, last = scan_fn(**leaves, delta_softplus=True, return_last_state=True)
    last.sum().backward()
    assert calls.scan_backward == 1 and leaves["u"].grad.abs().max() == 0 and leaves["B"].grad.shape == (2, 3, 9)


def test_standin_conv_contract_values_and_layout(standin):
    _, conv_fn, _ = standin
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    x = torch.randn(2, 16, 11, generator=g)
    expected = F.silu(F.conv1d(x, weight[:, None], bias, padding=3, groups=16)[..., :11])
    torch.testing.assert_close(conv_fn(x, weight, bias, activation="silu"), expected)
    channel_last = torch.randn(2, 11, 32, generator=g)[..., :16].transpose(1, 2)  # strides (352, 1, 32)
    out = conv_fn(channel_last, weight, bias, activation="swish")
    assert out.stride() == (176, 1, 16)  # empty_like(x): x's order of strides, made dense
    torch.testing.assert_close(out, conv_fn(channel_last.contiguous(), weight, bias, activation="silu"))
    with pytest.raises(NotImplementedError):
        conv_fn(x, weight, bias, activation="relu")
    with pytest.raises(RuntimeError):
        conv_fn(x, torch.randn(16, 5), bias)  # width 5
    with pytest.raises(RuntimeError):
        conv_fn(x, weight, bias.half())  # bias not in weight's dtype
    odd = torch.randn(2, 11, 24, generator=g)[..., :12].transpose(1, 2)  # channel-last with 12 channels
    with pytest.raises(RuntimeError, match="divisible by 8"):
        conv_fn(odd, weight[:12], bias[:12])


# ---------------------------------------------------------------------------------------------------------------
# the cuda backend's scan against ref


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("gap,softplus,z", [
    (False, True, True), (True, True, True), (True, False, False), ("factored", True, True),
])  # fmt: skip
def test_cuda_backend_matches_reference(mamba_standin_calls, dtype, atol, gap, softplus, z):
    inputs = make_inputs(dtype=dtype, gap=gap is True, z=z, softplus=softplus)
    if gap == "factored":
        g = torch.Generator().manual_seed(4)
        inputs["gap"] = torch.randint(0, 4, (2, 11), generator=g).float().requires_grad_(True)
        inputs["gap_scale"] = (torch.rand(2, 6, generator=g) * 0.3).requires_grad_(True)
    out_r, last_r, grads_r = run(inputs, "ref", softplus, last_grad=False)
    out_c, last_c, grads_c = run(inputs, "cuda", softplus, last_grad=False)
    assert mamba_standin_calls.scan_forward == 1 and mamba_standin_calls.scan_backward == 1
    assert mamba_standin_calls.scan_dtypes == [dtype] and out_c.dtype == dtype
    print(f"\n{dtype} gap={gap}: out max {(out_c.float() - out_r.float()).abs().max():.2e}")
    torch.testing.assert_close(out_c.float(), out_r.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(last_c.float(), last_r.float(), atol=atol, rtol=atol)
    assert grads_c.keys() == grads_r.keys()
    for name in grads_r:
        err = (grads_c[name].float() - grads_r[name].float()).abs().max().item()
        print(f"  grad {name}: max {err:.2e}")
        torch.testing.assert_close(grads_c[name].float(), grads_r[name].float(), atol=atol * 5, rtol=atol * 5,
                                   msg=name)


def test_cuda_backend_meets_the_kernel_contract_for_any_caller(mamba_standin_calls):
    """Mixed dtypes (B in bf16 beside fp32 u, D and delta_bias in bf16, a strided bias) are converted to what the
    kernel takes; fp64 and state sizes above 256, which it refuses, run on the portable scan."""
    x = detached(make_inputs())
    mixed = dict(x, B=x["B"].bfloat16(), D=x["D"].bfloat16(), delta_bias=torch.stack([x["delta_bias"]] * 2, 1)[:, 0])
    expected = selective_scan_ref(**mixed, delta_softplus=True)
    torch.testing.assert_close(selective_scan(**mixed, delta_softplus=True, backend="cuda"), expected)
    assert mamba_standin_calls.scan_forward == 1
    wide = dict(x, A=-torch.rand(6, 300), B=torch.randn(2, 300, 11), C=torch.randn(2, 300, 11))
    double = {k: (v.double() if v is not None else None) for k, v in x.items()}
    for inputs in (wide, double):
        out = selective_scan(**inputs, delta_softplus=True, backend="cuda")
        torch.testing.assert_close(out, selective_scan_ref(**inputs, delta_softplus=True), atol=1e-5, rtol=1e-5)
    assert mamba_standin_calls.scan_forward == 1  # neither reached the kernel
    info = cuda_backend.describe()
    assert "standin" in info["mamba-ssm"] and "standin" in info["causal-conv1d"]
    assert cuda_backend.available(torch.device("cuda")) == (True, "")
    assert not cuda_backend.available(torch.device("cpu"))[0]  # the real rule; the fixture lifts it for the table


@pytest.mark.parametrize("e", [16, 12])  # channel-last input taken as it is, and copied (12 channels: not by 8)
def test_cuda_conv_kernel_matches_pytorch(mamba_standin_calls, e):
    conv = torch.nn.Conv1d(e, e, 4, groups=e, padding=3)
    g = torch.Generator().manual_seed(e)
    x = torch.randn(2, 9, 2 * e, generator=g)[..., :e].transpose(1, 2)  # the x half of in_proj's output
    positions = torch.stack([torch.randperm(20, generator=g)[:9].sort().values for _ in range(2)])
    with torch.no_grad():
        with use_backend("ref"):
            dense, kept = causal_conv1d_silu(x, conv), causal_conv1d_silu(x, conv, positions, 20)
        with use_backend("cuda"):
            dense_c, kept_c = causal_conv1d_silu(x, conv), causal_conv1d_silu(x, conv, positions, 20)
            unsized = cuda_backend.conv_run(x, conv, positions)  # the grid ends at the last present token
            contiguous = causal_conv1d_silu(x.contiguous(), conv)
    assert mamba_standin_calls.conv == 4
    for fast, slow in ((dense_c, dense), (kept_c, kept), (unsized, kept), (contiguous, dense)):
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)


def test_mamba_without_causal_conv1d_keeps_pytorchs_conv(mamba_standin_calls, monkeypatch):
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # an import of it now fails
    monkeypatch.setitem(sys.modules, "causal_conv1d.causal_conv1d_interface", None)
    model = vim_model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, images, "cuda"), logits(model, images, "ref"), atol=1e-5, rtol=1e-5)
    assert mamba_standin_calls.scan_forward > 0 and mamba_standin_calls.conv == 0
    assert "PyTorch's conv is used" in cuda_backend.describe()["causal-conv1d"]


# ---------------------------------------------------------------------------------------------------------------
# whole models: dense, pruned and aligned, under autocast, and the backward of a fine-tune


@torch.no_grad()
def enliven(model: torch.nn.Module) -> torch.nn.Module:
    """Weights far from their init (Δ of order 0.1 to 1, mixers that matter), so that the logits feel the scan."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "dt_proj" in name:
            p.uniform_(-2.0, 0.0, generator=g)
        else:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def vim_model():
    torch.manual_seed(0)
    return enliven(ssmtrim.create_model("vim_test"))


def plainmamba_model():
    torch.manual_seed(0)
    return enliven(ssmtrim.create_model("plainmamba_test", depth=3, layers_with_dwconv=(0,)))


MODELS = {"vim": (vim_model, 32), "plainmamba": (plainmamba_model, 64)}
PRUNINGS = {
    "dense": None,
    "align, bias gap": PruneConfig(layers=(1, 2), keep=(0.6,)),
    "align, mean gap, kept conv": PruneConfig(layers=(1,), keep=(0.5,), gap="mean", conv="kept"),
    "keep-order": PruneConfig(layers=(2,), keep=(0.5,), arrangement="keep-order"),
}


def logits(model, images, backend):
    with torch.no_grad(), use_backend(backend):
        return model(images)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("pruning", PRUNINGS)
def test_model_forwards_match_reference(mamba_standin_calls, family, pruning):
    make, size = MODELS[family]
    model = make()
    if PRUNINGS[pruning] is not None:
        if family == "plainmamba" and PRUNINGS[pruning].conv == "kept":
            pytest.skip("the conv-neighbour choice is Vim's")
        apply_pruning(model, PRUNINGS[pruning])
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    out_r, out_c = logits(model, images, "ref"), logits(model, images, "cuda")
    scale = out_r.abs().max().item()
    print(f"\n{family} {pruning}: max {(out_c - out_r).abs().max():.2e} of {scale:.2e}")
    torch.testing.assert_close(out_c, out_r, atol=1e-5 * scale, rtol=1e-5)
    assert mamba_standin_calls.scan_forward > 0
    assert (mamba_standin_calls.conv > 0) == (family == "vim")  # causal_conv1d is Vim's conv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", MODELS)
def test_autocast_forwards_match_reference(mamba_standin_calls, family, dtype):
    """Under autocast the kernel gets low-precision u, Δ, B, C, z and fp32 A, D, bias, with the gap folded in."""
    make, size = MODELS[family]
    model = apply_pruning(make(), PruneConfig(layers=(1,), keep=(0.6,)))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype):
        out_r, out_c = logits(model, images, "ref"), logits(model, images, "cuda")
    scale = out_r.float().abs().max().item()
    print(f"\n{family} {dtype}: max {(out_c.float() - out_r.float()).abs().max():.2e} of {scale:.2e}")
    torch.testing.assert_close(out_c.float(), out_r.float(), atol=0.02 * scale, rtol=0.02)
    assert set(mamba_standin_calls.scan_dtypes) == {dtype}


@pytest.mark.parametrize("family", MODELS)
def test_training_backward_matches_reference(mamba_standin_calls, family):
    """The gradients of a pruned model in training mode (a fine-tune step) through the cuda backend."""
    make, size = MODELS[family]
    model = apply_pruning(make(), PruneConfig(layers=(1,), keep=(0.6,))).train()
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 7])
    grads = {}
    for backend in ("ref", "cuda"):
        model.zero_grad()
        with use_backend(backend):
            F.cross_entropy(model(images), labels).backward()
        grads[backend] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert mamba_standin_calls.scan_backward > 0
    assert grads["cuda"].keys() == grads["ref"].keys() and len(grads["ref"]) > 10
    for name, g in grads["ref"].items():
        torch.testing.assert_close(grads["cuda"][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_finetune_runs_through_the_cuda_backend(mamba_standin_calls, tmp_path):
    """``finetune`` of a pruned folder with the cuda backend (the dense teacher included): the stand-in's backward
    runs, and the trained weights are those of the same run on the reference backend."""
    from ssmtrim.training import TrainConfig, finetune

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    model = ssmtrim.create_model("vim_test", num_classes=2)
    pruned = ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(2,), keep=(0.5,))), tmp_path / "pruned")
    cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_epochs=0, augment="none", distill_weight=0.5,
                      checkpoint_every=1)
    for backend in ("ref", "cuda"):
        with use_backend(backend):
            finetune(pruned, tmp_path / "train", tmp_path / backend, cfg)
    assert mamba_standin_calls.scan_backward > 0
    before, ref, cuda = (ssmtrim.load_model(f).state_dict() for f in (pruned, tmp_path / "ref", tmp_path / "cuda"))
    moved = sum((ref[k] - before[k]).abs().sum() for k in ref)
    apart = sum((cuda[k] - ref[k]).abs().sum() for k in ref)
    print(f"\nfine-tune: weights moved {moved:.3e} in all, the two backends {apart:.3e} apart")
    assert moved > 0 and apart < 1e-3 * moved  # the same training, up to rounding
