"""``portable``: the selective scan in plain PyTorch, parallel over the sequence, for any device without mamba-ssm.

The reference loop (:mod:`.ref`) runs L small steps one after another, which a GPU pays for in kernel launches and
its backward in a graph of L nodes. This backend computes the same recurrence in chunks of T tokens, in a fixed
number of whole-tensor steps (about log2 T + 4), differentiable by autograd and free of data-dependent Python
control flow (``torch.compile`` traces it as it is). ``auto`` takes it for CUDA tensors without mamba-ssm and for MPS
tensors. Not on CPU: there the C kernel (``cpu``) is far faster, and even ``ref``'s forward is, as the parallel form
makes more passes over (B E L N) tensors than the loop, whose per-step working set stays in cache (its backward,
though, beats differentiating the loop; ``benchmarks/bench_scan.py`` prints both). When it does run on CPU, the
channels go in cache-sized blocks (``CPU_BLOCK_ELEMENTS``).

Per channel e and state n the recurrence is ``h_t = a_t h_{t-1} + x_t`` with the log-decay
``s_t = (d_t + G_t) A[e, n]`` and the input ``x_t = d_t B[n, t] u_t`` (see :mod:`ssmtrim.ops.selective_scan`).
Because A is diagonal per (e, n), the decay differs per state: Mamba-2's chunked form, where one T x T decay matrix
per chunk serves every state, would need a T x T matrix per (e, n) here, T times the memory of the scan itself.
The chunks therefore run as follows, memory O(B E L N) per step:

1. within each chunk, a doubling scan: after step k every token holds the state and the decay of the window of 2^k
   tokens ending at it (clipped to the chunk start): ``h_t += p_t h_{t-m}``, ``p_t *= p_{t-m}`` with m = 2^(k-1) and
   p starting as the decay factor exp(s_t). After ceil(log2 T) steps ``h`` is the chunk's local state (started from
   zero) and ``p`` the product of the decays from the chunk start;
2. between chunks, the states are carried with the segment sums of the chunk log-decays (K x K per (e, n), K = L/T
   chunks): the state at the end of chunk c is ``sum_{c' <= c} exp(W_{c'+1} + ... + W_c) H_{c'}``;
3. each token adds the carried state, decayed from the chunk start: ``h_t = h_local_t + p_t H_in``, and
   ``y_t = C_t . h_t``.

Under ONNX export (:mod:`ssmtrim.export`) the recurrence is unrolled instead (:func:`_unrolled_scan`): chunks of about
sqrt(L) tokens, time-major, each token one multiply-add on a (B E K N) slice for every chunk at once, then the chunks'
end states carried one chunk after another. That is O(L) work where the doubling scan's is O(L log L), in a graph of a
few hundred small nodes per scan; in onnxruntime (one thread) it ran 2.2x faster than the doubling scan of the whole
sequence for a 65-token Vim block's shapes and 4.7x for a 257-token one, and level with it for VMamba's one-state scans,
where both are small (``benchmarks/bench_onnx_scan.py``, ``benchmarks/results/bench_onnx_scan.json``). The outer
products are broadcast multiplications rather than einsums: an ONNX runtime pays per node and runs Einsum slowly.

Numerics: within a chunk, decays are products of factors in [0, 1] (for a decaying scan: A < 0, Δ >= 0); between
chunks, every exponent is a sum of log-decays over a segment, summed from its own start (never the difference of two
long cumulative sums, which would cancel). A strong decay underflows to its true value, zero; nothing overflows.
Maths run in fp32 whatever the input dtype, as in ``ref``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ssmtrim.errors import ConfigError
from ssmtrim.ops.backends.base import Backend
from ssmtrim.ops.backends.ref import full_gap

__all__ = ["BACKEND", "default_chunk_size", "portable_scan"]


# On CPU, the channels run in blocks whose (B E L N) tensors hold about this many elements: fresh large tensors cost
# the CPU allocator page faults (about 5x the time of the arithmetic, measured), and blocks of ~2 MB stay in cache.
CPU_BLOCK_ELEMENTS = 1 << 19


def default_chunk_size(length: int) -> int:
    """T for a sequence of ``length``: the power of two at or above sqrt(L), at least 32, so that the doubling steps
    (log2 T) and the carried-state matrix (K^2 = (L/T)^2 <= L) both stay small."""
    return max(32, 1 << math.ceil(math.log2(max(1.0, math.sqrt(length)))))


def _channel_blocks(u: Tensor, n: int, chunk: int) -> list[slice]:
    """The channel ranges run one after another: one on accelerators and under ONNX export (blocks there would be
    copies of the scan's nodes in the file, as many as the batch makes: 96 per scan for a 257-token Vim at batch
    50), blocks of ``CPU_BLOCK_ELEMENTS`` on CPU."""
    bsz, e, length = u.shape
    per = e
    if u.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
        padded = -(-length // chunk) * chunk
        per = max(1, min(e, CPU_BLOCK_ELEMENTS // max(1, bsz * padded * n)))
    return [slice(i, min(i + per, e)) for i in range(0, e, per)]


def _chunk_local(a: Tensor, x: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The doubling scan inside each chunk. a (decay factors), x (B E K T N) -> (local state h, the product of the
    decays from the chunk start to each token), same shape."""
    h, k = x, 1
    while k < chunk:  # static: the chunk size is a Python int, the number of steps is ceil(log2 T)
        # the k tokens before the chunk start read as state 0 and decay 1
        h = torch.addcmul(h, a, F.pad(h[..., :-k, :], (0, 0, k, 0)))
        a = a * F.pad(a[..., :-k, :], (0, 0, k, 0), value=1.0)
        k *= 2
    return h, a


