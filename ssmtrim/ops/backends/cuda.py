"""``cuda``: mamba-ssm's CUDA kernel (``selective_scan_fn``) for CUDA tensors, when mamba-ssm is installed, and
causal-conv1d's ``causal_conv1d_fn`` for Vim's conv + SiLU at inference, when that is installed too.

mamba-ssm is imported lazily, on the first question about it, never on ``import ssmtrim`` (it initialises CUDA and is
a heavy import); a failed import is remembered with its reason. The same for causal-conv1d.

The kernel's contract, met here whatever the caller passes: u, delta, B, C, z in one of fp32, fp16, bf16 (u's
dtype); A, D and delta_bias in fp32; a state size up to 256. Inputs it cannot take (fp64, larger states) run on the
``portable`` scan instead. mamba-ssm has no gap input: the gap is folded into Δ and u (see :func:`scan`). Its last
state is returned in fp32 and, as mamba-ssm documents, no gradient flows back from it: a loss on the last state
needs another backend. ``tests/ops/mamba_standin.py`` holds the contracts in a stand-in that runs this module on CPU.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.ops.backends import portable
from ssmtrim.ops.backends.base import Backend, ConvKernel
from ssmtrim.ops.backends.ref import full_gap

MAMBA_INSTALL = "pip install torch packaging ninja && pip install causal-conv1d mamba-ssm --no-build-isolation"

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what both kernels take
MAX_STATE = 256  # selective_scan_fn's largest state size

_lock = threading.Lock()
_mamba: tuple[Callable | None, str] | None = None  # caches of the imports' outcomes, not settings
_conv: tuple[Callable | None, str] | None = None


def _import(module: str, attr: str, package: str, label: str) -> tuple[Callable | None, str]:
    try:
        fn = getattr(importlib.import_module(module), attr)
        version = getattr(importlib.import_module(package), "__version__", "unknown version")
        return fn, f"{label} {version}"
    except Exception as exc:  # ImportError, or a CUDA build that does not match this torch
        return None, f"{label} not importable ({type(exc).__name__}: {exc})"


def mamba_selective_scan() -> tuple[Callable | None, str]:
    """mamba-ssm's ``selective_scan_fn`` and its version, or ``(None, reason)``; imported once, on first ask."""
    global _mamba
    if _mamba is None:
        with _lock:
            if _mamba is None:
                _mamba = _import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn", "mamba_ssm",
                                 "mamba-ssm")
    return _mamba


def causal_conv1d() -> tuple[Callable | None, str]:
    """causal-conv1d's ``causal_conv1d_fn`` and its version, or ``(None, reason)``; imported once, on first ask."""
    global _conv
    if _conv is None:
        with _lock:
            if _conv is None:
                _conv = _import("causal_conv1d.causal_conv1d_interface", "causal_conv1d_fn", "causal_conv1d",
                                "causal-conv1d")
    return _conv


def scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    gap: Tensor | None = None,
    return_last_state: bool = False,
    gap_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """mamba-ssm's scan, with the gap folded in; inputs the kernel does not take go to the portable scan."""
    if u.dtype not in KERNEL_DTYPES or A.shape[1] > MAX_STATE:
        return portable.scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap, return_last_state, gap_scale)
    scan_fn = mamba_selective_scan()[0]
    dtype = u.dtype  # the kernel wants delta, B, C and z in u's dtype, and A, D and delta_bias in fp32
    A, B, C = A.float(), B.to(dtype), C.to(dtype)
    gap = full_gap(gap, gap_scale)
    if gap is None:
        return scan_fn(u, delta.to(dtype), A, B, C, None if D is None else D.float(),
                       None if z is None else z.to(dtype),
                       None if delta_bias is None else delta_bias.float().contiguous(), delta_softplus,
                       return_last_state)
    # mamba-ssm has no gap input. Fold it in exactly: with d' = d + G and u' = u d / d', the scan sees the decay
    # exp(d' A) and the input d' B u' = d B u; the skip term and gate are applied outside, on the true u.
    d = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        d = F.softplus(d)
    d_gap = d + gap.float()
    u_eff = (u.float() * d / d_gap.clamp_min(torch.finfo(torch.float32).tiny)).to(dtype)
    res = scan_fn(u_eff, d_gap.to(dtype), A, B, C, None, None, None, False, return_last_state)
    y, last = res if return_last_state else (res, None)
    y = y.float()
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, last) if return_last_state else y


def conv_accepts(x: Tensor, conv: nn.Conv1d) -> bool:
    return (causal_conv1d()[0] is not None and x.dtype in KERNEL_DTYPES and conv.weight.dtype in KERNEL_DTYPES
            and 2 <= conv.kernel_size[0] <= 4)


def _conv_layout(x: Tensor) -> Tensor:
    """x (B E L) as causal_conv1d takes it: unit stride along L, or channel-last (unit stride along E, as the x half
    of in_proj's output is) with E and the other strides multiples of 8; anything else is copied."""
    if x.stride(2) == 1:
        return x
    if x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0:
        return x
    return x.contiguous()


def conv_run(x: Tensor, conv: nn.Conv1d, positions: Tensor | None, length: int | None = None) -> Tensor:
    """``causal_conv1d_fn`` with SiLU over x (B E L); with ``positions``, over the zero-filled original grid of
    ``length`` tokens, read back at the present tokens (see :mod:`ssmtrim.ops.conv`)."""
    conv_fn = causal_conv1d()[0]
    e, width = x.shape[1], conv.kernel_size[0]
    weight = conv.weight.detach().reshape(e, width)
    bias = None if conv.bias is None else conv.bias.detach()
    if positions is None:
        return conv_fn(_conv_layout(x), weight, bias, activation="silu")
    full = int(length) if length is not None else int(positions.max()) + 1
    idx = positions[:, None, :].expand(-1, e, -1)
    grid = x.new_zeros(x.shape[0], e, full).scatter_(2, idx, x)
    return conv_fn(grid, weight, bias, activation="silu").gather(2, idx)


def available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, (f"the 'cuda' scan backend needs CUDA tensors but the model runs on {device.type}; move it with "
                       "--device cuda or choose --backend auto.")
    if mamba_selective_scan()[0] is None:
        return False, (f"the 'cuda' scan backend needs mamba-ssm, which is not installed; install it with "
                       f"`{MAMBA_INSTALL}`.")
    return True, ""


def describe() -> dict[str, str]:
    fn, detail = mamba_selective_scan()
    conv_fn, conv_detail = causal_conv1d()
    return {"mamba-ssm": detail if fn is not None else f"{detail}; install: {MAMBA_INSTALL}",
            "causal-conv1d": conv_detail if conv_fn is not None else f"{conv_detail} (PyTorch's conv is used)"}


BACKEND = Backend(
    name="cuda",
    available=available,
    scan=scan,
    conv=ConvKernel(accepts=conv_accepts, run=conv_run),
    priority=20,
    devices=("cuda",),
    note=lambda: f"{mamba_selective_scan()[1]}; install: {MAMBA_INSTALL}",
    describe=describe,
)
