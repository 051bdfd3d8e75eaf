"""``ref``: the readable selective scan, a plain loop over tokens, on any device; the reference twin of the fast
backends (same semantics as mamba-ssm's ``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``).
See :mod:`ssmtrim.ops.selective_scan` for the recurrence and the shapes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmtrim.ops.backends.base import Backend


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


BACKEND = Backend(
    name="ref",
    available=lambda device: (True, ""),
    scan=selective_scan_ref,
    priority=0,  # auto's last resort: runs everywhere
)
