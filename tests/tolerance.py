"""How close two results must be when they were not computed by the same code on the same machine.

Matrix products, vectorised exponentials and summation orders differ between CPUs, BLAS builds, instruction sets and
compilers, so values saved on one machine (the golden logits) or computed by two code paths whose agreement depends
on the compiler (the C kernel's token-major and general paths, its AVX-512 and plain-C builds) are compared with a
tolerance, never bit for bit. Bit equality is asserted only where one process computes both sides with the same
operations (e.g. "nothing reduced is the dense model", a save/reload round trip).

The tolerance: the largest difference at most ``LOGIT_RTOL`` (1e-5) of the largest magnitude of the expected tensor,
and the same top-1 wherever the expected margin between the first two classes exceeds that tolerance. Measured on
the golden cases, the differences between an AVX-512 Intel Xeon, an AVX2 AMD EPYC and PyTorch forced to its plain
kernels (``ATEN_CPU_CAPABILITY=default``) are at most 6.3e-7 of the largest logit: a margin of more than 15x.
"""

from __future__ import annotations

import torch

LOGIT_RTOL = 1e-5


def max_relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| over the largest |want| (both as float64)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return float((got - want).abs().max() / scale)


def assert_close_across_cpus(got: torch.Tensor, want: torch.Tensor, rtol: float = LOGIT_RTOL, what: str = "") -> None:
    """``got`` equals ``want`` up to what differs between CPUs: shapes equal, the largest difference within ``rtol``
    of the largest expected magnitude and, for logits (B C), the same top-1 wherever the margin exceeds it."""
    assert got.shape == want.shape, f"{what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what} non-finite values differ"
    rel = max_relative_difference(got, want)
    assert rel <= rtol, f"{what} differs by {rel:.3g} of its largest value (allowed {rtol:g})"
    if got.dim() == 2 and got.shape[1] > 1:
        top2 = want.double().topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * rtol * want.double().abs().max()
        assert torch.equal(got.argmax(1)[clear], want.argmax(1)[clear]), f"{what} top-1 differs"
