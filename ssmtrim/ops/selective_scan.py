"""The selective scan of Mamba (Gu & Dao 2023, arXiv 2312.00752), three ways behind one signature.

- :func:`selective_scan_ref`: the readable loop, the reference twin (same semantics as mamba-ssm's
  ``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``);
- the ``ssmtrim::selective_scan`` op: one registered PyTorch op (so fvcore and tracers see a single node) whose CPU
  implementation is the fused C kernel and whose backward is the kernel's reverse sweep;
- mamba-ssm's CUDA ``selective_scan_fn`` when installed.
:func:`selective_scan` picks one with :func:`ssmtrim.ops.backend.resolve_backend`.

Per channel e and state n, with d_t = softplus(delta_t + bias) (or delta_t + bias):
    h_t = exp((d_t + G_t) A) h_{t-1} + d_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t * silu(z_t).
G (``gap``, optional) is the decay of pruned positions between two kept tokens: pruning-aware hidden-state
alignment (Zhan et al., NeurIPS 2024). It is given whole (B E L), or factored as counts ``gap`` (B L) times
``gap_scale`` (B E): G[b, e, t] = gap[b, t] * gap_scale[b, e] (number of pruned positions times their Δ estimate).
Maths run in fp32 whatever the input dtype; the output has u's dtype.

Shapes: u, delta, z (B E L); A (E N); B, C (B N L); D, delta_bias (E); last state (B E N).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.ops import _cpu_kernel
from ssmtrim.ops.backend import mamba_selective_scan, resolve_backend


def selective_scan_ref(
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
    """Reference selective scan: a plain loop over tokens. Differentiable by autograd."""
    dtype_in = u.dtype
    gap = full_gap(gap, gap_scale)
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = delta if gap is None else delta + gap.float()
    dA = torch.exp(torch.einsum("bel,en->beln", decay, A))  # B E L N
    dBu = torch.einsum("bel,bnl,bel->beln", delta, B, u)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def full_gap(gap: Tensor | None, gap_scale: Tensor | None) -> Tensor | None:
    """The (B E L) gap from its factored form (counts (B L), scale (B E)); a whole gap is returned as it is."""
    if gap is None or gap_scale is None:
        return gap
    return gap.float()[:, None, :] * gap_scale.float()[:, :, None]


# ---------------------------------------------------------------------------------------------------------------
# the registered op (CPU kernel, with the reference loop as its fallback on other devices)


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _kernel_usable(u: Tensor, A: Tensor) -> bool:
    lib = _cpu_kernel.load() if u.device.type == "cpu" else None
    return lib is not None and A.shape[1] <= lib.ssm_max_state() and u.dtype != torch.float64


@torch.library.custom_op("ssmtrim::selective_scan", mutates_args=())
def _scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    gap: Tensor | None,
    gap_scale: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    if not _kernel_usable(u, A):
        with torch.no_grad():
            out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap, True, gap_scale)
        return out, last.to(u.dtype)
    lib = _cpu_kernel.load()
    bsz, e, length = u.shape
    n = A.shape[1]
    u32, d32, a32, z32, g32 = _f32(u), _f32(delta), _f32(A), _f32(z), _f32(gap)
    bt, ct = _f32(B.transpose(1, 2)), _f32(C.transpose(1, 2))
    D32, bias32, gs32 = _f32(D), _f32(delta_bias), _f32(gap_scale)
    out = torch.empty(bsz, e, length, dtype=torch.float32)
    last = torch.empty(bsz, e, n, dtype=torch.float32)
    args = [_ptr(x) for x in (u32, d32, a32, bt, ct, D32, z32, bias32, g32, gs32)]
    lib.ssm_scan_fwd(*args, int(delta_softplus), _ptr(out), _ptr(last), bsz, e, length, n, torch.get_num_threads())
    return out.to(u.dtype), last.to(u.dtype)


@_scan_op.register_fake
def _scan_op_fake(u, delta, A, B, C, D, z, delta_bias, gap, gap_scale, delta_softplus):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1])


_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "gap", "gap_scale")


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10])
    ctx.delta_softplus = inputs[10]


def _backward(ctx, dout: Tensor | None, dlast: Tensor | None):
    saved = ctx.saved_tensors
    u, A = saved[0], saved[2]
    if dout is None:
        dout = torch.zeros_like(u)
    if not _kernel_usable(u, A):
        return _backward_ref(saved, ctx.delta_softplus, dout, dlast)
    return _backward_kernel(saved, ctx.delta_softplus, dout, dlast)


def _backward_kernel(saved, delta_softplus: bool, dout: Tensor, dlast: Tensor | None):
    u, delta, A, B, C, D, z, delta_bias, gap, gap_scale = saved
    lib = _cpu_kernel.load()
    bsz, e, length = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32)
    du, ddelta = torch.empty(bsz, e, length, **f32), torch.empty(bsz, e, length, **f32)
    dA, dbt, dct = torch.empty(bsz, e, n, **f32), torch.empty(bsz, length, n, **f32), torch.empty(bsz, length, n, **f32)
    dD, dbias = torch.empty(bsz, e, **f32), torch.empty(bsz, e, **f32)
    dz = torch.empty(bsz, e, length, **f32) if z is not None else None
    dgap = torch.empty(bsz, e, length, **f32) if gap is not None else None
    ins = [_f32(x) for x in (u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z, delta_bias, gap, gap_scale)]
    grads_in = [_f32(dout), _f32(dlast)]
    outs = (du, ddelta, dA, dbt, dct, dD, dz, dbias, dgap)
    lib.ssm_scan_bwd(
        *[_ptr(x) for x in ins], int(delta_softplus), *[_ptr(x) for x in grads_in], *[_ptr(x) for x in outs],
        bsz, e, length, n, torch.get_num_threads(),
    )  # fmt: skip

    def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
        return None if g is None or like is None else g.to(like.dtype)

    dscale = None
    if gap_scale is not None:  # factored gap: G = counts x scale, so dcounts = sum_e dG scale, dscale = sum_t dG counts
        dscale = (dgap * gap.float()[:, None, :]).sum(2)
        dgap = (dgap * gap_scale.float()[:, :, None]).sum(1)
    return (
        cast(du, u), cast(ddelta, delta), cast(dA.sum(0), A), cast(dbt.transpose(1, 2), B),
        cast(dct.transpose(1, 2), C), cast(dD.sum(0), D), cast(dz, z), cast(dbias.sum(0), delta_bias),
        cast(dgap, gap), cast(dscale, gap_scale), None,
    )  # fmt: skip


def _backward_ref(saved, delta_softplus: bool, dout: Tensor, dlast: Tensor | None):
    """Backward by differentiating the reference loop (devices without the kernel, and fp64)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in saved]
    with torch.enable_grad():
        out, last = selective_scan_ref(*leaves[:8], delta_softplus, leaves[8], True, leaves[9])
        outputs, grads = [out], [dout]
        if dlast is not None:
            outputs.append(last)
            grads.append(dlast.to(last.dtype))
        present = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outputs, present, grads, allow_unused=True))
    result = [None if t is None else next(got) for t in leaves]
    result = [g if g is not None or t is None else torch.zeros_like(t) for g, t in zip(result, leaves, strict=True)]
    return (*result, None)


