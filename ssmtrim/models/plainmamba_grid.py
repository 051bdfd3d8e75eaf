"""Where the tokens of a reduced PlainMamba sequence sit on the 2-D grid, for its convs and zig-zag scans (one
:class:`ScanPlan` per token state, shared by the blocks). Token reduction for PlainMamba (Zhan et al., NeurIPS 2024,
arXiv 2409.18962):

- tokens at their original positions (``align``): every mixer scatters its tokens to their cells of the original
  grid for the 7x7 depth-wise conv2d (pruned cells read as zero), and so does a layer's 3x3 ``dw`` conv (L1 layer 0).
  Each of the four zig-zag scans visits the kept tokens in the order of the ORIGINAL path over the full grid; the
  direction embedding of a step is the one of that token's step in the original path (the move that arrived at its
  cell); the scan decays across the positions the path passed since the previous kept token,
  h = exp((Δ + G) A) h_prev + Δ B x, G = (#skipped in that direction) · Δ̃, with Δ̃ ``mean`` (the mean Δ of the kept
  tokens of that layer, per image and channel; Δ is shared by the four directions) or ``bias`` (softplus(2 · dt bias):
  the bias enters twice in PlainMamba), or none (``zero``).
- a condensed sequence (``keep-order``, ``reorder``): the mixer treats it the way the official code treats any token
  sequence, as rows of the grid's width W. Token j sits in cell j of a ceil(K/W) x W grid (the last row partly empty,
  read as zero by the convs and skipped by the scans without a gap); paths, direction embeddings and both convs are
  those of that packed grid. Once a token is pruned its successors shift: the "no alignment" baseline.

The official quirk stays literal on a reduced sequence: step i of every scan uses the dt, B and C of the i-th STORED
token; a pruned position has no dt/B/C of its own, it only decays.

Shapes: B batch, L current tokens, K = 4 scan directions, E d_inner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ssmtrim.errors import ConfigError
from ssmtrim.models.tokens import TokenState, tracing

NUM_DIRECTIONS = 4
# direction ids of plain_mamba_layer.py: the move that arrived at a token ([start, right, left, up, down])
START, RIGHT, LEFT, UP, DOWN = range(5)


def zigzag_orders(h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """The four zig-zag paths over an h x w grid (see :func:`_zigzag_orders`), cached, except while a forward is
    traced (export, compile): tensors made then are the tracer's, never to be kept for a later forward."""
    return _zigzag_orders.__wrapped__(h, w) if tracing() else _zigzag_orders(h, w)


@functools.lru_cache(maxsize=64)
def _zigzag_orders(h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """The four continuous zig-zag paths over an h x w grid, in the official order.

    Returns ``orders`` (K L): raster index of the t-th token of each path; ``inverse`` (K L): position in the path of
    each raster token; ``directions`` (K L): the move that arrived at the t-th token (0 start, 1 right, 2 left, 3 up,
    4 down). Paths: 0 row snake from the top-left (first row rightwards), 1 its reverse, 2 column snake from the
    top-left (first column downwards), 3 its reverse. Cached: treat the tensors as read-only.
    """
    if h < 1 or w < 1:
        raise ConfigError(f"the token grid must be at least 1x1, got {h}x{w}.")
    cpu = torch.device("cpu")  # explicit: the cache must not keep tensors made under a `with torch.device(...)`
    rows = torch.arange(h * w, device=cpu).reshape(h, w)
    rows[1::2] = rows[1::2].flip(-1)  # odd rows run leftwards
    cols = torch.arange(h * w, device=cpu).reshape(h, w).t().contiguous()  # row j: raster indices of column j
    cols[1::2] = cols[1::2].flip(-1)  # odd columns run upwards
    o_row, o_col = rows.flatten(), cols.flatten()
    orders = torch.stack([o_row, o_row.flip(0), o_col, o_col.flip(0)])
    inverse = torch.argsort(orders, dim=1)
    # a step always goes to a grid neighbour, so the raster-index difference names the move; the vertical moves are
    # assigned last so that they win on a one-column grid, where +-1 is also +-w
    step = orders[:, 1:] - orders[:, :-1]
    moves = torch.full_like(step, -1)
    moves[step == 1] = RIGHT
    moves[step == -1] = LEFT
    moves[step == -w] = UP
    moves[step == w] = DOWN
    directions = torch.cat([torch.full((NUM_DIRECTIONS, 1), START, dtype=torch.long, device=cpu), moves], dim=1)
    return orders, inverse, directions




@dataclass(frozen=True)
class ScanPlan:
    """Where the current tokens sit for the 2-D ops of a mixer; computed once per token state, shared by the blocks."""

    cells: Tensor  # B L, cell (raster index on ``grid``) of each token
    grid: tuple[int, int]  # (h, w) of the grid the convs run on
    orders: Tensor  # K B L, the token read at each scan step
    inverse: Tensor  # K B L, the scan step of each token
    directions: Tensor  # K B L, direction-embedding id of each step: the move that arrived at its cell in the full path
    gaps: Tensor | None  # K B L, positions of the full path skipped just before each step (original positions only)
    gap_estimate: str  # "bias", "mean" or "zero": the Δ of a skipped position


def make_plan(state: TokenState, gap_estimate: str) -> ScanPlan:
    bsz, length = state.positions.shape
    device = state.positions.device
    if state.keeps_positions:
        cells, grid = state.positions.long(), state.grid
    else:  # the condensed sequence as rows of width W
        w = state.grid[1]
        cells, grid = torch.arange(length, device=device).expand(bsz, -1), (-(-length // w), w)
    full_orders, full_inverse, full_dirs = (t.to(device) for t in zigzag_orders(*grid))
    k = NUM_DIRECTIONS
    steps = full_inverse[:, cells]  # K B L: step of each token in each full path
    steps, orders = steps.sort(dim=-1)  # the tokens in path order; steps are distinct, so no ties
    inverse = torch.empty_like(orders).scatter_(-1, orders, torch.arange(length, device=device).expand(k, bsz, -1))
    directions = full_dirs[:, None, :].expand(-1, bsz, -1).gather(-1, steps)
    gaps = None
    if state.keeps_positions:
        prev = torch.cat([steps.new_full((k, bsz, 1), -1), steps[..., :-1]], dim=-1)
        gaps = steps - prev - 1
    return ScanPlan(cells, grid, orders, inverse, directions, gaps, gap_estimate)


def to_grid(x: Tensor, plan: ScanPlan) -> Tensor:
    """x (B E L) -> (B E h w) with every token in its cell and zero in the others."""
    bsz, e, _ = x.shape
    h, w = plan.grid
    idx = plan.cells[:, None, :].expand(-1, e, -1)
    return x.new_zeros(bsz, e, h * w).scatter_(2, idx, x).view(bsz, e, h, w)


def from_grid(g: Tensor, plan: ScanPlan) -> Tensor:
    """(B E h w) -> the tokens' cells (B E L)."""
    return g.flatten(2).gather(2, plan.cells[:, None, :].expand(-1, g.shape[1], -1))
