"""``cpu``: the fused C kernel (``csrc/selective_scan.c``, built at first use by :mod:`ssmtrim.ops._cpu_kernel`) for
CPU tensors: forward and backward of the scan, and of the causal conv + SiLU.

The scan is one registered PyTorch op, ``ssmtrim::selective_scan``, so fvcore and other tracers see a single node;
its backward is the kernel's reverse sweep. Where the kernel cannot run (no compiler, fp64, a state size above the
kernel's limit, another device) the op runs the reference loop inside itself, which is what
:func:`ssmtrim.ops.selective_scan.scan_as_single_op` relies on. Maths run in fp32; outputs have u's dtype.
"""

from __future__ import annotations

import contextlib
import ctypes
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.ops import _cpu_kernel
from ssmtrim.ops.backends.base import (
    Backend,
    ConvKernel,
    GroupKernels,
    MergeKernels,
    TokenKernels,
    constant_when_compiled,
)
from ssmtrim.ops.backends.ref import selective_scan_ref

_VECTOR = 16  # channels per vector in csrc/selective_scan.c (W)
_MAX_CONV_WIDTH = 64  # MAXK there: the widest conv the token-major conv and the conv's backward take


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _profiled(name: str) -> contextlib.AbstractContextManager:
    """A profiler label around a C call, so that profiles show it; nothing when no profiler runs (entering a label
    costs about as much as a small kernel call, which at batch 1 is a share of a block's time)."""
    on = getattr(torch.autograd.profiler, "_is_profiler_enabled", True)  # unknown: label it
    return torch.profiler.record_function(name) if on else contextlib.nullcontext()


def _f32(t: Tensor | None) -> Tensor | None:
    """t as contiguous fp32 (itself where it is already: one check, since each call counts at batch 1)."""
    return t if t is None or (t.dtype == torch.float32 and t.is_contiguous()) else t.detach().float().contiguous()


def _kernel_usable(u: Tensor, A: Tensor) -> bool:
    lib = _cpu_kernel.load() if u.device.type == "cpu" else None
    return lib is not None and A.shape[1] <= lib.ssm_max_state() and u.dtype != torch.float64


def _say_why_reference(u: Tensor, A: Tensor) -> None:
    """The kernel is built but cannot take these tensors: say once that the reference loop runs instead."""
    lib = _cpu_kernel.load() if u.device.type == "cpu" else None
    if lib is None:
        return  # no kernel at all: resolve_backend has said so (auto) or refused (--backend cpu)
    from ssmtrim.notices import notice

    if u.dtype == torch.float64:
        notice("cpu-scan:fp64", "the fast CPU scan runs in fp32, so fp64 tensors use the slower reference scan.")
    elif A.shape[1] > lib.ssm_max_state():
        notice("cpu-scan:state", f"the fast CPU scan takes state sizes up to {lib.ssm_max_state()}, so d_state "
               f"{A.shape[1]} uses the slower reference scan.")


# ---------------------------------------------------------------------------------------------------------------
# the registered scan op


@torch.library.custom_op("ssmtrim::selective_scan", mutates_args=())
def scan_op(
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
        _say_why_reference(u, A)
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


@scan_op.register_fake
def _scan_op_fake(u, delta, A, B, C, D, z, delta_bias, gap, gap_scale, delta_softplus):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1])


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


scan_op.register_autograd(_backward, setup_context=_setup_context)


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
    """The scan through the registered op (the kernel, or the reference loop inside it)."""
    out, last = scan_op(u, delta, A, B, C, D, z, delta_bias, gap, gap_scale, delta_softplus)
    return (out, last) if return_last_state else out


# ---------------------------------------------------------------------------------------------------------------
# the causal conv + SiLU


def conv_accepts(x: Tensor, conv: nn.Conv1d) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and conv.kernel_size[0] <= _MAX_CONV_WIDTH)


def conv_run(x: Tensor, conv: nn.Conv1d, positions: Tensor | None, length: int | None = None) -> Tensor:
    """``ssm_conv_silu``: reads x (B E L) through its strides and visits only the present tokens (``positions``; the
    conv looks back only, so the original ``length`` is not needed)."""
    lib = _cpu_kernel.load()
    bsz, e, length = x.shape
    width = conv.kernel_size[0]
    weight = conv.weight.detach().reshape(e, width).contiguous()
    bias = None if conv.bias is None else conv.bias.detach().contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    out = torch.empty(bsz, e, length, dtype=torch.float32)
    sb, se, sl = x.stride()
    with _profiled("ssmtrim::causal_conv1d_silu"):  # so that profiles show the C call
        lib.ssm_conv_silu(_ptr(x), sb, se, sl, _ptr(pos), _ptr(weight), _ptr(bias), 1, _ptr(out), bsz, e, length,
                          width, torch.get_num_threads())
    return out


