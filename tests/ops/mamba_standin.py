"""A stand-in for mamba-ssm's ``selective_scan_fn`` and causal-conv1d's ``causal_conv1d_fn``, for CPU tests.

It keeps the call contracts of the released packages (mamba-ssm 2.x ``mamba_ssm/ops/selective_scan_interface.py`` with
the checks of ``csrc/selective_scan/selective_scan.cpp``; causal-conv1d 1.x
``causal_conv1d/causal_conv1d_interface.py`` with those of ``csrc/causal_conv1d.cpp``), read from their public
source, and computes with ssmtrim's reference, so that every line of ssmtrim's ``cuda`` backend runs on CPU tensors.
Nothing here is mamba-ssm's code. :func:`install` puts it into ``sys.modules`` under the real module names (the
``mamba_standin`` fixture in ``tests/ops/conftest.py`` does that and allows the backend on CPU tensors).

The contracts, as the kernels enforce them (a violated check raises RuntimeError, as TORCH_CHECK does):

``selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False)`` (newer releases add a trailing ``cu_seqlens``, not modelled):
- u, delta, z (batch, dim, L) in fp32, fp16 or bf16, all of u's dtype; A (dim, dstate) fp32 (complex64 in the real
  kernel: not modelled), dstate <= 256;
- B, C "variable" (per token): (batch, dstate, L), which the wrapper views as (batch, 1, dstate, L), or grouped
  (batch, groups, dstate, L), channels split evenly over the groups (the kernel divides without checking; here it is
  checked); B and C in u's dtype with the same number of groups. Constant (dim, dstate) B/C exist but are not
  modelled;
- D and delta_bias (dim,) fp32 only; the wrapper makes u, delta, B, C, z unit-stride in the last dimension and D
  contiguous, but not delta_bias, which must already have a unit last stride;
- Δ = softplus(delta + delta_bias) when ``delta_softplus`` (threshold 20, as F.softplus), else delta + delta_bias;
- returns ``out`` (batch, dim, L) in u's dtype, gated by silu(z) when z is given, D u added when D is given; with
  ``return_last_state`` also the last state (batch, dim, dstate) in fp32; "the gradient of the last state is not
  considered in the backward pass": a gradient reaching it is dropped;
- backward: gradients in each input's dtype (dA, dD, ddelta_bias fp32), dout must be in u's dtype.

``causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
final_states_out=None, activation=None)``:
- x (batch, dim, L) fp32, fp16 or bf16; weight (dim, width) in any of the three, width 2 to 4; bias (dim,) in
  weight's dtype (the wrapper makes it contiguous);
- x must have a unit stride in L (contiguous layout) or in dim (channel-last); the wrapper copies any other layout
  to contiguous. Channel-last needs dim % 8 == 0 and x.stride(0), x.stride(2) multiples of 8;
- activation None, "silu" or "swish" (NotImplementedError otherwise); x is cast to weight's dtype, convolved
  causally (left padding width - 1), activated, and returned in x's dtype and layout (``empty_like(x)``);
- ``seq_idx``, ``initial_states`` and final states need channel-last input in the real kernel; not modelled here.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.ops.backends.ref import selective_scan_ref

VERSION = "2.2.4+standin"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Calls:
    """What the stand-in was asked to do, for tests to assert that a path went through it."""

    scan_forward: int = 0
    scan_backward: int = 0
    conv: int = 0
    scan_dtypes: list[torch.dtype] = field(default_factory=list)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"Expected {what} to be true, but got false.")  # TORCH_CHECK's message


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                delta_bias: Tensor | None) -> None:
    """selective_scan.cpp's checks, after the Python wrapper's fix-ups (B and C already 4-d)."""
    itype = u.dtype
    _check(itype in FLOATS, "input_type == Float || input_type == Half || input_type == BFloat16")
    if A.is_complex():
        raise NotImplementedError("the stand-in does not model complex A")
    _check(A.dtype == torch.float32, "weight_type == Float || weight_type == ComplexFloat")
    _check(delta.dtype == itype, "delta.scalar_type() == input_type")
    _check(B.dtype == itype, "B.scalar_type() == input_type")
    _check(C.dtype == itype, "C.scalar_type() == input_type")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        _check(t is None or t.device == u.device, f"{name}.is_cuda()")  # all on one device
    _check(u.stride(-1) == 1 or u.size(-1) == 1, "u.stride(-1) == 1 || u.size(-1) == 1")
    _check(delta.stride(-1) == 1 or delta.size(-1) == 1, "delta.stride(-1) == 1 || delta.size(-1) == 1")
    batch, dim, seqlen = u.shape
    dstate, groups = A.shape[1], B.shape[1]
    _check(dstate <= 256, "selective_scan only supports state dimension <= 256")
    _check(tuple(delta.shape) == (batch, dim, seqlen), "delta must have shape (batch_size, dim, seqlen)")
    _check(tuple(A.shape) == (dim, dstate), "A must have shape (dim, dstate)")
    for name, t in (("B", B), ("C", C)):
        _check(tuple(t.shape) == (batch, groups, dstate, seqlen),
               f"{name} must have shape (batch_size, n_groups, dstate, seqlen)")
        _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name}.stride(-1) == 1 || {name}.size(-1) == 1")
    _check(groups >= 1 and dim % groups == 0, "dim % n_groups == 0")  # not checked by the kernel: wrong there
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check(t.dtype == torch.float32, f"{name}.scalar_type() == at::ScalarType::Float")
            _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name}.stride(-1) == 1 || {name}.size(-1) == 1")
            _check(tuple(t.shape) == (dim,), f"{name} must have shape (dim)")
    if z is not None:
        _check(z.dtype == itype, "z.scalar_type() == input_type")
        _check(z.stride(-1) == 1 or z.size(-1) == 1, "z.stride(-1) == 1 || z.size(-1) == 1")
        _check(tuple(z.shape) == (batch, dim, seqlen), "z must have shape (batch_size, dim, seqlen)")


def _scan_by_group(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """ssmtrim's reference per group of channels (each group reads its own B, C): (out, last state in fp32)."""
    groups = B.shape[1]
    per = u.shape[1] // groups
    outs, lasts = [], []
    for g in range(groups):
        ch = slice(g * per, (g + 1) * per)
        by_channel = [None if t is None else t[ch] for t in (A, D, delta_bias)]
        u_g, delta_g, z_g = (None if t is None else t[:, ch] for t in (u, delta, z))
        out, last = selective_scan_ref(u_g, delta_g, by_channel[0], B[:, g], C[:, g], by_channel[1], z_g,
                                       by_channel[2], delta_softplus, None, True)
        outs.append(out)
        lasts.append(last.float())
    return torch.cat(outs, 1), torch.cat(lasts, 1)


