"""``cuda``: mamba-ssm's CUDA kernel (``selective_scan_fn``) for CUDA tensors, when mamba-ssm is installed.

mamba-ssm is imported lazily, on the first question about it, never on ``import ssmtrim`` (it initialises CUDA and is
a heavy import); a failed import is remembered with its reason.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.ops.backends.base import Backend
from ssmtrim.ops.backends.ref import full_gap

MAMBA_INSTALL = "pip install torch packaging ninja && pip install causal-conv1d mamba-ssm --no-build-isolation"

_lock = threading.Lock()
_mamba: tuple[Callable | None, str] | None = None  # a cache of the import's outcome, not a setting


def mamba_selective_scan() -> tuple[Callable | None, str]:
    """mamba-ssm's ``selective_scan_fn`` and its version, or ``(None, reason)``; imported once, on first ask."""
    global _mamba
    if _mamba is None:
        with _lock:
            if _mamba is None:
                try:
                    mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
                    version = getattr(importlib.import_module("mamba_ssm"), "__version__", "unknown version")
                    _mamba = (mod.selective_scan_fn, f"mamba-ssm {version}")
                except Exception as exc:  # ImportError, or a CUDA build that does not match this torch
                    _mamba = (None, f"mamba-ssm not importable ({type(exc).__name__}: {exc})")
    return _mamba


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
    scan_fn = mamba_selective_scan()[0]
    gap = full_gap(gap, gap_scale)
    if gap is None:
        return scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    # mamba-ssm has no gap input. Fold it in exactly: with d' = d + G and u' = u d / d', the scan sees the decay
    # exp(d' A) and the input d' B u' = d B u; the skip term and gate are applied outside, on the true u.
    d = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
    if delta_softplus:
        d = F.softplus(d)
    d_gap = d + gap.float()
    u_eff = (u.float() * d / d_gap.clamp_min(torch.finfo(torch.float32).tiny)).to(u.dtype)
    res = scan_fn(u_eff, d_gap.to(delta.dtype), A, B, C, None, None, None, False, return_last_state)
    y, last = res if return_last_state else (res, None)
    y = y.float()
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


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
    return {"mamba-ssm": detail if fn is not None else f"{detail}; install: {MAMBA_INSTALL}"}


BACKEND = Backend(
    name="cuda",
    available=available,
    scan=scan,
    priority=20,
    devices=("cuda",),
    note=lambda: f"{mamba_selective_scan()[1]}; install: {MAMBA_INSTALL}",
    describe=describe,
)