def conv_backward(x: Tensor, conv: nn.Conv1d, positions: Tensor | None,
                  grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``ssm_conv_silu_bwd``: the gradients of :func:`conv_run` (of x (B E L), of the weight (E 1 K) and of the bias
    (E), or None without one) given that of its output."""
    lib = _cpu_kernel.load()
    bsz, e, length = x.shape
    width = conv.kernel_size[0]
    x = x.detach().contiguous()
    weight = conv.weight.detach().reshape(e, width).contiguous()
    bias = None if conv.bias is None else conv.bias.detach().contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    grad = grad.float().contiguous()
    dx, dw = torch.zeros(bsz, e, length), torch.empty(e, width)
    db = None if bias is None else torch.empty(e)
    with _profiled("ssmtrim::causal_conv1d_silu_backward"):
        lib.ssm_conv_silu_bwd(_ptr(x), _ptr(pos), _ptr(weight), _ptr(bias), 1, _ptr(grad), _ptr(dx), _ptr(dw),
                              _ptr(db), bsz, e, length, width, torch.get_num_threads())
    return dx, dw.view_as(conv.weight), db


# ---------------------------------------------------------------------------------------------------------------
# token-major inference kernels (see ssmtrim.ops.tokens)


# (u, delta, A, B, C, D, delta_bias, gap, gap_scale): see tokens_scan
ScanInputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]


def tokens_accept(x: Tensor, d_inner: int, d_state: int) -> bool:
    """fp32 CPU tensors, a state the kernel holds, channels in whole vectors (the conv's SiLU then takes the same
    vector exp for every channel as the general path's conv, so both agree: to the bit with this project's GCC)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and d_state <= kernel_state_limit()
            and d_inner % _VECTOR == 0)


