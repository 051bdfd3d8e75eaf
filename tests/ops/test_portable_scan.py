"""The portable (chunked, parallel) scan against the reference loop: outputs, final states and gradients, with gaps,
for several chunk sizes and lengths that are not multiples of the chunk, in both its forms (the doubling scan, and the
unrolled one that ONNX export takes); auto's choice; torch.compile."""

from __future__ import annotations

import pytest
import torch

from ssmtrim.errors import ConfigError
from ssmtrim.ops import resolve_backend, selective_scan, selective_scan_ref
from ssmtrim.ops.backends import cuda as cuda_backend
from ssmtrim.ops.backends import portable
from ssmtrim.ops.backends.portable import default_chunk_size, portable_scan, unrolled_chunk_size

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "gap", "gap_scale")


def make_inputs(bsz=2, e=5, length=23, n=4, gap=None, seed=0, softplus=True, strong=False):
    """Scan inputs as leaves; ``gap``: None, "whole" (B E L) or "factored" (counts (B L) x scale (B E));
    ``strong``: decays strong enough to underflow over a chunk (large |A| and gaps)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inputs = dict(
        u=r(bsz, e, length),
        delta=r(bsz, e, length) * 0.5 - 1.0 if softplus else torch.rand(bsz, e, length, generator=g) * 0.5 + 0.05,
        A=-torch.exp(r(e, n) * 0.5 + (3.0 if strong else 0.0)),
        B=r(bsz, n, length),
        C=r(bsz, n, length),
        D=r(e),
        z=r(bsz, e, length),
        delta_bias=r(e) * 0.1,
        gap=None,
        gap_scale=None,
    )
    if gap == "whole":
        inputs["gap"] = torch.rand(bsz, e, length, generator=g) * (20.0 if strong else 0.5)
    elif gap == "factored":
        inputs["gap"] = torch.randint(0, 4, (bsz, length), generator=g).float()
        inputs["gap_scale"] = torch.rand(bsz, e, generator=g) * 0.3
    return {k: (v.requires_grad_(True) if v is not None else None) for k, v in inputs.items()}


def run(fn, inputs, softplus=True):
    """Outputs, final state and the gradients of every input under a loss that weighs both outputs."""
    for v in inputs.values():
        if v is not None:
            v.grad = None
    out, last = fn(**inputs, delta_softplus=softplus, return_last_state=True)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    ((out.float() * w).sum() + last.float().sin().sum()).backward()
    # an input the outputs do not depend on (A, for one token in one chunk) has no gradient: zero
    return out.detach(), last.detach(), {k: v.grad.clone() if v.grad is not None else torch.zeros_like(v)
                                         for k, v in inputs.items() if v is not None}


def compare(inputs, chunk, softplus=True, atol=2e-5):
    out_r, last_r, grads_r = run(selective_scan_ref, inputs, softplus)
    out_p, last_p, grads_p = run(lambda **kw: portable_scan(**kw, chunk_size=chunk), inputs, softplus)
    print(f"\nchunk {chunk}: out max {(out_p - out_r).abs().max():.2e}, last max {(last_p - last_r).abs().max():.2e}")
    torch.testing.assert_close(out_p, out_r, atol=atol, rtol=atol)
    torch.testing.assert_close(last_p, last_r, atol=atol, rtol=atol)
    assert grads_p.keys() == grads_r.keys()
    for name in grads_r:
        print(f"  grad {name}: max {(grads_p[name] - grads_r[name]).abs().max():.2e}")
        torch.testing.assert_close(grads_p[name], grads_r[name], atol=atol * 5, rtol=atol * 5, msg=name)


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
@pytest.mark.parametrize("length", [1, 13, 32])
def test_matches_reference_for_chunk_sizes_and_lengths(chunk, length):
    """Lengths below, equal to and not a multiple of the chunk; one token; one chunk holding everything."""
    compare(make_inputs(length=length, gap="whole", seed=length), chunk)


@pytest.mark.parametrize("gap", [None, "whole", "factored"])
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_reference_with_and_without_gaps(gap, softplus):
    compare(make_inputs(length=41, gap=gap, softplus=softplus, seed=3), chunk=8, softplus=softplus)


@pytest.fixture
def exporting(monkeypatch):
    """The scan as ONNX export runs it (the unrolled form, its chunk size, the channels in one block)."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)


@pytest.mark.parametrize("chunk", [None, 1, 3, 8, 64])
@pytest.mark.parametrize("length", [1, 13, 65])
def test_the_unrolled_form_matches_reference(exporting, chunk, length):
    """Lengths below, equal to and not a multiple of the chunk (None: the export's own choice, 8 for 65 tokens)."""
    compare(make_inputs(length=length, gap="whole", seed=length), chunk)


@pytest.mark.parametrize("gap", [None, "factored"])
def test_the_unrolled_form_with_gaps_and_strong_decays(exporting, gap):
    compare(make_inputs(length=41, gap=gap, seed=4), chunk=None)
    inputs = make_inputs(length=50, gap="whole", strong=True, seed=5)
    compare(inputs, chunk=None)
    out, last, grads = run(portable_scan, inputs)
    assert all(torch.isfinite(t).all() for t in (out, last, *grads.values()))


