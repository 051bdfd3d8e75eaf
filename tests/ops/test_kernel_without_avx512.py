"""The C kernel as built on a CPU without AVX-512 (most AMD before Zen 4, many laptops, ARM): the exp, softplus and
SiLU as plain C that the compiler vectorises instead of AVX-512 intrinsics. Built here with ``-mno-avx512f`` and
swapped in for one test, it must pass what this machine's build passes (within fp32 tolerance of ``ref`` with
gradients and gaps; the token-major kernels agreeing with the general path to the tolerance that holds across CPUs),
and where this machine has AVX-512, agree with its build (to the bit with this project's GCC; checked to a few ulps,
since that depends on the compiler)."""

from __future__ import annotations

import ctypes
import os
import platform

import pytest
import torch

from ssmtrim.ops import _cpu_kernel
from ssmtrim.ops.selective_scan import selective_scan
from tests.ops import test_tokens
from tests.ops.test_tokens import general_path, kernels_of, spread_model
from tests.tolerance import assert_close_across_cpus

x86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not x86 or _cpu_kernel._compiler() is None,
                                reason="needs an x86 C compiler (the flag -mno-avx512f)")


@pytest.fixture(scope="module")
def library_without_avx512(tmp_path_factory) -> str:
    """Path of the library built without AVX-512, in a cache of its own (built once for this file)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SSMTRIM_CACHE", str(tmp_path_factory.mktemp("kernel_cache")))
        path, err = _cpu_kernel._build(_cpu_kernel._compiler(),
                                       ([*_cpu_kernel._FLAG_SETS[0], "-mno-avx512f"],))
    assert path is not None, err
    return str(path)


@pytest.fixture
def without_avx512(monkeypatch, library_without_avx512) -> ctypes.CDLL:
    """That library loaded in place of this machine's build, for one test."""
    lib = ctypes.CDLL(library_without_avx512)
    _cpu_kernel._declare(lib)
    assert lib.ssm_avx512() == 0
    monkeypatch.setattr(_cpu_kernel, "_lib", lib)
    monkeypatch.setattr(_cpu_kernel, "_status", _cpu_kernel.KernelStatus(True, library_without_avx512))
    return lib


def test_this_machines_build_says_how_it_takes_the_exp():
    status = _cpu_kernel.status()
    if not status.available:
        pytest.skip(status.detail)
    flags = _cpu_kernel._cpu_signature()  # the CPU's flags line, as the kernel cache keys builds by it
    inlined = _cpu_kernel.load().ssm_avx512() == 1
    assert ("AVX-512 intrinsics" in status.detail) == inlined
    if " avx512f" in flags and "-mno-avx512f" not in os.environ.get("SSMTRIM_KERNEL_FLAGS", ""):
        assert inlined  # the default flags build the AVX-512 path wherever the CPU has it
    if "-mno-avx512f" in os.environ.get("SSMTRIM_KERNEL_FLAGS", ""):
        assert not inlined  # a build asked to leave AVX-512 out (as CI's run "as on another CPU" does)


@pytest.mark.parametrize("gap", [False, True])
def test_scan_matches_ref(without_avx512, gap):
    torch.manual_seed(0)
    b, e, length, n = 2, 40, 33, 16  # 40 channels: two whole vectors of 16 and a partial one
    u, delta = torch.randn(b, e, length), torch.randn(b, e, length) * 0.5 - 1
    A, D, bias = -torch.rand(e, n) * 4 - 0.1, torch.randn(e), torch.randn(e) * 0.3
    B, C, z = torch.randn(b, n, length), torch.randn(b, n, length), torch.randn(b, e, length) * 3
    G = torch.rand(b, e, length) * 2 if gap else None
    leaves = [t.requires_grad_() for t in (u, delta, B, C, z)]
    outs = {}
    for backend in ("cpu", "ref"):
        y, last = selective_scan(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, gap=G,
                                 return_last_state=True, backend=backend)
        grads = torch.autograd.grad(y.square().sum(), leaves)
        outs[backend] = (y, last, *grads)
    for got, want in zip(outs["cpu"], outs["ref"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_token_major_path_matches_the_general_path(without_avx512, monkeypatch):
    model = spread_model(3)
    mixer, x = model.layers[1].mixer, torch.randn(3, 3, 32, 32)
    hidden = torch.randn(3, 17, mixer.in_proj.in_features)
    with torch.no_grad():
        assert kernels_of(mixer, hidden) is not None
        fast_mixer, fast_logits = mixer.ssm_output(hidden), model(x)
        general_path(monkeypatch)
        general_mixer, general_logits = mixer.ssm_output(hidden), model(x)
    assert_close_across_cpus(fast_mixer, general_mixer)
    assert_close_across_cpus(fast_logits, general_logits)


def test_pruned_logits_with_gap_decay_match_the_general_path(without_avx512, monkeypatch):
    test_tokens.test_pruned_logits_with_gap_decay_match_the_general_path(monkeypatch, "merge")  # on this build


def test_agrees_with_the_avx512_build(monkeypatch, library_without_avx512):
    """The two ways of taking the exp agree, so a model gives the same logits on either kind of CPU: bit for bit with
    the GCC this project is built with; the check allows a few ulps, since another compiler may fuse a multiply and an
    add in one build where it does not in the other."""
    if not _cpu_kernel.status().available or _cpu_kernel.load().ssm_avx512() != 1:
        pytest.skip("this machine's build has no AVX-512 to compare with")
    from ssmtrim.pruning import PruneConfig, apply_pruning

    torch.manual_seed(0)
    u, delta = torch.randn(2, 48, 70), torch.randn(2, 48, 70) * 3  # softplus over a wide range
    A, B, C, z = -torch.rand(48, 16) * 30, torch.randn(2, 16, 70), torch.randn(2, 16, 70), torch.randn(2, 48, 70) * 8
    args = dict(D=torch.randn(48), z=z, delta_bias=torch.randn(48), delta_softplus=True, gap=torch.rand(2, 48, 70) * 9)
    dense, x = spread_model(6), torch.randn(3, 3, 32, 32)
    merged = apply_pruning(spread_model(6), PruneConfig(layers=(1, 2), keep=(0.6,), arrangement="merge"))
    results = []
    for swap in (False, True):
        if swap:
            lib = ctypes.CDLL(library_without_avx512)
            _cpu_kernel._declare(lib)
            monkeypatch.setattr(_cpu_kernel, "_lib", lib)
        with torch.no_grad():
            results.append((selective_scan(u, delta, A, B, C, backend="cpu", **args), dense(x), merged(x)))
    for native, portable in zip(*results, strict=True):
        torch.testing.assert_close(portable, native, rtol=2e-6, atol=2e-6)