def _carry(total: Tensor, local_end: Tensor) -> Tensor:
    """States at the end of each chunk, every earlier chunk carried in. total, local_end (B E K N): each chunk's
    summed log-decay and its local end state -> (B E K N)."""
    n_chunks = total.shape[2]
    ones = torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=total.device)
    strict, lower = torch.tril(ones, -1), torch.tril(ones)
    # seg[c, c'] = W_{c'+1} + ... + W_c, each entry summed from its own start (no cancellation)
    rows = total.transpose(2, 3)[..., :, None].expand(*total.shape[:2], total.shape[3], n_chunks, n_chunks)
    seg = torch.cumsum(torch.where(strict, rows, 0.0), dim=-2)  # B E N K K
    carry = torch.where(lower, torch.exp(seg), 0.0)
    return torch.einsum("bencd,bedn->becn", carry, local_end)


def _chunked_scan(decay: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The recurrence proper, in fp32: decay (d + G) and du (d u) (B E L), A (E N), B, C (B N L) -> (C . h (B E L),
    the last state (B E N))."""
    bsz, e, length = du.shape
    n = A.shape[1]
    n_chunks = -(-length // chunk)
    # padded tokens have decay 0 (factor 1) and input 0: they leave the state as it is
    decay, du, B, C = (F.pad(t, (0, n_chunks * chunk - length)) for t in (decay, du, B, C))
    # outer products as broadcast multiplications (the same values; exported graphs run them far faster than Einsum)
    a = torch.exp(decay[..., None] * A[None, :, None, :]).reshape(bsz, e, n_chunks, chunk, n)  # decay factors
    x = (du[..., None] * B.transpose(1, 2)[:, None]).reshape(bsz, e, n_chunks, chunk, n)
    h, cumulative = _chunk_local(a, x, chunk)
    if n_chunks == 1:  # one chunk: nothing to carry in
        ends = h[..., -1, :]
    else:
        totals = decay.reshape(bsz, e, n_chunks, chunk).sum(-1)[..., None] * A[None, :, None, :]  # chunk log-decays
        ends = _carry(totals, h[..., -1, :])  # B E K N
        carried_in = torch.cat([torch.zeros_like(ends[:, :, :1]), ends[:, :, :-1]], dim=2)
        h = h + cumulative * carried_in[:, :, :, None, :]
    c = C.transpose(1, 2).reshape(bsz, n_chunks, chunk, n)
    y = (h * c[:, None]).sum(-1).reshape(bsz, e, -1)[..., :length]
    return y, ends[:, :, -1]


def unrolled_chunk_size(length: int) -> int:
    """T for :func:`_unrolled_scan`: the power of two nearest sqrt(L) (at least 2), so that the unrolled steps within
    a chunk (T) and between chunks (L/T) are about as many."""
    return max(2, 1 << round(math.log2(max(1.0, math.sqrt(length)))))


def _unrolled_scan(decay: Tensor, du: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The recurrence as :func:`_chunked_scan` computes it (same arguments and results), unrolled for a graph: within
    every chunk at once, token by token on time-major slices (T B E K N, so that each step reads contiguous memory);
    then the chunks' end states, chunk by chunk; then each token adds the state carried into its chunk, decayed from
    the chunk start. Python loops of static length: the graph holds about 2 (T + K) multiply-adds."""
    bsz, e, length = du.shape
    n_chunks = -(-length // chunk)
    # padded tokens have decay 0 (factor 1) and input 0: they leave the state as it is
    decay, du, B, C = (F.pad(t, (0, n_chunks * chunk - length)) for t in (decay, du, B, C))

    def time_major(t: Tensor) -> Tensor:  # B X L -> T B X K
        return t.reshape(bsz, t.shape[1], n_chunks, chunk).permute(3, 0, 1, 2)

    a = torch.exp(time_major(decay)[..., None] * A[None, None, :, None, :])  # T B E K N
    x = time_major(du)[..., None] * time_major(B).transpose(2, 3)[:, :, None]
    states, decays = [x[0]], [a[0]]  # each B E K N: the state from the chunk start, the decay product since it
    for t in range(1, chunk):
        states.append(torch.addcmul(x[t], a[t], states[-1]))
        decays.append(a[t] * decays[-1])
    h = torch.stack(states)  # T B E K N
    ends = [states[-1][:, :, 0]]
    for c in range(1, n_chunks):
        ends.append(torch.addcmul(states[-1][:, :, c], decays[-1][:, :, c], ends[-1]))
    if n_chunks > 1:
        carried_in = torch.stack([torch.zeros_like(ends[0]), *ends[:-1]], 2)  # B E K N
        h = torch.addcmul(h, torch.stack(decays), carried_in[None])
    y = (h * time_major(C).transpose(2, 3)[:, :, None]).sum(-1)  # T B E K
    return y.permute(1, 2, 3, 0).reshape(bsz, e, -1)[..., :length], ends[-1]


def portable_scan(
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
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan of :func:`ssmtrim.ops.selective_scan`, chunked (see the module docstring); ``chunk_size`` T
    defaults to :func:`default_chunk_size`, and under ONNX export (the unrolled form) to :func:`unrolled_chunk_size`.
    Shapes: u, delta, z (B E L); A (E N); B, C (B N L); last state (B E N), fp32 as in ``ref``.

    When a gradient is wanted, the chunked part is recomputed in the backward pass instead of kept (activation
    checkpointing): its intermediates are several (B E L N) tensors per scan, which a fine-tune of 24 bidirectional
    layers could not hold."""
    dtype_in = u.dtype
    exporting = torch.onnx.is_in_onnx_export()
    if chunk_size is None:
        chunk_size = unrolled_chunk_size(u.shape[2]) if exporting else default_chunk_size(u.shape[2])
    chunk = int(chunk_size)
    if chunk < 1:
        raise ConfigError(f"the portable scan's chunk size must be at least 1, not {chunk}; pass a positive size.")
    gap = full_gap(gap, gap_scale)
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = delta if gap is None else delta + gap.float()
    du, A, B, C = delta * u, A.float(), B.float(), C.float()
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (decay, du, A, B, C))
    parts = []
    form = _unrolled_scan if exporting else _chunked_scan  # the graph's form under ONNX export (module docstring)
    for ch in _channel_blocks(u, A.shape[1], chunk):
        args = (decay[:, ch], du[:, ch], A[ch], B, C, chunk)
        parts.append(checkpoint(form, *args, use_reentrant=False) if recompute else form(*args))
    ys, lasts = zip(*parts, strict=True)
    y, last = (ys[0], lasts[0]) if len(parts) == 1 else (torch.cat(ys, 1), torch.cat(lasts, 1))
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


scan = portable_scan  # the backend's scan: the default chunk size


BACKEND = Backend(
    name="portable",
    available=lambda device: (True, ""),
    scan=scan,
    # auto's choice on GPUs without a kernel of their own (CUDA without mamba-ssm, MPS), below cuda (mamba-ssm).
    # Not on CPU: there the parallel form's extra passes over (B E L N) cost more than ref's cache-resident loop.
    priority=5,
    devices=("cuda", "mps"),
)