def test_unrolled_chunk_size_balances_steps_within_and_between_chunks():
    assert [unrolled_chunk_size(n) for n in (1, 4, 65, 197, 256, 257, 1025)] == [2, 2, 8, 16, 16, 16, 32]
    for length in (2, 65, 257, 3137):
        chunk = unrolled_chunk_size(length)
        assert chunk & (chunk - 1) == 0 and 0.5 <= chunk / -(-length // chunk) <= 2.5


def test_channel_blocks_on_cpu(monkeypatch):
    """On CPU the channels run in blocks (cache-sized there): blocks of one and two channels give the same scan."""
    monkeypatch.setattr(portable, "CPU_BLOCK_ELEMENTS", 2 * 2 * 24 * 4)  # 2 channels of (B=2, 24 padded tokens, N=4)
    inputs = make_inputs(e=5, length=23, gap="factored", seed=9)
    assert [s.stop - s.start for s in portable._channel_blocks(inputs["u"], 4, 8)] == [2, 2, 1]
    compare(inputs, chunk=8)


def test_strong_decays_underflow_to_zero_without_nan():
    """|A| ~ 20 and gaps up to 20 tokens: chunk decays of e^-1000 and less, which must come out as 0, not nan/inf."""
    inputs = make_inputs(length=50, gap="whole", strong=True, seed=5)
    compare(inputs, chunk=16)
    out, last, grads = run(lambda **kw: portable_scan(**kw, chunk_size=16), inputs)
    assert all(torch.isfinite(t).all() for t in (out, last, *grads.values()))


def test_optional_inputs_and_dtypes():
    """No D, z or bias; a bf16 input keeps its dtype on the way out, with fp32 maths inside."""
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs(length=30).items()}
    plain = dict(x, D=None, z=None, delta_bias=None)
    torch.testing.assert_close(portable_scan(**plain, chunk_size=8), selective_scan_ref(**plain), atol=2e-5, rtol=2e-5)
    half = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items() if v is not None}
    out = portable_scan(**half, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), selective_scan_ref(**half, delta_softplus=True).float(), atol=2e-2,
                               rtol=2e-2)
    with pytest.raises(ConfigError, match="chunk size"):
        portable_scan(**x, chunk_size=0)


def test_default_chunk_size_keeps_chunks_and_their_count_small():
    for length in (1, 197, 1025, 4097):
        chunk = default_chunk_size(length)
        assert chunk >= 32 and chunk & (chunk - 1) == 0
        assert (-(-length // chunk)) ** 2 <= max(length, 1)  # the carried-state matrix is at most L entries


def test_selected_by_name_and_by_auto_on_gpus_without_mamba(monkeypatch):
    x = {k: (v.detach() if v is not None else None) for k, v in make_inputs().items()}
    torch.testing.assert_close(selective_scan(**x, delta_softplus=True, backend="portable"),
                               selective_scan_ref(**x, delta_softplus=True), atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(cuda_backend, "_mamba", (None, "mamba-ssm not importable"))
    assert resolve_backend("cuda", "auto") == "portable"
    assert resolve_backend("mps", "auto") == "portable"
    assert resolve_backend("cpu", "auto") in ("cpu", "ref")  # the C kernel, or the loop: faster on CPU


def test_compiles_as_one_graph():
    """No data-dependent Python control flow: dynamo traces the forward and the backward without a break."""
    torch._dynamo.reset()
    inputs = make_inputs(length=21, gap="factored")
    compiled = torch.compile(lambda **kw: portable_scan(**kw, chunk_size=8), backend="aot_eager", fullgraph=True)
    out_c, last_c, grads_c = run(compiled, inputs)
    out_r, last_r, grads_r = run(selective_scan_ref, inputs)
    torch.testing.assert_close(out_c, out_r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(last_c, last_r, atol=2e-5, rtol=2e-5)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_matches_reference_on_cuda(dtype, atol):
    """On the GPU, at Vim-like sizes (197 tokens, 16 states), with a gap: outputs, final states, gradients."""
    cpu = make_inputs(bsz=2, e=64, length=197, n=16, gap="whole", seed=7)
    inputs = {k: (v.detach().to("cuda", dtype if k in ("u", "delta", "B", "C", "z") else torch.float32)
                  .requires_grad_(True) if v is not None else None) for k, v in cpu.items()}
    out_r, last_r, grads_r = run(selective_scan_ref, inputs)
    out_p, last_p, grads_p = run(lambda **kw: selective_scan(**kw, backend="portable"), inputs)
    torch.testing.assert_close(out_p.float(), out_r.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(last_p.float(), last_r.float(), atol=atol, rtol=atol)
    for name in grads_r:
        torch.testing.assert_close(grads_p[name].float(), grads_r[name].float(), atol=atol * 10, rtol=atol * 10,
                                   msg=name)
