"""VMamba: Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024, arXiv 2401.10166.

Mirrors ``classification/models/vmamba.py::VSSM`` of MzeroMiko/VMamba for its released v2 classification models
(configs ``vmambav2v_*`` and ``vmambav2_*``: ``forward_type='v05_noz'``, ``norm_layer='ln2d'``, ``downsample='v3'``,
``patchembed='v2'``), read from the official source (``shared/specs/MODELS.md``), written anew:

- stem: conv3x3 s2 p1 (bias) -> LN -> GELU -> conv3x3 s2 p1 (bias) -> LN (``patch_embed.{0,2,5,7}``; the v1 stem, one
  conv with kernel = stride = patch size and a LN, loads as well);
- four stages (``layers.i``): blocks ``x += SS2D(LN(x)); x += MLP(LN(x))``, then, except after the last stage, a
  downsample conv3x3 s2 p1 (bias) -> LN (``layers.i.downsample.{1,3}``; the v2 downsample, conv2x2 s2, too);
- SS2D without a gate: in_proj -> depth-wise conv3x3 -> SiLU -> four scan routes over the grid (0 row-major,
  1 column-major, 2 and 3 their reverses), each with its own x_proj, dt_proj (no bias inside; the scan adds
  ``dt_projs_bias`` once before softplus), A and D; the routes' outputs are put back in raster order and SUMMED, then
  out_norm (LN over channels) and out_proj;
- head: ``classifier.norm`` (LN over channels) -> average pooling -> ``classifier.head``.

The official code runs channel-first (LayerNorm2d, 1x1 convs as linear layers); here tokens are channel-last rows
(B L C, raster order) with the same arithmetic, which is also the layout the reduction engine reads. State-dict keys
equal the official ones; 1x1-conv-shaped linear weights (C_out C_in 1 1) are accepted.

Shapes: B batch, L = H W tokens of the current stage, C its width, E d_inner, N d_state, R dt_rank, K = 4 routes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmtrim.errors import CheckpointError, ConfigError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.layers import DropPath, Mlp, initial_dt_bias
from ssmtrim.models.registry import (
    ArchConfig,
    DataConfig,
    ModelSpec,
    register_family,
    register_model,
    registered_img_size,
)
from ssmtrim.models.sizes import ImgSize, normalize_img_size, size_hw
from ssmtrim.models.tokens import (
    BlockOutput,
    TokenState,
    Unmerge,
    add_update,
    gaps_from_positions,
    gather_tokens,
    merge_pair,
    owners,
    restore_tokens,
    tracing,
    unmerge_of,
)
from ssmtrim.ops import selective_scan
from ssmtrim.ops.tokens import TokenKernels, scan_kernels

ROUTES = 4


@dataclass(frozen=True)
class VMambaConfig(ArchConfig):
    family: ClassVar[str] = "vmamba"

    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 8, 2)
    img_size: ImgSize = 224
    patch_size: int = 4  # the stem's total stride
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 1
    ssm_ratio: float = 1.0
    dt_rank: int = 0  # 0: ceil(dim / 16) per stage ("auto")
    d_conv: int = 3
    conv_bias: bool = False
    mlp_ratio: float = 4.0
    stem: str = "v2"  # v2: two stride-2 convs with LN and GELU; v1: one conv, kernel = stride = patch_size
    downsample_kernel: int = 3  # 3: conv3x3 s2 p1 (v3); 2: conv2x2 s2 (v2)
    norm_eps: float = 1e-5
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.depths) or not self.dims:
            raise ConfigError(f"VMamba needs one width per stage: dims {self.dims} and depths {self.depths} differ in "
                              "length.")
        if self.stem not in ("v1", "v2"):
            raise ConfigError(f"VMamba stem {self.stem!r} is unknown; use v1 or v2.")
        if self.downsample_kernel not in (2, 3):
            raise ConfigError(f"VMamba downsample kernel {self.downsample_kernel} is unknown; use 3 (v3) or 2 (v2).")
        h, w = size_hw(self.img_size)
        if h < self.patch_size or w < self.patch_size:
            raise ConfigError(f"VMamba needs images of at least {self.patch_size}x{self.patch_size} pixels, "
                              f"not {h}x{w}.")

    def width_text(self) -> str:
        return f"{self.dims[0]}-{self.dims[-1]}"

    def stage_dt_rank(self, stage: int) -> int:
        return self.dt_rank or math.ceil(self.dims[stage] / 16)

    def stage_inner(self, stage: int) -> int:
        return int(self.ssm_ratio * self.dims[stage])

    @property
    def depth(self) -> int:
        return sum(self.depths)

    def stage_of(self, block: int) -> tuple[int, int]:
        """(stage, index within the stage) of a global block index."""
        for stage, depth in enumerate(self.depths):
            if block < depth:
                return stage, block
            block -= depth
        raise IndexError(f"block {block} is beyond the {self.depth} blocks")

    def grids(self) -> list[tuple[int, int]]:
        """(H, W) of each stage's token grid at ``img_size``."""
        h, w = size_hw(self.img_size)
        if self.stem == "v2":
            for _ in range(int(math.log2(self.patch_size))):
                h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        else:
            h, w = h // self.patch_size, w // self.patch_size
        out = [(h, w)]
        for _ in self.dims[1:]:
            k = self.downsample_kernel
            h, w = ((h - 1) // 2 + 1, (w - 1) // 2 + 1) if k == 3 else (h // 2, w // 2)
            out.append((h, w))
        return out


class SS2D(nn.Module):
    """The 2-D selective scan of the released v2 models (no gate): ``forward(x: B L C, hw) -> B L C`` is
    ``out_proj(out_norm(ssm_output(x, hw)))``; :meth:`ssm_output` (B L E) is the sum of the four routes' outputs in
    raster order, which token scores read."""

    def __init__(self, dim: int, cfg: VMambaConfig, stage: int) -> None:
        super().__init__()
        e, n, r = cfg.stage_inner(stage), cfg.d_state, cfg.stage_dt_rank(stage)
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.in_proj = nn.Linear(dim, e, bias=False)
        self.conv2d = nn.Conv2d(e, e, cfg.d_conv, padding=(cfg.d_conv - 1) // 2, groups=e, bias=cfg.conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(ROUTES, r + 2 * n, e))
        self.dt_projs_weight = nn.Parameter(torch.empty(ROUTES, e, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(ROUTES, e))
        # A = -exp(A_logs), S4D-real A_n = -(n + 1), routes stacked along the channels; D = 1
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(ROUTES * e, 1))
        self.Ds = nn.Parameter(torch.ones(ROUTES * e))
        self.out_norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(e, dim, bias=False)
        # marks the grid the routes scan (no parameters): the FLOPs count reads the scanned tokens from its input
        self.scan_input = nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba's initialisation, per route: x_proj uniform, dt_proj uniform in +-R^-1/2, softplus(bias)
        log-uniform in [dt_min, dt_max]."""
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_projs_weight, -std, std)
        self.dt_projs_bias.copy_(initial_dt_bias((ROUTES, self.d_inner), dt_min, dt_max, dt_floor))

    def routes(self, u: Tensor, hw: tuple[int, int]) -> list[Tensor]:
        """u (B E H W) -> the four routes' sequences (B E L): row-major, column-major, and their reverses."""
        rows, cols = u.flatten(2), u.transpose(2, 3).flatten(2)
        return [rows, cols, rows.flip(-1), cols.flip(-1)]

    def merge(self, ys: list[Tensor], hw: tuple[int, int]) -> Tensor:
        """The routes' outputs (B E L each, in route order) -> their sum in raster order (B E L)."""
        h, w = hw
        rows = ys[0] + ys[2].flip(-1)
        cols = ys[1] + ys[3].flip(-1)
        bsz, e, length = rows.shape
        return rows + cols.reshape(bsz, e, w, h).transpose(2, 3).reshape(bsz, e, length)

    def ssm_output(self, x: Tensor, hw: tuple[int, int], deltas: list[Tensor] | None = None,
                   geometry: VMambaGeometry | SubsampledScan | None = None) -> Tensor:
        """x (B L C) -> the summed routes, before out_norm (B L E). With a ``deltas`` list, softplus(Δ) averaged over
        the four routes (B L E, raster order) is appended to it. With a :class:`VMambaGeometry`, x holds the tokens
        of a reduced grid (see :meth:`ssm_output_reduced`); with a :class:`SubsampledScan`, the routes scan a strided
        part of the full grid (see :meth:`scan_subsampled`)."""
        if isinstance(geometry, VMambaGeometry):
            return self.ssm_output_reduced(x, hw, geometry, deltas)
        bsz, length, _ = x.shape
        h, w = hw
        if h * w != length:
            raise ConfigError(f"VMamba got {length} tokens for a {h}x{w} grid; SS2D needs the full grid.")
        u = self.in_proj(x).transpose(1, 2).reshape(bsz, self.d_inner, h, w)
        u = F.silu(self.conv2d(u))
        if isinstance(geometry, SubsampledScan):
            return self.scan_subsampled(u, geometry.stride, deltas)
        return self.scan_grid(self.scan_input(u), deltas)

    def scan_grid(self, u: Tensor, deltas: list[Tensor] | None = None) -> Tensor:
        """The four routes over a grid u (B E H W) -> their outputs summed in raster order (B H*W E); softplus(Δ)
        averaged over the routes appended to ``deltas`` when given."""
        if deltas is None:
            kernels = scan_kernels(u, self, self.d_inner, self.d_state)
            if kernels is not None:
                return self.scan_grid_tokens(u, kernels)
        hw = (u.shape[-2], u.shape[-1])
        n, r, e = self.d_state, self.dt_rank, self.d_inner
        a = -torch.exp(self.A_logs.float()).reshape(ROUTES, e, n)
        d = self.Ds.float().reshape(ROUTES, e)
        ys, spent = [], []
        raster = u.flatten(2)  # B E L
        # x_proj acts token by token, so it is applied once in raster order and its rows then follow each route
        proj = torch.einsum("bel,kce->kbcl", raster, self.x_proj_weight)  # K B (R+2N) L
        for k, seq in enumerate(self.routes(u, hw)):
            order = _route_order(k, hw, u.device)
            dbl = proj[k][:, :, order]
            dt, b, c = torch.split(dbl, [r, n, n], dim=1)
            delta = torch.einsum("brl,er->bel", dt, self.dt_projs_weight[k])
            ys.append(selective_scan(seq.contiguous(), delta.contiguous(), a[k], b.contiguous(), c.contiguous(), d[k],
                                     z=None, delta_bias=self.dt_projs_bias[k].float(), delta_softplus=True))
            if deltas is not None:
                spent.append(F.softplus(delta.float() + self.dt_projs_bias[k].float()[:, None]))
        y = self.merge(ys, hw).transpose(1, 2)  # B L E
        if deltas is not None:
            deltas.append((self.merge(spent, hw) / ROUTES).transpose(1, 2))
        return y

    def scan_grid_tokens(self, u: Tensor, kernels: TokenKernels) -> Tensor:
        """:meth:`scan_grid` on token-major kernels (:mod:`ssmtrim.ops.tokens`): the same values, with the grid's rows
        (B L E) in raster order and in column order (one transposed copy each) scanned by :meth:`route_pairs`
        -> (B H*W E)."""
        bsz, e, h, w = u.shape
        raster = u.flatten(2).transpose(1, 2).contiguous()  # B L E, row-major
        column = u.transpose(2, 3).flatten(2).transpose(1, 2).contiguous()  # B L E, column-major
        rows, cols = self.route_pairs(raster, column, kernels)
        return rows + cols.view(bsz, w, h, e).transpose(1, 2).reshape(bsz, h * w, e)  # cols in raster order

    def route_pairs(self, raster: Tensor, column: Tensor, kernels: TokenKernels,
                    geometry: VMambaGeometry | None = None) -> tuple[Tensor, Tensor]:
        """The four routes as two calls of the token-major two-direction scan: rows (B L E) in raster order (route 0,
        and route 2 read from the end) and in column order (routes 1 and 3), each route's x_proj and dt_proj applied
        to the rows in its order -> (routes 0 + 2 in raster order, routes 1 + 3 in column order). With a reduced
        stage's ``geometry`` the routes decay across the positions they skip (its gaps, in factored form)."""
        bsz, _, e = raster.shape
        n, r = self.d_state, self.dt_rank
        a = -torch.exp(self.A_logs.float()).reshape(ROUTES, e, n)
        d = self.Ds.float().reshape(ROUTES, e)
        biases = self.dt_projs_bias.float()

        def route(k: int) -> tuple:
            rows = column if k % 2 else raster
            dt, b, c = torch.split(F.linear(rows, self.x_proj_weight[k]), [r, n, n], dim=-1)  # B L R, B L N (views)
            delta, bias = F.linear(dt, self.dt_projs_weight[k]), biases[k]
            gap = gap_scale = None
            if geometry is not None and geometry.gaps is not None:
                # counts in the route's scan order; a reversed route's are read from its end, as its rows are
                gap = geometry.gaps[k] if k < 2 else geometry.gaps[k].flip(1)
                gap_scale = F.softplus(bias)[None, :].expand(bsz, -1) if geometry.gap_estimate == "bias" else \
                    F.softplus(delta.float() + bias).mean(1)
            return (rows, delta, a[k], b, c, d[k], bias, gap, gap_scale)

        # each call returns the mean of a route and its reverse, in the rows' order: twice it is their sum, exactly
        return (kernels.scan(route(0), route(2), None, True, True) * 2,
                kernels.scan(route(1), route(3), None, True, True) * 2)

    def scan_subsampled(self, u: Tensor, stride: tuple[int, int], deltas: list[Tensor] | None = None) -> Tensor:
        """QuarterMap's scan: the routes read every ``stride[0]``-th row and ``stride[1]``-th column of the conv's
        output u (B E H W), and each grid position takes the output of the read position at or before it (nearest-
        neighbour upsampling) -> (B H*W E). in_proj, the conv, out_norm, out_proj and the MLP still see every
        token."""
        sh, sw = stride
        bsz, e, h, w = u.shape
        part = self.scan_input(u[:, :, ::sh, ::sw])
        hs, ws = part.shape[-2], part.shape[-1]
        spent: list[Tensor] | None = [] if deltas is not None else None

        def spread(t: Tensor) -> Tensor:  # B hs*ws E -> B H*W E
            grid = t.transpose(1, 2).reshape(bsz, t.shape[-1], hs, ws)
            grid = grid.repeat_interleave(sh, 2)[:, :, :h].repeat_interleave(sw, 3)[:, :, :, :w]
            return grid.flatten(2).transpose(1, 2)

        y = spread(self.scan_grid(part, spent))
        if deltas is not None:
            deltas.append(spread(spent[0]))
        return y

    def ssm_output_reduced(self, x: Tensor, hw: tuple[int, int], geometry: VMambaGeometry,
                           deltas: list[Tensor] | None = None) -> Tensor:
        """The reduced stage's SS2D on its K tokens (B K C) -> (B K E): in_proj on the tokens; the depth-wise conv on
        the grid restored from them (a merged position holds the token it was merged into, a pruned one its nearest
        token), read back at the tokens' positions; each route scans the tokens in its own order, its state decaying
        across the positions it skips (exp(G A) with G = skipped x the Δ estimate, as Vim's reduced scans do); the
        routes' outputs summed per token."""
        bsz, k, _ = x.shape
        h, w = hw
        e, n, r = self.d_inner, self.d_state, self.dt_rank
        u = self.in_proj(x)  # B K E
        grid = gather_tokens(u, geometry.owners).transpose(1, 2).reshape(bsz, e, h, w)
        u = gather_tokens(F.silu(self.conv2d(grid)).flatten(2).transpose(1, 2), geometry.positions)  # B K E
        tokens = self.scan_input(u.transpose(1, 2))  # B E K, raster order (the kept positions increase)
        if deltas is None:
            kernels = scan_kernels(u, self, e, n)
            if kernels is not None:
                return self.scan_tokens_reduced(u, geometry, kernels).to(x.dtype)
        a = -torch.exp(self.A_logs.float()).reshape(ROUTES, e, n)
        d = self.Ds.float().reshape(ROUTES, e)
        # routes 0 and 2 read the tokens in raster order (forward, reversed), 1 and 3 in column order: one gather
        column = _along(tokens, geometry.column)
        rows_of = (tokens, column, tokens, column)
        # x_proj acts token by token: applied once to every route in raster order, its rows then follow each route
        proj = torch.einsum("bek,rce->rbck", tokens, self.x_proj_weight)  # routes B (R+2N) K
        proj_of = (proj[0], _along(proj[1], geometry.column), proj[2], _along(proj[3], geometry.column))
        outs, spent = [], []
        for route in range(ROUTES):
            seq = rows_of[route] if route < 2 else rows_of[route].flip(-1)
            dbl = proj_of[route] if route < 2 else proj_of[route].flip(-1)  # B (R+2N) K in the route's order
            dt, b, c = torch.split(dbl, [r, n, n], dim=1)
            delta = torch.einsum("brk,er->bek", dt, self.dt_projs_weight[route])
            bias = self.dt_projs_bias[route].float()
            gap = gap_scale = None
            if geometry.gaps is not None:
                gap = geometry.gaps[route]
                gap_scale = F.softplus(bias)[None, :].expand(bsz, -1) if geometry.gap_estimate == "bias" else \
                    F.softplus(delta.float() + bias[:, None]).mean(-1)
            outs.append(selective_scan(seq.contiguous(), delta.contiguous(), a[route], b.contiguous(), c.contiguous(),
                                       d[route], z=None, delta_bias=bias, delta_softplus=True, gap=gap,
                                       gap_scale=gap_scale).float())
            if deltas is not None:
                spent.append(F.softplus(delta.float() + bias[:, None]))
        index = geometry.column[:, None, :].expand(-1, e, -1)

        def merged(parts: list[Tensor]) -> Tensor:  # the four routes' values back in raster order, summed
            return parts[0] + parts[2].flip(-1) + torch.zeros_like(parts[0]).scatter_add(
                2, index, parts[1] + parts[3].flip(-1))

        if deltas is not None:
            deltas.append((merged(spent) / ROUTES).transpose(1, 2))
        return merged(outs).to(x.dtype).transpose(1, 2)

    def scan_tokens_reduced(self, u: Tensor, geometry: VMambaGeometry, kernels: TokenKernels) -> Tensor:
        """The routes of :meth:`ssm_output_reduced` on token-major kernels: the tokens' rows u (B K E, raster order)
        and, gathered, in column order, scanned by :meth:`route_pairs` with the gaps -> the routes summed per token
        (B K E, raster order)."""
        rows, cols = self.route_pairs(u, gather_tokens(u, geometry.column), kernels, geometry)
        index = geometry.column[:, :, None].expand(-1, -1, u.shape[-1])
        return rows + torch.zeros_like(rows).scatter_add(1, index, cols)  # cols back in raster order

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        return self.out_proj(self.out_norm(self.ssm_output(x, hw)))


def _route_order(k: int, hw: tuple[int, int], device: torch.device) -> Tensor:
    """Raster index of each step of route k (L)."""
    h, w = hw
    raster = torch.arange(h * w, device=device)
    order = raster if k % 2 == 0 else raster.reshape(h, w).t().reshape(-1)
    return order.flip(0) if k >= 2 else order


@dataclass(frozen=True)
class VMambaGeometry:
    """Where the tokens of a reduced stage sit, for its blocks (computed once per token state): the conv reads the
    grid restored from them; routes 0 and 2 scan them in raster order (their order), 1 and 3 in column order, each
    decaying across the positions it skips. With mixers that read every position (an exact-mixer ``unmerge``), only
    the un-merge."""

    owners: Tensor | None = None  # B L0 the token standing for each grid position (kept, merged into, or nearest)
    positions: Tensor | None = None  # B K grid position of each token, increasing
    column: Tensor | None = None  # B K the tokens in column-major order (routes 1 and 3)
    gaps: tuple[Tensor, ...] | None = None  # per route, B K: grid positions skipped before each step (float), or none
    gap_estimate: str = "bias"  # "bias" or "mean": the Δ of a skipped position
    # the residual stream still holds every position (an ``unmerge`` state): the blocks merge into the tokens before
    # SS2D and the MLP and un-merge their updates; None: the streams hold the tokens
    unmerge: Unmerge | None = None


@dataclass(frozen=True)
class SubsampledScan:
    """The blocks after a QuarterMap step: every token runs, the routes scan a strided part of the grid."""

    stride: tuple[int, int]  # (rows, columns)


def reduced_geometry(state: TokenState, gap: str, unmerge: Unmerge | None = None) -> VMambaGeometry:
    """The geometry of a reduced token state on an h x w grid (tokens at their grid positions, in raster order);
    ``unmerge``: the state's :func:`unmerge_of` where the caller has it (else made here)."""
    h, w = state.grid
    pos = state.positions
    if not tracing() and not bool((pos[:, 1:] > pos[:, :-1]).all()):
        raise ConfigError("VMamba's reduced scans read the kept tokens in raster order; this strategy left them "
                          "in another order (use merge, align or tome).")
    col_key, column = ((pos % w) * h + pos // w).sort(dim=1, stable=True)  # the column-major route's positions
    raster_fwd, raster_bwd = gaps_from_positions(pos, state.length)
    col_fwd, col_bwd = gaps_from_positions(col_key, state.length)
    # routes 0 and 1 scan forward through their positions, 2 and 3 backward (their reverses)
    gaps = tuple(g.float() for g in (raster_fwd, col_fwd, raster_bwd.flip(1), col_bwd.flip(1)))
    u = unmerge if unmerge is not None else unmerge_of(state)
    return VMambaGeometry(owners(state), pos, column, None if gap == "zero" else gaps, gap, u)


def _along(x: Tensor, order: Tensor) -> Tensor:
    """x (B F K) taken in ``order`` (B K) along its last dim."""
    return x.gather(2, order[:, None, :].expand(-1, x.shape[1], -1))


class VSSBlock(nn.Module):
    """``x += SS2D(LN(x)); x += MLP(LN(x))`` on tokens (B L C) of an h x w grid; returns (x, the SS2D's summed
    routes (B L E), what token scores read)."""

    def __init__(self, dim: int, cfg: VMambaConfig, stage: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.op = SS2D(dim, cfg, stage)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hw: tuple[int, int], deltas: list[Tensor] | None = None,
                geometry: VMambaGeometry | SubsampledScan | None = None,
                inputs: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``deltas``, ``inputs``: lists SS2D's softplus(Δ) and its normed input (on the tokens) are added to."""
        # with an unmerge state x holds every position, and SS2D and the MLP run on the merged tokens (or, with an
        # exact mixer, SS2D on every position as dense and the MLP alone on the tokens)
        u = geometry.unmerge if isinstance(geometry, VMambaGeometry) else None
        merge, _ = merge_pair(u)
        normed = self.norm(x)
        if u is not None and u.exact_mixer:
            spent = None if deltas is None else []
            y = self.op.ssm_output(normed, hw, spent, None)
            x = x + self.drop_path(self.op.out_proj(self.op.out_norm(y)))
            y, spent = u.tokens_of(y, spent)
            if deltas is not None:
                deltas.extend(spent)
            if inputs is not None:
                inputs.append(merge(normed))
        else:
            normed = merge(normed)
            if inputs is not None:
                inputs.append(normed)
            y = self.op.ssm_output(normed, hw, deltas, geometry)
            x = add_update(x, self.op.out_proj(self.op.out_norm(y)), u, None, self.drop_path)
        z = self.norm2(x)
        groups = None if u is None else u.for_mlp(z)
        merge, _ = merge_pair(groups)
        return add_update(x, self.mlp(merge(z)), groups, None, self.drop_path), y


class Downsample(nn.Module):
    """conv s2 -> LN between stages, on tokens: (B L C, hw) -> (B L' C', hw'). Keys ``1`` (conv) and ``3`` (norm), as
    the official Sequential(Identity, Conv2d, Identity, LayerNorm2d) numbers them."""

    def __init__(self, dim: int, out_dim: int, cfg: VMambaConfig) -> None:
        super().__init__()
        k = cfg.downsample_kernel
        self.add_module("1", nn.Conv2d(dim, out_dim, k, stride=2, padding=1 if k == 3 else 0))
        self.add_module("3", nn.LayerNorm(out_dim, eps=cfg.norm_eps))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
        grid = to_map(x, hw)
        grid = getattr(self, "1")(grid)
        return getattr(self, "3")(grid.flatten(2).transpose(1, 2)), tuple(grid.shape[-2:])


class Stage(nn.Module):
    def __init__(self, cfg: VMambaConfig, stage: int, rates: list[float]) -> None:
        super().__init__()
        dim = cfg.dims[stage]
        self.blocks = nn.ModuleList(VSSBlock(dim, cfg, stage, rate) for rate in rates)
        last = stage == len(cfg.dims) - 1
        self.downsample = nn.Identity() if last else Downsample(dim, cfg.dims[stage + 1], cfg)


class Stem(nn.Module):
    """v2: conv3x3 s2 -> LN -> GELU -> conv3x3 s2 -> LN (keys 0, 2, 5, 7), one more stride-2 pair per factor of 2
    beyond 4 in ``patch_size`` is not defined officially, so patch_size 4 only; v1: conv (kernel = stride = patch) -> LN
    (keys 0, 2). Images (B 3 H W) -> tokens (B L C), grid."""

    def __init__(self, cfg: VMambaConfig) -> None:
        super().__init__()
        c, eps = cfg.dims[0], cfg.norm_eps
        self.version = cfg.stem
        if cfg.stem == "v2":
            stride = cfg.patch_size // 2
            self.add_module("0", nn.Conv2d(cfg.in_chans, c // 2, stride + 1, stride=stride, padding=1))
            self.add_module("2", nn.LayerNorm(c // 2, eps=eps))
            self.add_module("5", nn.Conv2d(c // 2, c, stride + 1, stride=stride, padding=1))
            self.add_module("7", nn.LayerNorm(c, eps=eps))
        else:
            self.add_module("0", nn.Conv2d(cfg.in_chans, c, cfg.patch_size, stride=cfg.patch_size))
            self.add_module("2", nn.LayerNorm(c, eps=eps))

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        m = self._modules
        x = m["0"](x)
        if self.version == "v2":
            x = to_map(F.gelu(m["2"](x.flatten(2).transpose(1, 2))), tuple(x.shape[-2:]))
            x = m["5"](x)
            return m["7"](x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])
        return m["2"](x.flatten(2).transpose(1, 2)), tuple(x.shape[-2:])


def to_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Tokens (B L C) in raster order -> a map (B C H W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


class Classifier(nn.Module):
    def __init__(self, cfg: VMambaConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dims[-1], eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()


class VMamba(nn.Module):
    """VMamba classifier: ``forward(x: B 3 H W) -> logits (B num_classes)``; any input size (no position embedding).
    :meth:`forward_stages` gives each stage's feature map (B C H W) before its downsample, the dense-task outputs."""

    def __init__(self, config: VMambaConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = Stem(config)
        total = config.depth
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        self.layers = nn.ModuleList(Stage(config, i, rates[s : s + d])
                                    for i, (s, d) in enumerate(zip(starts, config.depths, strict=True)))
        self.classifier = Classifier(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # the official init: trunc_normal(std .02) for linear weights, zero biases; LayerNorms at 1 / 0
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        tokens, hw = self.patch_embed(x)
        maps = []
        for stage in self.layers:
            for block in stage.blocks:
                tokens, _ = block(tokens, hw)
            maps.append(to_map(tokens, hw))
            if not isinstance(stage.downsample, nn.Identity):
                tokens, hw = stage.downsample(tokens, hw)
        return maps

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> the last stage's tokens (B L C), before the final norm."""
        last = self.forward_stages(x)[-1]
        return last.flatten(2).transpose(1, 2)

    def forward_head(self, tokens: Tensor) -> Tensor:
        return self.classifier.head(self.classifier.norm(tokens).mean(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# family: build, convert official checkpoints, infer architectures

_LINEARS = re.compile(r".*\.(op\.in_proj|op\.out_proj|mlp\.fc1|mlp\.fc2)\.weight$")


class VMambaFamily:
    name = "vmamba"
    config_cls = VMambaConfig

    def build(self, config: VMambaConfig) -> VMamba:
        return VMamba(config)

    def convert_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official layout -> ours: strip DDP's ``module.`` and a ``backbone.`` prefix, apply the official loader's
        renames of older names (``patch_embed.proj/norm``, ``ln_1``, ``self_attention``, ``norm``/``head`` at the
        top), and flatten 1x1-conv-shaped linear weights (C_out C_in 1 1)."""
        out: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.").removeprefix("backbone.")
            key = re.sub(r"^patch_embed\.proj\.", "patch_embed.0.", key)
            key = re.sub(r"^patch_embed\.norm\.", "patch_embed.2.", key)
            key = re.sub(r"(blocks\.\d+)\.ln_1\.", r"\1.norm.", key)
            key = re.sub(r"(blocks\.\d+)\.self_attention\.", r"\1.op.", key)
            key = re.sub(r"^(norm|head)\.", r"classifier.\1.", key)
            if _LINEARS.match(key) and value.dim() == 4:
                value = value.reshape(value.shape[0], value.shape[1])
            out[key] = value
        return out

    def detect(self, state_dict: dict[str, Tensor]) -> bool:
        return any(re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.(op|self_attention)\.x_proj_weight$", k)
                   for k in state_dict)

    def infer_config(self, state_dict: dict[str, Tensor], img_size: ImgSize | None = None) -> VMambaConfig:
        sd = self.convert_state_dict(state_dict)
        try:
            stages = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.", k)))
            depths = tuple(1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k)))
                           for i in range(stages))
            dims = tuple(sd[f"layers.{i}.blocks.0.norm.weight"].shape[0] for i in range(stages))
            op = "layers.0.blocks.0.op."
            in_proj, a_logs = sd[op + "in_proj.weight"], sd[op + "A_logs"]
            x_proj, conv = sd[op + "x_proj_weight"], sd[op + "conv2d.weight"]
            fc1, stem = sd["layers.0.blocks.0.mlp.fc1.weight"], sd["patch_embed.0.weight"]
        except (KeyError, ValueError) as exc:
            missing = exc.args[0] if isinstance(exc, KeyError) else "layers.0.blocks.0.*"
            raise CheckpointError(f"this looks like a VMamba checkpoint but has no tensor {missing!r}; it is "
                                  "incomplete or not in the MzeroMiko/VMamba layout.") from None
        e = x_proj.shape[2]
        if in_proj.shape[0] != e:
            raise CheckpointError(
                f"this VMamba's in_proj gives {in_proj.shape[0]} channels for {e} scanned ones: a gated forward type "
                "(v0/v1/v2 with z); ssmtrim loads the released v2 models (forward_type v05_noz, e.g. "
                "vmambav2v_tiny_224)."
            )
        if "layers.0.blocks.0.op.out_norm.weight" not in sd:
            raise CheckpointError("this VMamba has no out_norm LayerNorm (an ablation forward type); ssmtrim loads the "
                                  "released v2 models (forward_type v05_noz, e.g. vmambav2v_tiny_224).")
        dt_ranks = {sd[f"layers.{i}.blocks.0.op.dt_projs_weight"].shape[2] for i in range(stages)}
        auto = all(sd[f"layers.{i}.blocks.0.op.dt_projs_weight"].shape[2] == math.ceil(dims[i] / 16)
                   for i in range(stages))
        if not auto and len(dt_ranks) != 1:
            raise CheckpointError(f"this VMamba's dt ranks {sorted(dt_ranks)} are neither one value nor dim/16 per "
                                  "stage; it is not a released configuration.")
        v2 = "patch_embed.5.weight" in sd
        patch = 4 if v2 else stem.shape[-1]
        ds = sd.get("layers.0.downsample.1.weight")
        head = sd.get("classifier.head.weight")
        config = VMambaConfig(
            dims=dims, depths=depths, img_size=normalize_img_size(img_size) if img_size is not None else 224,
            patch_size=patch, in_chans=stem.shape[1], num_classes=0 if head is None else head.shape[0],
            d_state=a_logs.shape[1], ssm_ratio=e / dims[0], dt_rank=0 if auto else dt_ranks.pop(),
            d_conv=conv.shape[-1], conv_bias=op + "conv2d.bias" in sd, mlp_ratio=fc1.shape[0] / dims[0],
            stem="v2" if v2 else "v1", downsample_kernel=3 if ds is None else ds.shape[-1],
        )  # fmt: skip
        if img_size is None:
            config = dataclasses.replace(config, img_size=registered_img_size(config))  # not in the tensors
        return config

    # --- token layout (see ssmtrim.models.registry.Family)

    def depth(self, config: VMambaConfig) -> int:
        return config.depth

    def num_tokens(self, config: VMambaConfig) -> int:
        h, w = config.grids()[0]
        return h * w

    def has_class_token(self, config: VMambaConfig) -> bool:
        return False

    def stages(self, config: VMambaConfig) -> list[tuple[int, int]]:
        """(first block, tokens of its grid) per stage."""
        starts = [sum(config.depths[:i]) for i in range(len(config.depths))]
        return [(start, h * w) for start, (h, w) in zip(starts, config.grids(), strict=True)]

    def block_name(self, config: VMambaConfig, index: int) -> str:
        stage, j = config.stage_of(index)
        return f"layers.{stage}.blocks.{j}"

    def embed(self, model: VMamba, x: Tensor, keeps_positions: bool) -> tuple[tuple, TokenState]:
        tokens, hw = model.patch_embed(x)
        bsz, length, _ = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(bsz, -1)
        return (tokens,), TokenState(positions, None, length, hw, keeps_positions, track_owner=True)

    def run_block(self, model: VMamba, index: int, streams: tuple, state: TokenState, geometry,
                  needs: frozenset[str] = frozenset()) -> BlockOutput:
        """Block ``index`` on the current stage's grid; the downsample after a stage's last block runs with it (the
        tokens then leave on the next stage's grid: ``state.grid`` is updated by :meth:`after_block`)."""
        stage, j = model.config.stage_of(index)
        block = model.layers[stage].blocks[j]
        deltas: list[Tensor] | None = [] if "delta" in needs else None
        inputs: list[Tensor] | None = [] if "mixer_input" in needs else None  # what SS2D reads
        hidden, y = block(streams[0], state.grid, deltas, geometry, inputs)
        return BlockOutput((hidden,), y, deltas[0] if deltas else None, inputs[0] if inputs else None)

    def after_block(self, model: VMamba, index: int, streams: tuple, state: TokenState) -> tuple[tuple, TokenState]:
        """After a stage's last block (except the last stage's), the downsample: the tokens leave on the next
        stage's grid, with a new token state (every position of that grid)."""
        stage, j = model.config.stage_of(index)
        layer = model.layers[stage]
        if j != len(layer.blocks) - 1 or isinstance(layer.downsample, nn.Identity):
            return streams, state
        # the downsample's conv needs the full grid: reduced tokens are restored first (un-merged, pruned positions
        # from their nearest token)
        tokens, hw = layer.downsample(restore_tokens(streams[0], state), state.grid)
        bsz, length, _ = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(bsz, -1)
        return (tokens,), TokenState(positions, None, length, hw, state.keeps_positions, track_owner=True)

    def geometry(self, model: VMamba, state: TokenState, plan) -> VMambaGeometry | SubsampledScan | None:
        """The reduced grid's geometry (owners, column order and skipped positions); for a full grid whose scans are
        thinned (``state.scan_stride``), the stride; None for a full grid."""
        if state.scan_stride is not None and not state.reduced:
            return SubsampledScan(state.scan_stride)
        u = unmerge_of(state)
        if u is not None and u.exact_mixer:  # SS2D reads every position as dense: only the un-merge is read
            return VMambaGeometry(unmerge=u)
        if not state.reduced:
            return None
        return reduced_geometry(state, plan.gap, u)

    def resize_state_dict(self, config: VMambaConfig, state_dict: dict[str, Tensor], img_size: ImgSize):
        """No position embedding: any input size takes the same weights (a new config, the same tensors)."""
        return dataclasses.replace(config, img_size=normalize_img_size(img_size)), state_dict


    def features(self, model: VMamba, streams: tuple, state: TokenState) -> Tensor:
        """The pooled tokens of the last stage, restored to its grid first (a merged token counts once per position
        it stands for)."""
        return model.classifier.norm(restore_tokens(streams[0], state)).mean(dim=1)

    def feature_map(self, model: VMamba, index: int, streams: tuple, state: TokenState) -> Tensor:
        """The stage's tokens restored to its grid, as a map (B C H W): what forward_stages gives dense."""
        return to_map(restore_tokens(streams[0], state), state.grid)

    def classifier(self, model: VMamba) -> nn.Module:
        return model.classifier.head

    def recommended_plan(self, config: VMambaConfig) -> dict:
        # measured on 2,000 training images of CIFAR-10 (README, "The hierarchical test beds"): merging for the blocks
        # and un-merging onto the whole residual stream kept 3.4 points more than merge at -30% FLOPs
        # and the mixers on every position, only the MLPs merged, 3.7 points more at -30% on the same images
        # (benchmarks/results/screen_mixer_vm64_train.json; where a FLOPs target needs the mixers' FLOPs too, prune
        # runs them on the merged tokens and the MLPs on a tenth of them, a plan the schedule search also tries:
        # unmerge's reaching_further)
        # for dense outputs too: on a segmentation proxy of training images its restored maps agreed with the dense
        # maps' classes on 82-93% of the pixels at -20 / -30%, merge's on 43-76% (benchmarks/seg_select.py;
        # benchmarks/results/seg_select_agreement_*.json)
        return {"arrangement": "unmerge", "score": "clipped", "compensate": "head", "layers": (1,),
                "options": {"mixer": "positions"}}

    def provides(self, config) -> frozenset[str]:
        """What run_block hands over when asked; not "condensed": the cross-scan reads tokens at grid positions, so
        a strategy that makes a new sequence without them (keep-order, reorder) is refused."""
        return frozenset({"delta", "mixer_input", "subsampled_scan", "unmerge", "exact_mixer"})

    def token_mlp(self, model: VMamba, index: int) -> nn.Module:
        """The part of block ``index`` that acts on each token alone: its MLP."""
        stage, j = model.config.stage_of(index)
        return model.layers[stage].blocks[j].mlp

    def check_plan(self, plan) -> None:
        if plan.conv != "original":
            raise ConfigError("--conv sets where Vim's 1-D conv finds neighbours; VMamba's 2-D conv reads the grid "
                              "restored from the kept tokens, so leave --conv out.")

    def mixer_dims(self, module: nn.Module) -> MixerDims | None:
        if not isinstance(module, SS2D):
            return None
        taps = math.prod(module.conv2d.kernel_size)
        # four routes, no gate; each route has its own projections
        return MixerDims(module.in_proj.in_features, module.d_inner, module.d_state, module.dt_rank, taps, 0,
                         ROUTES, False, gate=False, projections_per_scan=True)  # fmt: skip


FAMILY = register_family(VMambaFamily())

_RELEASES = "https://github.com/MzeroMiko/VMamba/releases/download/%23v2cls/"
_DATA = DataConfig(input_size=(3, 224, 224), crop_pct=224 / 256, interpolation="bicubic")


def _register(name: str, dims: tuple[int, ...], depths: tuple[int, ...], ratio: float, top1: float, gflops: float,
              file: str) -> None:
    register_model(ModelSpec(
        name=name, arch=VMambaConfig(dims=dims, depths=depths, ssm_ratio=ratio), data=_DATA,
        description=f"VMamba v2 ({top1}% ImageNet-1k, {gflops} GFLOPs published); weights: {_RELEASES}{file}",
    ))  # fmt: skip


_register("vmamba_tiny", (96, 192, 384, 768), (2, 2, 8, 2), 1.0, 82.6, 4.9, "vssm1_tiny_0230s_ckpt_epoch_264.pth")
_register("vmamba_small", (96, 192, 384, 768), (2, 2, 15, 2), 2.0, 83.6, 8.7, "vssm_small_0229_ckpt_epoch_222.pth")
_register("vmamba_base", (128, 256, 512, 1024), (2, 2, 15, 2), 2.0, 83.9, 15.4, "vssm_base_0229_ckpt_epoch_237.pth")
register_model(ModelSpec(
    name="vmamba_test", arch=VMambaConfig(dims=(16, 32), depths=(1, 2), img_size=32, num_classes=10),
    data=DataConfig(input_size=(3, 32, 32), crop_pct=1.0), test_only=True,
    description="tiny two-stage VMamba for tests",
))  # fmt: skip
def _register_cifar(name: str, size: int, description: str) -> None:
    """A CIFAR-10 test bed of widths 40/80/160 and depths 2/3/2 at ``size`` x ``size`` pixels."""
    register_model(ModelSpec(
        name=name, arch=VMambaConfig(dims=(40, 80, 160), depths=(2, 3, 2), img_size=size, num_classes=10),
        data=DataConfig(input_size=(3, size, size), crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465),
                        std=(0.2470, 0.2435, 0.2616)),
        description=description,
    ))  # fmt: skip


# the project's CIFAR-10 test beds: the released v2v design (v2 stem, conv3x3 downsamples, d_state 1, ssm_ratio 1,
# no gate) at three stages: for 32x32 images 8x8, 4x4 and 2x2 token grids; the same upsampled to 64x64 (a 16x16
# first stage: 256 tokens), fine-tuned from it
_register_cifar("vmamba_cifar", 32, "small VMamba for CIFAR-10: dims 40/80/160, depths 2/3/2, v2 stem (8x8 tokens), "
                "d_state 1")
_register_cifar("vmamba_cifar64", 64, "small VMamba for CIFAR-10 at 64x64 (upsampled): vmamba_cifar fine-tuned, 16x16 "
                "first-stage tokens")
