"""The fast scans against the reference twin: outputs, final states and gradients, per dtype and option."""

from __future__ import annotations

import pytest
import torch

from ssmtrim.errors import BackendUnavailableError, ConfigError
from ssmtrim.ops import backend as backend_mod
from ssmtrim.ops import resolve_backend, selective_scan, selective_scan_ref, use_backend
from ssmtrim.ops._cpu_kernel import status as kernel_status
from ssmtrim.ops.backends import cuda as cuda_backend

requires_kernel = pytest.mark.skipif(not kernel_status().available, reason="fast CPU kernel unavailable (no compiler)")
requires_cuda = pytest.mark.requires_cuda
cuda_and_mamba = pytest.mark.skipif(
    not torch.cuda.is_available() or backend_mod.mamba_selective_scan()[0] is None,
    reason="needs a CUDA GPU and mamba-ssm",
)


def make_inputs(bsz=2, e=6, length=11, n=4, dtype=torch.float32, z=True, gap=False, bias=True, device="cpu", seed=0,
                softplus=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = dict(
        u=r(bsz, e, length),
        # without softplus the scan needs a positive delta, as mamba-ssm's does
        delta=r(bsz, e, length) * 0.5 - 1.0 if softplus else torch.rand(bsz, e, length, generator=g) * 0.5 + 0.05,
        A=-torch.exp(r(e, n) * 0.5),
        B=r(bsz, n, length),
        C=r(bsz, n, length),
        D=r(e),
        z=r(bsz, e, length) if z else None,
        delta_bias=(r(e) * 0.1 if softplus else torch.rand(e, generator=g) * 0.1) if bias else None,
        gap=torch.rand(bsz, e, length, generator=g) * 0.5 if gap else None,
    )
    return {k: (v.to(device=device, dtype=dtype).requires_grad_(True) if v is not None else None)
            for k, v in inputs.items()}


def run(inputs, backend, softplus=True, last_grad=True):
    for v in inputs.values():
        if v is not None:
            v.grad = None
    out, last = selective_scan(**inputs, delta_softplus=softplus, return_last_state=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g).to(out)
    loss = (out.float() * w.float()).sum() + (last.float().sin().sum() if last_grad else 0.0)
    loss.backward()
    grads = {k: v.grad.clone() for k, v in inputs.items() if v is not None}
    return out.detach(), last.detach(), grads


@requires_kernel
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("z,gap,bias,softplus", [
    (True, False, True, True), (False, False, False, False), (True, True, True, True), (False, True, False, True),
])  # fmt: skip
def test_cpu_kernel_matches_reference(dtype, atol, z, gap, bias, softplus):
    inputs = make_inputs(dtype=dtype, z=z, gap=gap, bias=bias, softplus=softplus)
    out_r, last_r, grads_r = run(inputs, "ref", softplus)
    out_c, last_c, grads_c = run(inputs, "cpu", softplus)
    assert out_c.dtype == dtype
    err = (out_c - out_r).abs()
    print(f"\n{dtype} z={z} gap={gap}: out max {err.max():.2e} mean {err.mean():.2e}")
    torch.testing.assert_close(out_c.float(), out_r.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(last_c.float(), last_r.float(), atol=atol, rtol=atol)
    assert grads_c.keys() == grads_r.keys()
    for name in grads_r:
        err = (grads_c[name].float() - grads_r[name].float()).abs().max().item()
        print(f"  grad {name}: max {err:.2e}")
        torch.testing.assert_close(grads_c[name].float(), grads_r[name].float(), atol=atol * 5, rtol=atol * 5)


@requires_kernel
@pytest.mark.parametrize("bsz,e,length,n", [(3, 37, 5, 16), (1, 16, 1, 3), (2, 33, 9, 7)])
def test_cpu_kernel_channel_blocks(bsz, e, length, n):
    """Channels run in blocks of 16 lanes: several blocks, a partial last block, one token, odd state sizes."""
    inputs = make_inputs(bsz=bsz, e=e, length=length, n=n, gap=True, seed=e)
    out_r, last_r, grads_r = run(inputs, "ref")
    out_c, last_c, grads_c = run(inputs, "cpu")
    torch.testing.assert_close(out_c, out_r, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(last_c, last_r, atol=2e-4, rtol=2e-4)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=1e-3, rtol=1e-3, msg=name)


@requires_kernel
def test_cpu_kernel_at_vim_tiny_shapes():
    inputs = make_inputs(bsz=2, e=384, length=197, n=16, seed=3)
    with torch.no_grad():
        ref = selective_scan_ref(**{k: v.detach() if v is not None else None for k, v in inputs.items()},
                                 delta_softplus=True)
        out = selective_scan(**{k: v.detach() if v is not None else None for k, v in inputs.items()},
                             delta_softplus=True, backend="cpu")
    print(f"\nVim-T shapes: max err {(out - ref).abs().max():.2e}")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_reference_matches_explicit_recurrence():
    """The reference twin itself against the formula written out per element, with a gap."""
    inp = make_inputs(bsz=1, e=2, length=5, n=3, gap=True)
    p = {k: v.detach().double() if v is not None else None for k, v in inp.items()}
    d = torch.nn.functional.softplus(p["delta"] + p["delta_bias"][:, None])
    y = torch.zeros_like(p["u"])
    for e in range(2):
        h = torch.zeros(3, dtype=torch.float64)
        for t in range(5):
            decay = torch.exp((d[0, e, t] + p["gap"][0, e, t]) * p["A"][e])
            h = decay * h + d[0, e, t] * p["B"][0, :, t] * p["u"][0, e, t]
            yt = (p["C"][0, :, t] * h).sum() + p["D"][e] * p["u"][0, e, t]
            y[0, e, t] = yt * torch.nn.functional.silu(p["z"][0, e, t])
    out = selective_scan_ref(**{k: v.detach() if v is not None else None for k, v in inp.items()}, delta_softplus=True)
    torch.testing.assert_close(out.double(), y, atol=1e-5, rtol=1e-5)


def test_gap_zero_equals_no_gap():
    inp = make_inputs(gap=False)
    plain = {k: v.detach() if v is not None else None for k, v in inp.items()}
    zero_gap = dict(plain, gap=torch.zeros_like(plain["u"]))
    for backend in ("ref", "cpu") if kernel_status().available else ("ref",):
        a = selective_scan(**plain, delta_softplus=True, backend=backend)
        b = selective_scan(**zero_gap, delta_softplus=True, backend=backend)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_op_is_a_single_graph_node():
    """fvcore and other tracers count the scan through one op, not an unrolled loop."""
    if not kernel_status().available:
        pytest.skip("the registered op is used by the cpu backend")
    inp = {k: v.detach() if v is not None else None for k, v in make_inputs().items()}
    graph = torch.jit.trace(lambda u, dt: selective_scan(u, dt, inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                                          inp["delta_bias"], True, backend="cpu"),
                            (inp["u"], inp["delta"])).graph
    kinds = [n.kind() for n in graph.nodes()]
    assert kinds.count("ssmtrim::selective_scan") == 1
    assert "aten::exp" not in kinds


def test_backend_switch_and_errors(monkeypatch):
    monkeypatch.setenv(backend_mod.ENV_VAR, "ref")
    assert resolve_backend("cpu") == "ref"
    with use_backend("auto"):
        assert resolve_backend("cpu") in ("cpu", "ref")
    assert resolve_backend("cpu") == "ref"
    monkeypatch.setenv(backend_mod.ENV_VAR, "fastest")
    with pytest.raises(ConfigError, match="SSMTRIM_SCAN_BACKEND"):
        resolve_backend("cpu")
    monkeypatch.delenv(backend_mod.ENV_VAR)
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        resolve_backend("cpu", "cuda")
    monkeypatch.setattr(cuda_backend, "_mamba", (None, "mamba-ssm not importable"))
    with pytest.raises(BackendUnavailableError, match="pip install"):
        resolve_backend("cuda", "cuda")


def test_import_does_not_load_optional_modules():
    import subprocess
    import sys

    code = "import sys, ssmtrim, ssmtrim.ops, ssmtrim.models; print(sorted(m for m in ('mamba_ssm', 'causal_conv1d', " \
           "'fvcore', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@requires_cuda
@cuda_and_mamba
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("gap", [False, True])
def test_cuda_matches_reference(dtype, atol, gap):
    inputs = make_inputs(e=64, length=128, n=16, dtype=dtype, gap=gap, device="cuda")
    out_r, last_r, grads_r = run(inputs, "ref", last_grad=False)
    out_c, last_c, grads_c = run(inputs, "cuda", last_grad=False)
    print(f"\ncuda {dtype} gap={gap}: out max {(out_c.float() - out_r.float()).abs().max():.2e}")
    torch.testing.assert_close(out_c.float(), out_r.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(last_c.float(), last_r.float(), atol=atol, rtol=atol)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name].float(), grads_r[name].float(), atol=atol * 10, rtol=atol * 10)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=requires_kernel)])
