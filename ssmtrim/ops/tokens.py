"""Inference kernels on token-major activations, for bidirectional mixers (Vim's): no transposes, flips or copies;
and for a merge step.

A Vim mixer's projections produce rows (B L E), one per token, while the general ops take channel-major (B E L)
sequences, and the backward direction reads them reversed: the general path pays a transpose copy before and after
each kernel and a flip copy per reversed tensor. Where the chosen backend has :class:`TokenKernels` (the ``cpu``
backend's C kernels) and nothing needs a gradient, the mixer runs on them instead (in a graph ``torch.compile`` makes
too, as the registered ops ``ssmtrim::tokens_mixer``, or ``ssmtrim::tokens_conv`` and ``ssmtrim::tokens_scan``; not in
an exported file or a FLOP count, which hold standard ops only):

- ``conv(x, conv, reverse, positions=None)``: SiLU(causal depth-wise conv1d) of x (B L E) in scan order (the tokens
  reversed with ``reverse``), result (B L E) contiguous in scan order, ready for ``x_proj``; ``positions`` (B L, scan
  order) as for :func:`ssmtrim.ops.conv.causal_conv1d_silu`;
- ``scan(forward, backward, z, delta_softplus)``: the selective scan of :func:`ssmtrim.ops.selective_scan` in both
  directions in one call, each direction's ``(u, delta, A, B, C, D, delta_bias, gap, gap_scale)`` with u, delta
  (B L E) and B, C (B L N) in its scan order and the gap decay of a reduced sequence in factored form (counts (B L)
  in scan order, Δ estimate (B E)) or None; z and the result, the mean of the two gated outputs, (B L E) in the
  original order; with ``backward_in_order`` the backward direction is given in original order and read from its
  end (no reversed copy).

- ``mixer(forward, backward, x, z, gap_mode)`` (where the backend has it; the ``cpu`` backend does): everything
  between a Vim mixer's in_proj and out_proj in three calls, both directions' conv + SiLU in one C call, each
  direction's x_proj as a PyTorch product, and both scans in one C call that forms each direction's step Δ from its
  dt rows and dt_proj's weight (the low-rank product, no (B L E) Δ made before), A from A_log and the gap's scale
  (the present tokens' mean step, or softplus of dt_proj's bias) itself: at batch 1 a block's fixed cost, a dozen
  small calls, falls by about a third (registered op ``ssmtrim::tokens_mixer`` in a compiled graph). The same values
  as ``conv`` and ``scan`` called one by one, to the cross-CPU tolerance (the sums and exponentials are the kernel's
  own).

A mixer without Vim's causal conv takes the scan alone where :func:`scan_kernels` says so: VMamba's SS2D scans its
four routes as two such calls, row-major forward and reversed (the tokens' rows as they are) and column-major
forward and reversed (one transposed copy), each route's projections applied to the rows in that order.

A merge step (``ssmtrim.pruning.strategies.merge``) is a few dozen small PyTorch ops, which at batch 1 cost about
as much as a block; where the backend has :class:`MergeKernels` (the ``cpu`` backend) and nothing needs a gradient,
it is one C call instead (``step``, registered op ``ssmtrim::merge_step`` in a compiled graph) or, where the step
needs more than ``step`` takes (merge's ``redundancy`` option; ToMe's choice), two (``choose`` or ``bipartite``, then
``keep``; registered ops ``ssmtrim::merge_choose``, ``ssmtrim::merge_keep``), :func:`merge_kernels` saying when:

- ``step(scores, positions, protected, around, features, sizes, streams, removed, n_drop, adjacent, rescale)``:
  ``choose`` then ``keep`` with the ranking's keys made from the scores in the same call (the protected tokens
  first, then those within ``around`` original positions of one, then by score, as ``choose_merges`` ranks them), and
  the staying tokens' original positions and the protected tokens' new indices besides; the reference's choice, owner
  map and positions exactly, its rows to rounding;

- ``choose(keys, protected, features, removed, n_drop)``: the ``removed`` tokens of lowest key leave (a stable sort:
  ties by position), ``(src_all, index, dst)`` as ``choose_merges`` returns them, each merged token's target found by
  the cosine similarity of ``features`` (the first on a tie);
- ``bipartite(features, protected, removed)``: ToMe's choice (``ssmtrim.pruning.strategies.tome.choose_bipartite``:
  the unprotected tokens alternate between A and B, each A token's most similar B token, the A tokens of highest
  similarity leave), with the staying tokens' indices, so that ``keep`` can follow (registered op
  ``ssmtrim::merge_bipartite``);
- ``keep(index, src, dst, sizes, streams, rescale=False)``: the staying rows with the merged ones averaged in by
  size (summed in the reference's order), the new sizes, and each current token's slot; with ``rescale`` each row
  that others were merged into rescaled to the size-weighted mean of their norms (norms summed in double).

Unmerge's blocks (``ssmtrim.models.tokens.Unmerge``) average the positions each token owns before a block's mixer or
MLP, regroup the positions by each MLP's input (a few k-means rounds) and add the update back to every position:
where the backend has :class:`GroupKernels` (the ``cpu`` backend) and nothing needs a gradient, each is one C call
(registered ops ``ssmtrim::group_mean``, ``ssmtrim::regroup``, ``ssmtrim::group_add``), :func:`group_kernels`
saying when:

- ``mean(x, owner, sizes)``: each group's rows summed in row order, then divided by its size;
- ``regroup(z, anchors, sizes, alone, count, rounds)``: the reference's regrouping (``Unmerge.for_mlp``), its
  similarities summed in another order, so that a position can join another group only where two groups are
  equally like it to rounding;
- ``add(x, update, owner, scale)``: ``x + scale * update[owner]`` in one pass (a multiply-add the compiler may fuse).

The choice is the reference's; the similarities and sums are computed in another order than PyTorch's, so values
agree to rounding (the tests check 1e-6 of the largest value) and a merge target can differ only where two staying
tokens are equally similar to rounding.

The token kernels compute every value with the same C functions as the general path: with this project's GCC the
outputs are the same bits on one machine; another compiler may fuse a multiply-add at one call site and not the other
(the tests check the agreement to 1e-5 of the largest value).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssmtrim.ops.backend import backend_for
from ssmtrim.ops.backends.base import GroupKernels, MergeKernels, TokenKernels
from ssmtrim.ops.selective_scan import single_op_requested

__all__ = ["GroupKernels", "MergeKernels", "TokenKernels", "group_kernels", "merge_kernels", "scan_kernels",
           "token_kernels"]


def standard_ops_only() -> bool:
    """An export, a jit trace or a FLOP count is watching: the file or the count holds standard ops only (a graph
    ``torch.compile`` makes takes the kernels as registered ops)."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or single_op_requested()