_scan_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# public entry point

_force_op = False


@contextlib.contextmanager
def scan_as_single_op() -> Iterator[None]:
    """Route every CPU scan through the registered op (kernel, or the reference loop inside it), so that tracers such
    as fvcore see one ``ssmtrim::selective_scan`` node instead of an unrolled loop. Used by FLOP counting."""
    global _force_op
    previous, _force_op = _force_op, True
    try:
        yield
    finally:
        _force_op = previous


def single_op_requested() -> bool:
    """Inside :func:`scan_as_single_op` (a tracer is counting): ops keep to what the tracer can see."""
    return _force_op


def selective_scan(
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
    backend: str | None = None,
    gap_scale: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan on the backend chosen by :mod:`ssmtrim.ops.backend` (or ``backend``); see module docstring."""
    chosen = "op" if _force_op and u.device.type == "cpu" else resolve_backend(u.device, backend)
    if chosen == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap, return_last_state,
                                  gap_scale)
    if chosen == "cuda":
        return _selective_scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, full_gap(gap, gap_scale),
                                     return_last_state)
    out, last = _scan_op(u, delta, A, B, C, D, z, delta_bias, gap, gap_scale, delta_softplus)
    return (out, last) if return_last_state else out


def _selective_scan_mamba(u, delta, A, B, C, D, z, delta_bias, delta_softplus, gap, return_last_state):
    scan_fn = mamba_selective_scan()[0]
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