def tokens_scan_accept(x: Tensor, d_state: int) -> bool:
    """The scan alone (no conv): fp32 CPU tensors and a state the kernel holds; any number of channels (a partial
    vector of channels is padded inside the kernel, as the general path's scan pads it)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and d_state <= kernel_state_limit()


def _rows(t: Tensor) -> Tensor:
    """t (B L C) fp32 with unit channel stride (a view of a wider row is fine), else a contiguous copy."""
    return t if t.dtype == torch.float32 and t.stride(2) == 1 else t.float().contiguous()


def tokens_conv(x: Tensor, conv: nn.Conv1d, reverse: bool, positions: Tensor | None = None) -> Tensor:
    """``ssm_conv_silu_tok``: SiLU(causal conv) of x (B L E) read in scan order (reversed with ``reverse``), out (B L
    E) contiguous in scan order; ``positions`` (B L, scan order): the tokens' original positions, as for
    :func:`conv_run`. In a graph that ``torch.compile`` makes, the registered op ``ssmtrim::tokens_conv``."""
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    if torch.compiler.is_compiling():
        return torch.ops.ssmtrim.tokens_conv(x, weight, bias, reverse, positions)
    return _conv_tokens(x, weight, bias, reverse, positions)  # eager: the function itself, not the op's dispatch


def _conv_tokens(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool, positions: Tensor | None) -> Tensor:
    lib = _cpu_kernel.load()
    x = _rows(x)
    bsz, length, e = x.shape
    width = weight.shape[-1]
    weight = weight.contiguous()  # (E 1 width), as stored; the kernel lays a tap's weights out
    bias = None if bias is None else bias.contiguous()
    pos = None if positions is None else positions.to(torch.int64).contiguous()
    out = torch.empty(bsz, length, e, dtype=torch.float32)
    with _profiled("ssmtrim::tokens_conv"):
        lib.ssm_conv_silu_tok(_ptr(x), x.stride(0), x.stride(1), _ptr(pos), _ptr(weight), _ptr(bias), 1, int(reverse),
                              _ptr(out), bsz, e, length, width, torch.get_num_threads())
    return out


def tokens_scan(forward: ScanInputs, backward: ScanInputs, z: Tensor | None, delta_softplus: bool,
                backward_in_order: bool = False) -> Tensor:
    """``ssm_scan_bi_tok``: both directions in one call, each (u, delta, A, B, C, D, delta_bias, gap, gap_scale) with
    u, delta (B L E) and B, C (B L N) in its scan order, and the gap in factored form only (counts (B L) in its scan
    order, scale (B E)) or None; z (B L E) and the result, the mean of the two gated outputs, in original order
    (B L E, fp32, contiguous). With ``backward_in_order`` the backward direction's u, delta, B, C and gap counts are
    given in original order and read from the last token (no reversed copy is made). In a graph that
    ``torch.compile`` makes, the registered op ``ssmtrim::tokens_scan``."""
    for direction in (forward, backward):
        if (direction[7] is None) != (direction[8] is None):
            raise ValueError("the token-major scan takes the gap in factored form only: counts and scale together")
    if torch.compiler.is_compiling():
        return torch.ops.ssmtrim.tokens_scan(*forward, *backward, z, delta_softplus, backward_in_order)
    # eager: the function itself, not the op's dispatch
    return _scan_tokens(*forward, *backward, z, delta_softplus, backward_in_order)


def _scan_tokens(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, bias: Tensor | None,
    gap: Tensor | None, gap_scale: Tensor | None, u_b: Tensor, delta_b: Tensor, A_b: Tensor, B_b: Tensor, C_b: Tensor,
    D_b: Tensor | None, bias_b: Tensor | None, gap_b: Tensor | None, gap_scale_b: Tensor | None, z: Tensor | None,
    delta_softplus: bool, backward_in_order: bool = False,
) -> Tensor:
    if backward_in_order and gap_b is not None:
        gap_b = gap_b.flip(1)  # counts (B L) are read in scan order
    forward = (u, delta, A, B, C, D, bias, gap, gap_scale)
    backward = (u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, gap_b, gap_scale_b)
    lib = _cpu_kernel.load()
    keep: list[Tensor] = []  # what the pointers point into, alive until the call returns
    pointers, strides = [], []
    for reversed_read, (u, delta, A, B, C, D, bias, gap, gap_scale) in ((False, forward),
                                                                        (backward_in_order, backward)):
        rows = [_rows(u), _rows(delta), _f32(A), _rows(B), _rows(C), _f32(D), _f32(bias), _f32(gap), _f32(gap_scale)]
        keep += [t for t in rows if t is not None]
        pointers += [None if t is None else t.data_ptr() for t in rows]
        sequences = (rows[0], rows[1], rows[3], rows[4])
        if reversed_read:  # each sequence from its last token on, through a negative token stride
            for i, t in zip((0, 1, 3, 4), sequences, strict=True):
                pointers[-9 + i] += (t.shape[1] - 1) * t.stride(1) * t.element_size()
            strides += [s for t in sequences for s in (t.stride(0), -t.stride(1))]
        else:
            strides += [s for t in sequences for s in t.stride()[:2]]
    z = None if z is None else _rows(z)
    bsz, length, e = keep[0].shape
    n = forward[2].shape[1]
    out = torch.empty(bsz, length, e, dtype=torch.float32)
    ptr_array = (ctypes.c_void_p * len(pointers))(*pointers)
    stride_array = (ctypes.c_long * len(strides))(*strides)
    zs = z.stride()[:2] if z is not None else (0, 0)
    with _profiled("ssmtrim::tokens_scan"):
        lib.ssm_scan_bi_tok(ptr_array, stride_array, _ptr(z), zs[0], zs[1], int(delta_softplus), _ptr(out), bsz, e,
                            length, n, torch.get_num_threads())
    return out


# (conv weight, conv bias, positions, x_proj weight, dt_proj weight, dt_proj bias, A_log, D, gap counts): see
# tokens_mixer
MixerDirection = tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor | None,
                       Tensor | None]


def tokens_mixer(forward: MixerDirection, backward: MixerDirection, x: Tensor, z: Tensor | None,
                 gap_mode: int) -> Tensor:
    """A Vim mixer between its in_proj and out_proj in three calls: ``ssm_conv_pair_tok`` (both directions' conv +
    SiLU), each direction's x_proj (a PyTorch product), ``ssm_mixer_scan_tok`` (both scans, each direction's step Δ
    formed inside from its x_proj rows and dt_proj weight, A from A_log, the gap's scale from ``gap_mode``: 1 the mean
    Δ of the present tokens, 2 softplus(dt_proj's bias)). x, z (B L E) rows in original order; each direction's
    ``(conv weight, conv bias, positions, x_proj weight (R + 2N, E), dt_proj weight (E R), dt_proj bias, A_log, D,
    gap counts)``, positions and gap counts (B L) in its scan order or None; the result, the mean of the two gated
    outputs, (B L E) in original order. In a graph that ``torch.compile`` makes, the registered op
    ``ssmtrim::tokens_mixer``."""
    if torch.compiler.is_compiling():
        return torch.ops.ssmtrim.tokens_mixer(*forward, *backward, x, z, gap_mode)
    return _mixer_tokens(*forward, *backward, x, z, gap_mode)  # eager: the function itself, not the op's dispatch


def _mixer_tokens(
    conv_w: Tensor, conv_b: Tensor | None, pos: Tensor | None, x_w: Tensor, dt_w: Tensor, dt_b: Tensor, a_log: Tensor,
    d: Tensor | None, gap: Tensor | None, conv_w_b: Tensor, conv_b_b: Tensor | None, pos_b: Tensor | None,
    x_w_b: Tensor, dt_w_b: Tensor, dt_b_b: Tensor, a_log_b: Tensor, d_b: Tensor | None, gap_b: Tensor | None,
    x: Tensor, z: Tensor | None, gap_mode: int,
) -> Tensor:
    if (gap is None) != (gap_b is None) or (gap is not None and gap_mode not in (1, 2)):
        raise ValueError("the mixer kernel takes gap counts for both directions or neither, with gap_mode 1 or 2")
    lib = _cpu_kernel.load()
    threads = torch.get_num_threads()
    x = _rows(x)
    bsz, length, e = x.shape
    n = a_log.shape[1]
    rank = dt_w.shape[1]
    # what the pointers point into, alive until the calls return
    held = [_f32(t) for t in (conv_w, conv_b, conv_w_b, conv_b_b, dt_w, dt_b, a_log, d, gap, dt_w_b, dt_b_b, a_log_b,
                              d_b, gap_b)]
    conv_w, conv_b, conv_w_b, conv_b_b, dt_w, dt_b, a_log, d, gap, dt_w_b, dt_b_b, a_log_b, d_b, gap_b = held
    pos, pos_b = (None if t is None else _longs(t) for t in (pos, pos_b))
    xc = torch.empty(2, bsz, length, e, dtype=torch.float32)
    with _profiled("ssmtrim::tokens_mixer (convs)"):
        lib.ssm_conv_pair_tok(x.data_ptr(), x.stride(0), x.stride(1), _ptr(pos), _ptr(pos_b), conv_w.data_ptr(),
                              conv_w_b.data_ptr(), _ptr(conv_b), _ptr(conv_b_b), xc.data_ptr(), bsz, e, length,
                              conv_w.shape[-1], threads)
    # each direction's dt rows, B and C side by side (B L R+2N), as the general path's x_proj gives them
    rows = (F.linear(xc[0], x_w), F.linear(xc[1], x_w_b))
    pointers, strides = [], []
    for u, xd, a, dd, bias, g in ((xc[0], rows[0], a_log, d, dt_b, gap), (xc[1], rows[1], a_log_b, d_b, dt_b_b, gap_b)):
        base, step = xd.data_ptr(), xd.element_size()
        pointers += [u.data_ptr(), base, a.data_ptr(), base + rank * step, base + (rank + n) * step, _ptr(dd),
                     bias.data_ptr(), _ptr(g), None]
        sb, sl = xd.stride()[:2]
        strides += [u.stride(0), u.stride(1), sb, sl, sb, sl, sb, sl]
    z = None if z is None else _rows(z)
    zs = z.stride()[:2] if z is not None else (0, 0)
    out = torch.empty(bsz, length, e, dtype=torch.float32)
    with _profiled("ssmtrim::tokens_mixer (scans)"):
        lib.ssm_mixer_scan_tok((ctypes.c_void_p * 18)(*pointers), (ctypes.c_long * 16)(*strides),
                               (ctypes.c_void_p * 2)(dt_w.data_ptr(), dt_w_b.data_ptr()), rank, gap_mode, _ptr(z),
                               zs[0], zs[1], out.data_ptr(), bsz, e, length, n, threads)
    return out


# The same functions as registered ops, for the graphs torch.compile makes (which cannot call into ctypes). Inference
# only (they are taken when nothing needs a gradient), so each is a plain CPU kernel of a schema: about 5 us of
# dispatch a call where torch.library.custom_op's wrapper costs about 16 (benchmarks/bench_dispatch.py).
_INFERENCE_OPS = torch.library.Library("ssmtrim", "FRAGMENT")
_SCAN_DIRECTION = ("Tensor u{s}, Tensor delta{s}, Tensor A{s}, Tensor B{s}, Tensor C{s}, Tensor? D{s}, "
                   "Tensor? bias{s}, Tensor? gap{s}, Tensor? gap_scale{s}")
_MIXER_DIRECTION = ("Tensor conv_w{s}, Tensor? conv_b{s}, Tensor? pos{s}, Tensor x_w{s}, Tensor dt_w{s}, "
                    "Tensor dt_b{s}, Tensor a_log{s}, Tensor? d{s}, Tensor? gap{s}")
for _schema, _impl in (
    ("tokens_conv(Tensor x, Tensor weight, Tensor? bias, bool reverse, Tensor? positions) -> Tensor", _conv_tokens),
    (f"tokens_scan({_SCAN_DIRECTION.format(s='')}, {_SCAN_DIRECTION.format(s='_b')}, Tensor? z, "
     "bool delta_softplus, bool backward_in_order=False) -> Tensor", _scan_tokens),
    (f"tokens_mixer({_MIXER_DIRECTION.format(s='')}, {_MIXER_DIRECTION.format(s='_b')}, Tensor x, Tensor? z, "
     "int gap_mode) -> Tensor", _mixer_tokens),
):
    _INFERENCE_OPS.define(_schema)
    _INFERENCE_OPS.impl(_schema.split("(")[0], _impl, "CPU")


@torch.library.register_fake("ssmtrim::tokens_conv")
def _conv_tokens_fake(x, weight, bias, reverse, positions):
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("ssmtrim::tokens_mixer")
def _mixer_tokens_fake(*args):
    x = args[18]
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("ssmtrim::tokens_scan")
def _scan_tokens_fake(u, *rest):
    return u.new_empty(u.shape, dtype=torch.float32)


@constant_when_compiled  # a compiled graph takes the answer when it is made
def kernel_state_limit() -> int:
    """The largest d_state the kernel holds; 0 where it is not built."""
    lib = _cpu_kernel.load()
    return 0 if lib is None else int(lib.ssm_max_state())


# ---------------------------------------------------------------------------------------------------------------
# a merge step (ssmtrim/pruning/strategies/merge.py is the reference)


def merge_accepts(x: Tensor) -> bool:
    """fp32 CPU tensors, with the kernel built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and kernel_state_limit() > 0


def _longs(t: Tensor) -> Tensor:
    """t as contiguous int64 (itself where it is already)."""
    return t if t.dtype == torch.long and t.is_contiguous() else t.to(torch.long).contiguous()


def _bytes(mask: Tensor) -> Tensor:
    """A mask as contiguous bytes of 0 or 1, as the kernels read it: a contiguous bool tensor is that already."""
    return mask if mask.dtype == torch.bool and mask.is_contiguous() else mask.to(torch.uint8).contiguous()


def merge_choose(keys: Tensor, protected: Tensor, features: Tensor | None, removed: int,
                 n_drop: int, adjacent: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``ssm_merge_choose``: keys (B L, the ranking: the lowest leave; protected tokens +inf), protected (B L bool),
    features (B L F, rows of unit stride; None when nothing is merged) -> (src_all (B R) the leaving tokens in
    ranking order, index (B L-R) the staying ones in increasing order, dst (B R-n_drop) the staying unprotected
    token of highest cosine similarity of each merged one: ``src_all[:, n_drop:]``; with ``adjacent``, the more
    similar of the nearest staying unprotected tokens before and after it). In a graph that ``torch.compile`` makes,
    the registered op ``ssmtrim::merge_choose``."""
    if torch.compiler.is_compiling():
        return tuple(torch.ops.ssmtrim.merge_choose(keys, protected, features, removed, n_drop, adjacent))
    return _choose(keys, protected, features, removed, n_drop, adjacent)


def _choose(keys: Tensor, protected: Tensor, features: Tensor | None, removed: int,
            n_drop: int, adjacent: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    lib = _cpu_kernel.load()
    keys = _f32(keys)
    prot = _bytes(protected)
    bsz, length = keys.shape
    merged = removed - n_drop
    feats = None
    if features is not None and merged > 0:
        feats = _rows(features.detach())
    src_all = torch.empty(bsz, removed, dtype=torch.long)
    index = torch.empty(bsz, length - removed, dtype=torch.long)
    dst = torch.empty(bsz, max(merged, 0), dtype=torch.long)
    sfb, sfl, width = (feats.stride(0), feats.stride(1), feats.shape[2]) if feats is not None else (0, 0, 0)
    lib.ssm_merge_choose(_ptr(keys), _ptr(prot), _ptr(feats), sfb, sfl, bsz, length, width, removed, n_drop,
                         _ptr(src_all), _ptr(index), _ptr(dst), int(adjacent), torch.get_num_threads())
    return src_all, index, dst


def merge_bipartite(features: Tensor, protected: Tensor, removed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``ssm_bipartite_choose``: ToMe's choice on features (B L F) with protected (B L bool) tokens left out ->
    (src (B R) the A tokens that leave, in order of similarity, dst (B R) the B token each goes to, index (B L-R) the
    staying tokens in increasing order). In a graph that ``torch.compile`` makes, the registered op
    ``ssmtrim::merge_bipartite``."""
    if torch.compiler.is_compiling():
        return tuple(torch.ops.ssmtrim.merge_bipartite(features, protected, removed))
    return _bipartite(features, protected, removed)


def _bipartite(features: Tensor, protected: Tensor, removed: int) -> tuple[Tensor, Tensor, Tensor]:
    lib = _cpu_kernel.load()
    feats = _rows(features.detach())
    prot = _bytes(protected)
    bsz, length, width = feats.shape
    src = torch.empty(bsz, removed, dtype=torch.long)
    dst = torch.empty(bsz, removed, dtype=torch.long)
    index = torch.empty(bsz, length - removed, dtype=torch.long)
    lib.ssm_bipartite_choose(_ptr(feats), feats.stride(0), feats.stride(1), _ptr(prot), bsz, length, width, removed,
                             _ptr(src), _ptr(dst), _ptr(index), torch.get_num_threads())
    return src, dst, index


def merge_keep(index: Tensor, src: Tensor, dst: Tensor, sizes: Tensor, streams: tuple[Tensor | None, ...],
               rescale: bool = False) -> tuple[tuple[Tensor | None, ...], Tensor, Tensor]:
    """``ssm_merge_keep``: the staying tokens ``index`` (B K) of each stream (B L ..., fp32; None stays None), with
    ``src`` (B M) averaged into ``dst`` (B M) by size -> (merged streams (B K ...), new sizes (B K), slot_of (B L):
    each current token's slot among the staying ones, -1 where it leaves); with ``rescale`` each staying row that
    others were merged into rescaled to the size-weighted mean of their norms (merge's ``--option rescale=norm``). In
    a graph that ``torch.compile`` makes, the registered op ``ssmtrim::merge_keep``."""
    present = [t for t in streams if t is not None]
    if torch.compiler.is_compiling():
        *outs, new_sizes, slot_of = torch.ops.ssmtrim.merge_keep(index, src, dst, sizes, present, rescale)
    else:
        *outs, new_sizes, slot_of = _keep(index, src, dst, sizes, present, rescale)
    merged = iter(outs)
    return tuple(None if t is None else next(merged) for t in streams), new_sizes, slot_of


def _stream_arrays(present: list[Tensor], bsz: int, length: int, k: int) -> tuple[list[Tensor], list[Tensor], tuple]:
    """The merge kernels' view of the streams: (their rows (B L D_i, unit stride within a row; held alive until the
    call returns), the outputs (B K ...) to fill, the four ctypes arrays the C functions take: row pointers, row
    widths, (batch, token) strides, output pointers)."""
    rows_in = [_rows(t if t.dim() == 3 else t.reshape(bsz, length, math.prod(t.shape[2:]))) for t in present]
    outs = [torch.empty(bsz, k, *t.shape[2:], dtype=torch.float32) for t in present]
    n = len(present)
    arrays = ((ctypes.c_void_p * n)(*[t.data_ptr() for t in rows_in]),
              (ctypes.c_long * n)(*[t.shape[2] for t in rows_in]),
              (ctypes.c_long * (2 * n))(*[s for t in rows_in for s in t.stride()[:2]]),
              (ctypes.c_void_p * n)(*[t.data_ptr() for t in outs]))
    return rows_in, outs, arrays


def _keep(index: Tensor, src: Tensor, dst: Tensor, sizes: Tensor, present: list[Tensor],
          rescale: bool = False) -> list[Tensor]:
    """:func:`merge_keep` over the streams that are there: [their merged rows..., new sizes, slot_of]."""
    lib = _cpu_kernel.load()
    bsz, length = sizes.shape
    k, m = index.shape[1], src.shape[1]
    index, src, dst = (_longs(t) for t in (index, src, dst))
    sizes = _f32(sizes)
    rows_in, outs, arrays = _stream_arrays(present, bsz, length, k)
    new_sizes = torch.empty(bsz, k, dtype=torch.float32)
    slot_of = torch.empty(bsz, length, dtype=torch.long)
    lib.ssm_merge_keep(bsz, length, k, m, _ptr(index), _ptr(src), _ptr(dst), _ptr(sizes), len(present), *arrays,
                       _ptr(new_sizes), _ptr(slot_of), int(rescale), torch.get_num_threads())
    return [*outs, new_sizes, slot_of]


def merge_step(scores: Tensor, positions: Tensor, protected: Tensor | None, around: int, features: Tensor | None,
               sizes: Tensor | None, streams: tuple[Tensor | None, ...], removed: int, n_drop: int,
               adjacent: bool = False, rescale: bool = False) -> tuple[tuple[Tensor | None, ...], Tensor, ...]:
    """``ssm_merge_step``: a whole merge step in one call, :func:`merge_choose` then :func:`merge_keep`, with the
    ranking's keys made from ``scores`` (B L) there: the ``protected`` tokens (B P current indices; None: none) first
    to stay, then those within ``around`` original ``positions`` (B L) of one (0: none), then by score -> (merged
    streams, new sizes (B K), new positions (B K), the protected tokens' new indices (B P; None without), slot_of (B
    L), src_all (B R), index (B K), dst (B R-n_drop)). ``sizes`` None: every token of size 1. In a graph that
    ``torch.compile`` makes, the registered op ``ssmtrim::merge_step``."""
    present = [t for t in streams if t is not None]
    if torch.compiler.is_compiling():
        *outs, new_sizes, new_positions, new_protected, slot_of, src_all, index, dst = torch.ops.ssmtrim.merge_step(
            scores, positions, protected, around, features, sizes, present, removed, n_drop, adjacent, rescale)
    else:
        *outs, new_sizes, new_positions, new_protected, slot_of, src_all, index, dst = _step(
            scores, positions, protected, around, features, sizes, present, removed, n_drop, adjacent, rescale)
    merged = iter(outs)
    return (tuple(None if t is None else next(merged) for t in streams), new_sizes, new_positions,
            None if protected is None else new_protected, slot_of, src_all, index, dst)


def _step(scores: Tensor, positions: Tensor, protected: Tensor | None, around: int, features: Tensor | None,
          sizes: Tensor | None, present: list[Tensor], removed: int, n_drop: int, adjacent: bool = False,
          rescale: bool = False) -> list[Tensor]:
    """:func:`merge_step` over the streams that are there: [their merged rows..., new sizes, new positions, new
    protected indices (B 0 without), slot_of, src_all, index, dst]."""
    lib = _cpu_kernel.load()
    bsz, length = positions.shape
    k, merged = length - removed, removed - n_drop
    if not 0 <= n_drop <= removed <= length or (features is None and merged > 0):
        raise ValueError(f"a merge step removes 0 <= n_drop <= removed <= {length} tokens and needs features to merge "
                         f"any, got removed {removed}, n_drop {n_drop}, features {features is not None}")
    if any(t is not None and tuple(t.shape[:2]) != (bsz, length) for t in (scores, sizes, features, *present)) or \
            (protected is not None and (protected.dim() != 2 or protected.shape[0] != bsz)):
        raise ValueError(f"a merge step's scores, sizes, features and streams are (B L ...) = ({bsz} {length} ...) "
                         "as its positions, and its protected indices (B P)")
    scores, sizes = _f32(scores), _f32(sizes)
    positions, prot = (None if t is None else _longs(t) for t in (positions, protected))
    # the kernels run where nothing needs a gradient: no detach (at batch 1 each call counts)
    feats = _rows(features) if features is not None and merged > 0 else None
    sfb, sfl, width = (feats.stride(0), feats.stride(1), feats.shape[2]) if feats is not None else (0, 0, 0)
    rows_in, outs, arrays = _stream_arrays(present, bsz, length, k)
    n_prot = 0 if prot is None else prot.shape[1]
    new_sizes = torch.empty(bsz, k, dtype=torch.float32)
    new_positions = torch.empty(bsz, k, dtype=torch.long)
    new_protected = torch.empty(bsz, n_prot, dtype=torch.long)
    slot_of = torch.empty(bsz, length, dtype=torch.long)
    src_all = torch.empty(bsz, removed, dtype=torch.long)
    index = torch.empty(bsz, k, dtype=torch.long)
    dst = torch.empty(bsz, merged, dtype=torch.long)
    with _profiled("ssmtrim::merge_step"):
        lib.ssm_merge_step(_ptr(scores), _ptr(positions), _ptr(prot), n_prot, around, _ptr(feats), sfb, sfl, width,
                           _ptr(sizes), bsz, length, removed, n_drop, int(adjacent), len(present), *arrays,
                           int(rescale), _ptr(src_all), _ptr(index), _ptr(dst), _ptr(new_sizes), _ptr(slot_of),
                           _ptr(new_positions), _ptr(new_protected), torch.get_num_threads())
    return [*outs, new_sizes, new_positions, new_protected, slot_of, src_all, index, dst]


# registered ops for compiled graphs, as the token-major kernels are
_INFERENCE_OPS.define("merge_choose(Tensor keys, Tensor protected, Tensor? features, int removed, int n_drop, "
                      "bool adjacent=False) -> (Tensor, Tensor, Tensor)")
_INFERENCE_OPS.impl("merge_choose", _choose, "CPU")
_INFERENCE_OPS.define("merge_keep(Tensor index, Tensor src, Tensor dst, Tensor sizes, Tensor[] present, "
                      "bool rescale=False) -> Tensor[]")
_INFERENCE_OPS.impl("merge_keep", _keep, "CPU")
_INFERENCE_OPS.define("merge_step(Tensor scores, Tensor positions, Tensor? protected, int around, Tensor? features, "
                      "Tensor? sizes, Tensor[] present, int removed, int n_drop, bool adjacent=False, "
                      "bool rescale=False) -> Tensor[]")
_INFERENCE_OPS.impl("merge_step", _step, "CPU")
_INFERENCE_OPS.define("merge_bipartite(Tensor features, Tensor protected, int removed) -> (Tensor, Tensor, Tensor)")
_INFERENCE_OPS.impl("merge_bipartite", _bipartite, "CPU")


@torch.library.register_fake("ssmtrim::merge_bipartite")
def _bipartite_fake(features, protected, removed):
    bsz, length = protected.shape
    src = features.new_empty(bsz, removed, dtype=torch.long)
    return src, src.new_empty(bsz, removed), src.new_empty(bsz, length - removed)


@torch.library.register_fake("ssmtrim::merge_choose")
def _choose_fake(keys, protected, features, removed, n_drop, adjacent=False):
    bsz, length = keys.shape
    index = keys.new_empty(bsz, length - removed, dtype=torch.long)
    return keys.new_empty(bsz, removed, dtype=torch.long), index, index.new_empty(bsz, max(removed - n_drop, 0))


@torch.library.register_fake("ssmtrim::merge_step")
def _step_fake(scores, positions, protected, around, features, sizes, present, removed, n_drop, adjacent=False,
               rescale=False):
    bsz, length = positions.shape
    k = length - removed
    index = positions.new_empty(bsz, k, dtype=torch.long)
    return [*(t.new_empty(bsz, k, *t.shape[2:], dtype=torch.float32) for t in present),
            scores.new_empty(bsz, k, dtype=torch.float32), index.new_empty(bsz, k),
            index.new_empty(bsz, 0 if protected is None else protected.shape[1]), index.new_empty(bsz, length),
            index.new_empty(bsz, removed), index.new_empty(bsz, k), index.new_empty(bsz, removed - n_drop)]


@torch.library.register_fake("ssmtrim::merge_keep")
def _keep_fake(index, src, dst, sizes, present, rescale=False):
    bsz, k = index.shape
    return [*(t.new_empty(bsz, k, *t.shape[2:], dtype=torch.float32) for t in present),
            sizes.new_empty(bsz, k, dtype=torch.float32), index.new_empty(bsz, sizes.shape[1])]


# ---------------------------------------------------------------------------------------------------------------
# groups of positions (unmerge's blocks; ssmtrim/models/tokens.py's Unmerge is the reference)


def group_mean(x: Tensor, owner: Tensor, sizes: Tensor) -> Tensor:
    """``ssm_group_mean``: x (B L ..., fp32), owner (B L) in [0, K), sizes (B K) -> (B K ...) the mean of the rows
    each group owns. In a graph that ``torch.compile`` makes, the registered op ``ssmtrim::group_mean``."""
    if torch.compiler.is_compiling():
        return torch.ops.ssmtrim.group_mean(x, owner, sizes)
    return _group_mean(x, owner, sizes)


def _group_mean(x: Tensor, owner: Tensor, sizes: Tensor) -> Tensor:
    lib = _cpu_kernel.load()
    bsz, length = owner.shape
    k = sizes.shape[1]
    rows = _rows(x.detach().reshape(bsz, length, math.prod(x.shape[2:])))
    out = torch.empty(bsz, k, *x.shape[2:], dtype=torch.float32)
    owner, sizes = owner.to(torch.long).contiguous(), _f32(sizes)
    lib.ssm_group_mean(_ptr(rows), rows.stride(0), rows.stride(1), bsz, length, k, rows.shape[2], _ptr(owner),
                       _ptr(sizes), _ptr(out), torch.get_num_threads())
    return out


def group_add(x: Tensor, update: Tensor, owner: Tensor, scale: Tensor | None) -> Tensor:
    """``ssm_group_add``: x (B L ..., fp32) + scale * update[owner] (update B K ..., owner (B L) in [0, K), scale
    over the last dimension or None) -> (B L ...), a residual add un-merging an update made on the tokens. In a graph
    that ``torch.compile`` makes, the registered op ``ssmtrim::group_add``."""
    if torch.compiler.is_compiling():
        return torch.ops.ssmtrim.group_add(x, update, owner, scale)
    return _group_add(x, update, owner, scale)


def _group_add(x: Tensor, update: Tensor, owner: Tensor, scale: Tensor | None) -> Tensor:
    lib = _cpu_kernel.load()
    bsz, length = owner.shape
    width = math.prod(x.shape[2:])
    rows = _rows(x.detach().reshape(bsz, length, width))
    upd = _rows(update.detach().reshape(bsz, update.shape[1], width))
    if scale is not None:
        scale = _f32(scale.detach().expand(x.shape[-1]).repeat(width // x.shape[-1]))
    owner = owner.to(torch.long).contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.ssm_group_add(_ptr(rows), rows.stride(0), rows.stride(1), _ptr(upd), upd.stride(0), upd.stride(1),
                      _ptr(owner), _ptr(scale), _ptr(out), bsz, length, width, torch.get_num_threads())
    return out


def regroup(z: Tensor, anchors: Tensor, sizes: Tensor, alone: Tensor | None, count: int,
            rounds: int) -> tuple[Tensor, Tensor]:
    """``ssm_regroup``: the positions of z (B L D, fp32) grouped around ``count`` of the tokens at ``anchors`` (B K;
    the largest by ``sizes`` (B K), an ``alone`` (B K bool) token first) by cosine, then ``rounds`` rounds of
    k-means -> (owner (B L) in [0, count), counts (B count) fp32). In a graph that ``torch.compile`` makes, the
    registered op ``ssmtrim::regroup``."""
    if torch.compiler.is_compiling():
        return tuple(torch.ops.ssmtrim.regroup(z, anchors, sizes, alone, count, rounds))
    return _regroup(z, anchors, sizes, alone, count, rounds)


def _regroup(z: Tensor, anchors: Tensor, sizes: Tensor, alone: Tensor | None, count: int,
             rounds: int) -> tuple[Tensor, Tensor]:
    lib = _cpu_kernel.load()
    bsz, length, width = z.shape
    k = anchors.shape[1]
    z = _rows(z.detach())
    anchors, sizes = anchors.to(torch.long).contiguous(), _f32(sizes)
    solo = None if alone is None else alone.to(torch.uint8).contiguous()
    owner = torch.empty(bsz, length, dtype=torch.long)
    counts = torch.empty(bsz, count, dtype=torch.float32)
    lib.ssm_regroup(_ptr(z), z.stride(0), z.stride(1), bsz, length, width, k, count, _ptr(anchors), _ptr(sizes),
                    _ptr(solo), rounds, _ptr(owner), _ptr(counts), torch.get_num_threads())
    return owner, counts


_INFERENCE_OPS.define("group_mean(Tensor x, Tensor owner, Tensor sizes) -> Tensor")
_INFERENCE_OPS.impl("group_mean", _group_mean, "CPU")
_INFERENCE_OPS.define("group_add(Tensor x, Tensor update, Tensor owner, Tensor? scale) -> Tensor")
_INFERENCE_OPS.impl("group_add", _group_add, "CPU")
_INFERENCE_OPS.define("regroup(Tensor z, Tensor anchors, Tensor sizes, Tensor? alone, int count, int rounds) "
                      "-> (Tensor, Tensor)")
_INFERENCE_OPS.impl("regroup", _regroup, "CPU")


@torch.library.register_fake("ssmtrim::group_mean")
def _group_mean_fake(x, owner, sizes):
    return x.new_empty(owner.shape[0], sizes.shape[1], *x.shape[2:], dtype=torch.float32)


@torch.library.register_fake("ssmtrim::group_add")
def _group_add_fake(x, update, owner, scale):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.register_fake("ssmtrim::regroup")
def _regroup_fake(z, anchors, sizes, alone, count, rounds):
    bsz, length = z.shape[:2]
    return anchors.new_empty(bsz, length, dtype=torch.long), z.new_empty(bsz, count, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the backend


def available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, (f"the 'cpu' scan backend runs on CPU tensors but the model is on {device.type}; choose "
                       "--backend auto.")
    status = _cpu_kernel.status()
    if not status.available:
        return False, f"the fast CPU scan is unavailable ({status.detail}); install gcc or choose --backend ref."
    return True, ""


def describe() -> dict[str, str]:
    status = _cpu_kernel.status()
    return {"fast CPU kernel": status.detail if status.available else f"unavailable: {status.detail}"}


BACKEND = Backend(
    name="cpu",
    available=available,
    scan=scan,
    conv=ConvKernel(accepts=conv_accepts, run=conv_run, backward=conv_backward),
    priority=10,
    devices=("cpu",),
    note=lambda: _cpu_kernel.status().detail,
    describe=describe,
    tokens=TokenKernels(accepts=tokens_accept, conv=tokens_conv, scan=tokens_scan,
                        scan_accepts=tokens_scan_accept, mixer=tokens_mixer),
    merge=MergeKernels(accepts=merge_accepts, choose=merge_choose, keep=merge_keep, bipartite=merge_bipartite,
                      step=merge_step),
    group=GroupKernels(accepts=merge_accepts, mean=group_mean, regroup=regroup, add=group_add),
)