def _plain_causal(conv: nn.Conv1d, channels: int) -> bool:
    width = conv.kernel_size[0]
    return (conv.groups == channels and conv.padding == (width - 1,) and conv.stride == (1,)
            and conv.dilation == (1,))


def token_kernels(x: Tensor, mixer: nn.Module, convs: tuple[nn.Conv1d, ...], d_inner: int,
                  d_state: int) -> TokenKernels | None:
    """The chosen backend's token-major kernels when they may run on x (B L D) through ``mixer``: no gradient wanted,
    no export or FLOP count watching (``torch.compile`` takes them as the registered ops ``ssmtrim::tokens_conv`` and
    ``ssmtrim::tokens_scan``), Vim's causal depth-wise convs; else None (the general path)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in mixer.parameters())):
        return None
    if standard_ops_only():
        return None
    if not all(_plain_causal(conv, conv.in_channels) and conv.weight.dtype == x.dtype for conv in convs):
        return None
    kernels = backend_for(x.device).tokens
    return kernels if kernels is not None and kernels.accepts(x, d_inner, d_state) else None


def scan_kernels(x: Tensor, module: nn.Module, d_inner: int, d_state: int) -> TokenKernels | None:
    """The chosen backend's token-major kernels when their scan may run on activations like x (``d_inner``
    channels) for ``module`` (a mixer without Vim's causal conv, such as VMamba's routes): no gradient wanted, no
    export or FLOP count watching, a backend whose scan takes them; else None (the general path)."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return None
    if standard_ops_only():
        return None
    kernels = backend_for(x.device).tokens
    if kernels is None:
        return None
    accepts = kernels.scan_accepts
    return kernels if (accepts(x, d_state) if accepts is not None else kernels.accepts(x, d_inner, d_state)) else None


def merge_kernels(*tensors: Tensor | None) -> MergeKernels | None:
    """The chosen backend's merge-step kernels when they may take ``tensors`` (the streams, sizes, features of one
    step): no gradient wanted, no export or FLOP count watching (``torch.compile`` takes them as the registered ops
    ``ssmtrim::merge_step``, ``ssmtrim::merge_choose`` and ``ssmtrim::merge_keep``), all on a device and in a dtype
    they accept; else None."""
    return _inference_kernels("merge", tensors)


def group_kernels(*tensors: Tensor | None) -> GroupKernels | None:
    """The chosen backend's group kernels when they may take ``tensors``: no gradient wanted, no export or FLOP count
    watching (``torch.compile`` takes them as the registered ops ``ssmtrim::group_mean``, ``ssmtrim::regroup`` and
    ``ssmtrim::group_add``), all on a device and in a dtype they accept; else None."""
    return _inference_kernels("group", tensors)


def _inference_kernels(kind: str, tensors: tuple[Tensor | None, ...]):
    """The chosen backend's ``kind`` kernels ("merge", "group") when they may take ``tensors``, else None."""
    present = [t for t in tensors if t is not None]
    if not present or standard_ops_only():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return None
    kernels = getattr(backend_for(present[0].device), kind)
    return kernels if kernels is not None and all(kernels.accepts(t) for t in present) else None