def make_selective_scan_fn(calls: Calls):
    """``selective_scan_fn`` bound to a call record."""

    class SelectiveScanFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
            u, delta, B, C = _unit_last(u), _unit_last(delta), _unit_last(B), _unit_last(C)
            z = None if z is None else _unit_last(z)
            D = None if D is None else D.contiguous()
            ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
            if B.dim() == 2 or C.dim() == 2:
                raise NotImplementedError("the stand-in does not model constant (dim, dstate) B or C")
            B = B.unsqueeze(1) if ctx.squeeze_B else B
            C = C.unsqueeze(1) if ctx.squeeze_C else C
            _check_scan(u, delta, A, B, C, D, z, delta_bias)
            calls.scan_forward += 1
            calls.scan_dtypes.append(u.dtype)
            out, last = _scan_by_group(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
            ctx.delta_softplus = delta_softplus
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
            return (out, last) if return_last_state else out

        @staticmethod
        def backward(ctx, dout, *dlast_ignored):
            u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
            _check(dout.dtype == u.dtype, "dout.scalar_type() == input_type")
            calls.scan_backward += 1
            leaves = [None if t is None else t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, z,
                                                                                        delta_bias)]
            with torch.enable_grad():
                out, _ = _scan_by_group(*leaves, ctx.delta_softplus)
                present = [t for t in leaves if t is not None]
                got = iter(torch.autograd.grad(out, present, _unit_last(dout), allow_unused=True))
            grads = [None if t is None else next(got) for t in leaves]
            grads = [g if g is not None or t is None else torch.zeros_like(t) for g, t in zip(grads, leaves,
                                                                                             strict=True)]
            du, ddelta, dA, dB, dC, dD, dz, dbias = grads
            dB = dB.squeeze(1) if ctx.squeeze_B else dB
            dC = dC.squeeze(1) if ctx.squeeze_C else dC
            return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        """The stand-in for mamba-ssm's selective scan (see the module docstring for the contract)."""
        return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    return selective_scan_fn