def test_factored_gap_equals_whole_gap(backend):
    """gap (B L) x gap_scale (B E) gives the outputs and gradients of the whole (B E L) gap it stands for; the
    gradients of the two factors are the chain rule through G = counts x scale."""
    g = torch.Generator().manual_seed(3)
    base = make_inputs(gap=False)
    counts = torch.randint(0, 4, (2, 11), generator=g).float().requires_grad_(True)
    scale = (torch.rand(2, 6, generator=g) * 0.3).requires_grad_(True)
    factored = dict(base, gap=counts, gap_scale=scale)
    out_f, last_f, grads_f = run(factored, backend)
    whole_gap = (counts.detach()[:, None, :] * scale.detach()[:, :, None]).requires_grad_(True)
    whole = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in base.items()}
    whole["gap"] = whole_gap
    out_w, last_w, grads_w = run(whole, "ref")
    torch.testing.assert_close(out_f, out_w, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(last_f, last_w, atol=2e-5, rtol=2e-5)
    for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"):
        torch.testing.assert_close(grads_f[name], grads_w[name], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(grads_f["gap"], (grads_w["gap"] * scale.detach()[:, :, None]).sum(1), atol=2e-4,
                               rtol=2e-4)
    torch.testing.assert_close(grads_f["gap_scale"], (grads_w["gap"] * counts.detach()[:, None, :]).sum(2),
                               atol=2e-4, rtol=2e-4)
