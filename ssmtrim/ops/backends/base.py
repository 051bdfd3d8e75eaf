"""What a selective-scan backend is: one object naming how the scan (and, optionally, Vim's causal conv + SiLU) runs
and where it can. The table of registered backends is :mod:`ssmtrim.ops.backends`; the choice is made in one place,
:func:`ssmtrim.ops.backend.resolve_backend`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

# scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, gap=None, return_last_state=False,
#      gap_scale=None) -> out or (out, last state): the signature of ssmtrim.ops.selective_scan
ScanFn = Callable[..., Tensor | tuple[Tensor, Tensor]]


def constant_when_compiled(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does (a compiled graph takes its answer when the graph
    is made), without importing torch._dynamo when ssmtrim is imported: that import creates an inductor folder in
    the temporary directory. ``tests/test_compile.py`` fails if the mark stops working."""
    fn._dynamo_marked_constant = True
    return fn


class ConvKernel(NamedTuple):
    """A fast causal depth-wise conv1d + SiLU (see :mod:`ssmtrim.ops.conv` for the meaning).

    ``accepts(x, conv)`` says whether it takes this input (device, dtype); ``run(x, conv, positions, length)``
    computes it (``length``: the original sequence length when ``positions`` are given, or None);
    ``backward(x, conv, positions, grad)``, where the kernel has one, gives the gradients (of x, of the conv's weight
    and of its bias, or None without one) for training; without it gradients go to PyTorch's conv. Tracers and conv
    layouts other than Vim's are sent to PyTorch before any is asked."""

    accepts: Callable[[Tensor, nn.Conv1d], bool]
    run: Callable[[Tensor, nn.Conv1d, Tensor | None, int | None], Tensor]
    backward: Callable[[Tensor, nn.Conv1d, Tensor | None, Tensor], tuple[Tensor, Tensor, Tensor | None]] | None = None


class TokenKernels(NamedTuple):
    """Inference kernels on token-major activations (B L E), the layout a bidirectional mixer's projections produce,
    so that neither transposes nor flips are copied (see :mod:`ssmtrim.ops.tokens` for the meaning).

    ``accepts(x, d_inner, d_state)`` says whether they take this input; ``conv(x, conv, reverse, positions)`` is the
    causal conv + SiLU in scan order; ``scan(forward, backward, z, delta_softplus, backward_in_order=False)`` both
    scan directions and their mean (``backward_in_order``: the backward direction given in original order, read
    from its end); ``scan_accepts(x, d_state)`` whether the scan alone takes x (B L E) (a mixer without the causal
    conv, such as VMamba's routes; None: as ``accepts``); ``mixer(forward, backward, x, z, gap_mode)``, where given,
    a Vim mixer between its in_proj and out_proj in a few calls (each direction's conv, x_proj, step and scan; None:
    the mixer calls ``conv`` and ``scan`` itself)."""

    accepts: Callable[[Tensor, int, int], bool]
    conv: Callable[..., Tensor]
    scan: Callable[..., Tensor]
    scan_accepts: Callable[[Tensor, int], bool] | None = None
    mixer: Callable[..., Tensor] | None = None


class MergeKernels(NamedTuple):
    """Inference kernels for a merge step on token rows (see :mod:`ssmtrim.ops.tokens` for the meaning): one call
    for the choice, one for the merged rows, in place of a few dozen small PyTorch ops.

    ``accepts(x)`` says whether they take tensors like x; ``choose(keys, protected, features, removed, n_drop,
    adjacent)`` -> (src_all, index, dst) (``adjacent``: each merged token to the more similar of its staying
    neighbours, else to the most similar staying token); ``keep(index, src, dst, sizes, streams, rescale=False)`` ->
    (merged streams, new sizes, slot_of) (``rescale``: as :func:`ssmtrim.pruning.strategies.merge.rescaled`)."""

    accepts: Callable[[Tensor], bool]
    choose: Callable[..., tuple[Tensor, Tensor, Tensor]]
    keep: Callable[..., tuple[tuple[Tensor, ...], Tensor, Tensor]]
    # ToMe's bipartite choice: (features, protected, removed) -> (src, dst, index); None: in PyTorch ops
    bipartite: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None
    # a whole merge step, the ranking's keys made from the scores: (scores, positions, protected index, around,
    # features, sizes, streams, removed, n_drop, adjacent, rescale) -> (merged streams, new sizes, new positions, new
    # protected index, slot_of, src_all, index, dst); None: choose, then keep
    step: Callable[..., tuple] | None = None


class GroupKernels(NamedTuple):
    """Inference kernels for the groups of positions unmerge's blocks run on (see :mod:`ssmtrim.ops.tokens`): the
    mean of each group's rows, and the regrouping of the positions by a block's input, each one C call in place of
    many small PyTorch ops.

    ``accepts(x)`` says whether they take tensors like x; ``mean(x, owner, sizes)`` -> (B K ...);
    ``regroup(z, anchors, sizes, alone, count, rounds)`` -> (owner, counts); ``add(x, update, owner, scale)`` -> x +
    scale * update[owner] (B L ...; scale None: 1), or None (PyTorch ops)."""

    accepts: Callable[[Tensor], bool]
    mean: Callable[..., Tensor]
    regroup: Callable[..., tuple[Tensor, Tensor]]
    add: Callable[..., Tensor] | None = None


@dataclass(frozen=True)
class Backend:
    """One way to run the selective scan.

    - ``available(device)``: ``(True, "")``, or ``(False, reason)`` where ``reason`` is the one-sentence error shown
      when this backend is asked for by name but cannot run on ``device``;
    - ``scan``: the implementation, with the signature of :func:`ssmtrim.ops.selective_scan` less ``backend``;
    - ``conv``: a fast causal conv + SiLU used alongside the scan, or None (PyTorch's conv);
    - ``priority``: ``auto`` takes the available backend of highest priority; None: only when asked for by name;
    - ``devices``: the device types it is meant for (None: any); ``auto`` considers it on those only, and when it
      passes it over there (``available`` said no), the log line says why with ``note()``;
    - ``describe()``: extra rows for ``ssmtrim info`` (what is installed, and where);
    - ``tokens``: token-major inference kernels, or None (the mixer runs the general path);
    - ``merge``: a merge step's inference kernels, or None (the merge runs in PyTorch ops);
    - ``group``: unmerge's group kernels, or None (PyTorch ops).
    """

    name: str
    available: Callable[[torch.device], tuple[bool, str]]
    scan: ScanFn
    conv: ConvKernel | None = None
    priority: int | None = None
    devices: tuple[str, ...] | None = None
    note: Callable[[], str] | None = None
    describe: Callable[[], dict[str, str]] | None = None
    tokens: TokenKernels | None = None
    merge: MergeKernels | None = None
    group: GroupKernels | None = None