def make_causal_conv1d_fn(calls: Calls):
    """``causal_conv1d_fn`` bound to a call record."""

    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        """The stand-in for causal-conv1d's conv (see the module docstring for the contract)."""
        if activation not in (None, "silu", "swish"):
            raise NotImplementedError("activation must be None, silu, or swish")
        if seq_idx is not None or initial_states is not None or return_final_states or final_states_out is not None:
            raise NotImplementedError("the stand-in does not model seq_idx, initial or final states")
        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        bias = None if bias is None else bias.contiguous()
        _check(x.dtype in FLOATS, "input_type == Float || input_type == Half || input_type == BFloat16")
        _check(weight.dtype in FLOATS, "weight_type == Float || weight_type == Half || weight_type == BFloat16")
        _check(x.dim() == 3 and weight.dim() == 2, "x must have shape (batch_size, dim, seqlen)")
        batch, dim, seqlen = x.shape
        width = weight.shape[-1]
        _check(tuple(weight.shape) == (dim, width), "weight must have shape (dim, width)")
        _check(weight.device == x.device, "weight.is_cuda()")
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            _check(dim % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now")
            _check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "causal_conv1d with channel last layout requires "
                   "strides (x.stride(0) and x.stride(2)) to be multiples of 8")
        _check(2 <= width <= 4, "causal_conv1d only supports width between 2 and 4")
        if bias is not None:
            _check(bias.dtype == weight.dtype, "bias.scalar_type() == weight_type")
            _check(tuple(bias.shape) == (dim,), "bias must have shape (dim)")
        calls.conv += 1
        y = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=width - 1, groups=dim)[..., :seqlen]
        y = y if activation is None else F.silu(y)
        return torch.empty_like(x).copy_(y)  # x's dtype and layout, as the kernel's output

    return causal_conv1d_fn


def modules(calls: Calls) -> dict[str, types.ModuleType]:
    """The module objects ssmtrim imports, by their real names."""

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    scan_fn, conv_fn = make_selective_scan_fn(calls), make_causal_conv1d_fn(calls)
    interface = module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=scan_fn)
    ops = module("mamba_ssm.ops", selective_scan_interface=interface)
    conv_interface = module("causal_conv1d.causal_conv1d_interface", causal_conv1d_fn=conv_fn)
    return {
        "mamba_ssm": module("mamba_ssm", __version__=VERSION, ops=ops),
        "mamba_ssm.ops": ops,
        "mamba_ssm.ops.selective_scan_interface": interface,
        "causal_conv1d": module("causal_conv1d", __version__="1.5.0+standin", causal_conv1d_fn=conv_fn,
                                causal_conv1d_interface=conv_interface),
        "causal_conv1d.causal_conv1d_interface": conv_interface,
    }


def install(monkeypatch) -> Calls:
    """Put the stand-in into ``sys.modules`` for the test (``monkeypatch`` undoes it); returns its call record."""
    calls = Calls()
    for name, mod in modules(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls
