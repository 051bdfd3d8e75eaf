"""FLOP counting for Vim and PlainMamba, in the peers' published convention and in an honest full one.

Both conventions come from ONE fvcore trace (``fvcore.nn.FlopCountAnalysis``, CPU, inside
:func:`ssmtrim.ops.selective_scan.scan_as_single_op` so that every selective scan is one ``ssmtrim::selective_scan``
node). Like fvcore, counts are multiply-accumulates: one MAC is one "flop", so "GFLOPs" below means G-MACs, which is
what the literature calls GFLOPs for these models. Every count is per image (the trace's count / batch size).

``paper`` (the peers count with module hooks): the MACs of every conv and linear layer outside
the mixers (patch embedding or PlainMamba's conv stem, the head, PlainMamba-L1's depth-wise conv after layer 0; no
biases, norms or activations), plus, per mixer call on l tokens (l read from the traced run, so pruned models are
counted with the tokens each mixer really sees), with D dim, E d_inner, N d_state, r dt_rank, k conv width::

    in_proj l·D·2E + conv (l+k−1)·E·k + x_proj l·E·(r+2N) + dt_proj l·r·E + S·(9·l·E·N + l·E + g·l·E) + out_proj l·E·D

- Vim: ONE scan direction (S = 1), the scan gated inside (g = 1): the 9·l·E·N + 2·l·E of the peers. This under-counts
  the backward branch (its conv, x_proj, dt_proj and scan), about 20 % of the model. Vim-T/S/B: 1.449 / 5.077 /
  18.87 G.
- PlainMamba: all four zig-zag scans (S = 4), no gate inside the scan (g = 0, the gate is applied once after the sum;
  exactly ``get_ssm_flops`` of ChenhongyiYang/PlainMamba ``tools/analysis_tools/get_flops.py``), the 2-D k×k
  depth-wise conv counted as l·E·k² (what mmcv's conv hook gives for 'same' padding), plus the conv stem. This gives
  3.01 / 8.07 / 14.43 G for L1/L2/L3 (published 3.0 / 8.1 / 14.4); the stem's BN/ReLU and the conv biases that mmcv's
  counter also adds are below 0.1 %.

``full``: everything the traced forward runs, with these weights:

- linear, matmul, conv: MACs (fvcore's handles), plus one per output element for a bias;
- selective scan: the peers' 9·E·N per token for the recurrence (discretisation incl. exp(ΔA), update, read-out),
  plus per token and channel one each for D·u, the gate multiply, SiLU(z), the dt bias add, softplus and the pruning
  gap add, when present. So for each scan ``full`` >= ``paper``;
- elementwise arithmetic on floating tensors (add, sub, mul, div, neg, exp, rsqrt, square, SiLU, GELU, ReLU, clamp,
  ...): one per output element, activations included. This covers residual adds, the position embedding, the gating,
  the average of Vim's two directions, PlainMamba's direction-embedding adds and A = −exp(A_log) (per forward);
- reductions on floating tensors: sum = additions (input − output elements), mean/norm = one per input element;
  softmax three per element;
- LayerNorm five per element, BatchNorm (eval) two per element (fvcore's estimates); Vim's RMSNorm is traced as its
  pieces (square, mean, add, rsqrt, two multiplies);
- free: data movement and indexing (flip, transpose, movedim, cat, gather, scatter, index, pad, expand, dtype casts),
  integer/boolean arithmetic on index tensors, comparisons, sorting and top-k selection.

Pruned models that call a mixer's ``ssm_output`` (or ``branch``, ``project``, ``scan``) themselves instead of the
mixer's ``forward`` still get those ops attributed to the mixer in ``by_module``: the trace gives such calls the
mixer's scope, as fvcore's module hooks do for ``forward``.

Any op the trace meets that is neither counted nor declared free is reported in ``FlopReport.unsupported`` (never
silently dropped); for the released models and the pruned Vim that list is empty.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError, MissingDependencyError
from ssmtrim.models.flop_terms import MixerDims
from ssmtrim.models.registry import families
from ssmtrim.models.resize import resize_model
from ssmtrim.models.sizes import ImgSize, size_hw

CONVENTIONS = ("paper", "full")
TOP_LEVEL = "(top level)"  # ops the model runs in its own forward, outside its sub-modules

# selective scan op inputs: u, delta, A, B, C, D, z, delta_bias, gap, delta_softplus
_SCAN_OP = "ssmtrim::selective_scan"
_FLOAT_TYPES = {"Float", "Double", "Half", "BFloat16"}
# mixer methods that pruned models call directly (not through __call__); scoped during the trace so that their ops
# are attributed to the mixer, as those of forward are


@dataclass(frozen=True)
class FlopReport:
    """FLOPs (MACs) per image of one model under one convention.

    ``by_module``: disjoint parts that sum to ``total`` (top-level modules, one entry per block of a layer list, and
    ``(top level)`` for ops in the model's own forward). ``by_operator``: the same total split by operator (``full``)
    or by formula term (``paper``). ``tokens_per_layer``: tokens each mixer saw, per image, in layer order.
    """

    convention: str
    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    unsupported: dict[str, int]
    tokens_per_layer: list[float] | None
    input_size: tuple[int, int, int]
    batch_size: int

    @property
    def gflops(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gflops"] = self.gflops
        if self.tokens_per_layer is not None:
            d["tokens_per_layer"] = [int(t) if float(t).is_integer() else t for t in self.tokens_per_layer]
        return d


# ---------------------------------------------------------------------------------------------------------------
# fvcore handles (inputs, outputs: lists of torch._C.Value)


def _shape(value: Any) -> list[int] | None:
    return value.type().sizes() if value.isCompleteTensor() else None


def _numel(value: Any) -> int:
    shape = _shape(value)
    return 0 if shape is None else math.prod(shape)


def _is_float(value: Any) -> bool:
    if not value.isCompleteTensor():
        return False
    return value.type().scalarType() in _FLOAT_TYPES


def _elementwise(per_element: int = 1) -> Callable[[list, list], int]:
    def handle(inputs: list, outputs: list) -> int:
        return per_element * _numel(outputs[0]) if _is_float(outputs[0]) else 0

    return handle


def _reduce_sum(inputs: list, outputs: list) -> int:
    return max(_numel(inputs[0]) - _numel(outputs[0]), 0) if _is_float(outputs[0]) else 0


def _reduce_mean(inputs: list, outputs: list) -> int:
    return _numel(inputs[0]) if _is_float(outputs[0]) else 0


def _with_bias(base: Callable[[list, list], Any], key: str, bias_index: int) -> Callable[[list, list], Counter]:
    def handle(inputs: list, outputs: list) -> Counter:
        count = base(inputs, outputs)
        out = count if isinstance(count, Counter) else Counter({key: count})
        if len(inputs) > bias_index and _shape(inputs[bias_index]) is not None:
            out["bias"] += _numel(outputs[0])
        return out

    return handle


def _conv_mode(inputs: list, outputs: list) -> Counter:
    """A convolution with string padding ('same'): output elements x input channels per group x kernel taps."""
    weight, out = _shape(inputs[1]), _numel(outputs[0])
    count = Counter({"conv": out * math.prod(weight[1:]) if weight is not None else 0})
    if _shape(inputs[2]) is not None:
        count["bias"] += out
    return count


def _attention(inputs: list, outputs: list) -> Counter:
    """Scaled dot-product attention: q (.. L d), k (.. S d), v (.. S dv): L S d + L S dv multiply-accumulates and a
    softmax over L S scores (3 operations each, as ``aten::softmax`` counts)."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    if q is None or k is None or v is None:
        return Counter()
    scores = math.prod(q[:-1]) * k[-2]
    return Counter({"attention": scores * (q[-1] + v[-1]), "softmax": 3 * scores})


def _scan(inputs: list, outputs: list) -> Counter:
    bsz, e, length = _shape(inputs[0])
    n = _shape(inputs[2])[1]
    bel = bsz * e * length
    has_d, has_z, has_bias, has_gap = (_shape(inputs[i]) is not None for i in (5, 6, 7, 8))
    softplus = bool(inputs[10].toIValue())  # inputs[9] is gap_scale (a factored gap)
    return Counter({
        "selective_scan": 9 * bel * n + bel * (has_d + has_z),  # the peers' count
        "selective_scan_extra": bel * (has_z + has_bias + softplus + has_gap),  # SiLU(z), bias, softplus, gap
    })  # fmt: skip


_ELEMENTWISE = (
    "add", "sub", "rsub", "mul", "div", "neg", "exp", "expm1", "log", "log1p", "sqrt", "rsqrt", "square", "pow",
    "reciprocal", "abs", "sigmoid", "tanh", "silu", "gelu", "relu", "softplus", "clamp", "clamp_min", "clamp_max",
    "maximum", "minimum", "lerp", "addcmul",
)  # fmt: skip
_FREE = (
    "flip", "movedim", "moveaxis", "argsort", "sort", "topk", "argmax", "argmin", "scatter", "scatter_add", "where",
    "index_select", "masked_fill", "masked_select", "take_along_dim", "repeat", "repeat_interleave", "unflatten",
    "expand_as", "view_as", "reshape_as", "clone", "pad", "lt", "le", "ne", "logical_not", "logical_and", "logical_or",
    "bitwise_and", "bitwise_or", "rand", "randn", "randint", "ones_like", "zeros_like", "empty_like", "new_ones",
    "fill_", "zero_", "alias", "unsqueeze_", "squeeze_", "lift_fresh", "one_hot", "all", "any",
)  # fmt: skip


def require_fvcore(alternative: str = "") -> None:
    """A :class:`~ssmtrim.errors.MissingDependencyError` in one sentence unless fvcore (which every FLOPs count
    traces with) can be imported; ``alternative`` is appended as another way out, e.g. " or pass --no-flops"."""
    try:
        with warnings.catch_warnings():  # fvcore's import runs torch.jit.script, which warns that it is deprecated
            warnings.simplefilter("ignore")
            import fvcore.nn  # noqa: F401
    except ImportError:
        raise MissingDependencyError("counting FLOPs needs the fvcore package, which is not installed here; install "
                                     f"it (pip install fvcore){alternative}.") from None


def _handles() -> dict[str, Callable | None]:
    from fvcore.nn.jit_handles import conv_flop_jit, linear_flop_jit

    handles: dict[str, Callable | None] = {
        "aten::linear": _with_bias(linear_flop_jit, "linear", 2),
        "aten::_convolution": _with_bias(conv_flop_jit, "conv", 2),
        "aten::_convolution_mode": _conv_mode,
        "aten::scaled_dot_product_attention": _attention,
        "aten::sum": _reduce_sum,
        "aten::mean": _reduce_mean,
        "aten::norm": _reduce_mean,
        "aten::linalg_vector_norm": _reduce_mean,
        "aten::cumsum": _reduce_mean,
        "aten::softmax": _elementwise(3),
        "aten::log_softmax": _elementwise(3),
        _SCAN_OP: _scan,
    }
    for op in _ELEMENTWISE:
        handles[f"aten::{op}"] = handles[f"aten::{op}_"] = _elementwise()
    for op in _FREE:
        handles.setdefault(f"aten::{op}", None)
        handles.setdefault(f"aten::{op}_", None)
    return handles


def _mixer_dims(module: nn.Module) -> MixerDims | None:
    """The paper convention's terms of ``module`` if some registered family calls it its mixer."""
    for family in families().values():
        dims = family.mixer_dims(module)
        if dims is not None:
            return dims
    return None


# ---------------------------------------------------------------------------------------------------------------
# tracing


@dataclass
class _Trace:
    analysis: Any  # fvcore FlopCountAnalysis, already run
    model: nn.Module  # the traced model (a CPU copy when the given one was elsewhere)
    units: list[str]  # disjoint top-level parts, in model order
    mixers: dict[str, MixerDims]  # mixer name -> dims
    calls: dict[str, list[tuple[int, int, int | None]]]  # mixer name -> (batch, tokens, tokens scanned) per call
    input_size: tuple[int, int, int]
    batch_size: int


def _units(model: nn.Module, prefix: str = "") -> list[str]:
    """Disjoint parts of a model, in order: its children, with every layer list opened into its entries, and any
    module that holds a layer list (a hierarchical model's stage) opened too, so that each block is one part
    (``layers.3``; ``layers.1.blocks.0``, ``layers.1.downsample``)."""
    containers = (nn.ModuleList, nn.ModuleDict)
    units = []
    for name, child in model.named_children():
        if isinstance(child, containers) or any(isinstance(c, containers) for c in child.children()):
            units += _units(child, f"{prefix}{name}.")
        else:
            units.append(f"{prefix}{name}")
    return units


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    data = getattr(model, "data_config", None)
    if data is not None:
        return tuple(data.input_size)  # type: ignore[return-value]
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError("this model has no config to read its input size from; pass images=... to count_flops.")
    return (config.in_chans, *size_hw(config.img_size))


def _trace(model: nn.Module, batch_size: int, images: Tensor | None) -> _Trace:
    from ssmtrim.ops.selective_scan import scan_as_single_op

    require_fvcore()
    with warnings.catch_warnings():  # fvcore's import runs torch.jit.script, which warns that it is deprecated
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
        model = copy.deepcopy(model).cpu()  # fvcore counts on CPU, where every scan is the single registered op
    if images is None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        input_size = _input_size(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        images = torch.zeros(batch_size, *input_size, dtype=dtype)
    else:
        channels = getattr(getattr(model, "config", None), "in_chans", images.shape[1] if images.ndim == 4 else 3)
        if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] != channels:
            raise ConfigError(f"images must be a non-empty batch (B {channels} H W), got shape "
                              f"{tuple(images.shape)}.")
        if not images.is_floating_point():
            raise ConfigError(f"images are {images.dtype}; give them transformed (float), as the model takes them.")
        images = images.detach().cpu()
        input_size, batch_size = tuple(images.shape[1:]), images.shape[0]

    named = dict(model.named_modules())
    mixers = {name: m for name, m in named.items() if _mixer_dims(m) is not None}
    calls: dict[str, list[tuple[int, int]]] = {name: [] for name in mixers}
    scanned: dict[str, list[int]] = {name: [] for name in mixers}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # B L D
            calls[name].append((int(x.shape[0]), int(x.shape[1])))

        return hook

    def record_scan(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            scanned[name].append(math.prod(int(v) for v in args[0].shape[2:]))  # B E H W: the grid the routes read

        return hook

    hooks = [m.in_proj.register_forward_pre_hook(record(name)) for name, m in mixers.items()]
    # a mixer whose scan may read fewer tokens than it projects marks the scanned grid with a ``scan_input`` module
    hooks += [m.scan_input.register_forward_pre_hook(record_scan(name)) for name, m in mixers.items()
              if isinstance(getattr(m, "scan_input", None), nn.Module)]
    was_training = {m: m.training for m in model.modules()}
    model.eval()  # BatchNorm with running statistics, no drop path: the inference graph
    try:
        with torch.no_grad(), scan_as_single_op(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, images)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            analysis.set_op_handle(**_handles())
            analysis.total()  # runs the trace now, inside the contexts above
    finally:
        for h in hooks:
            h.remove()
        for m, flag in was_training.items():
            m.train(flag)
    def with_scans(name: str) -> list[tuple[int, int, int | None]]:
        """(batch, tokens, tokens scanned) per call: one scanned grid per call, or none known (then the scan reads
        every token the mixer projects)."""
        known = len(scanned[name]) == len(calls[name])
        return [(b, t, scanned[name][i] if known else None) for i, (b, t) in enumerate(calls[name])]

    calls_scanned = {name: with_scans(name) for name in mixers}
    return _Trace(analysis, model, _units(model), {n: _mixer_dims(m) for n, m in mixers.items()}, calls_scanned,
                  tuple(input_size), batch_size)  # type: ignore[arg-type]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# building the reports


def _unit_of(name: str, units: Sequence[str]) -> str:
    for unit in units:
        if name == unit or name.startswith(unit + "."):
            return unit
    return TOP_LEVEL


def _per_image(counts: dict[str, float], batch: int) -> dict[str, int]:
    return {k: int(round(v / batch)) for k, v in counts.items()}


def _tokens(trace: _Trace) -> list[float] | None:
    if not trace.mixers:
        return None
    return [sum(b * t for b, t, _ in trace.calls[name]) / trace.batch_size for name in trace.mixers]


def _unsupported(trace: _Trace) -> dict[str, int]:
    return dict(sorted(trace.analysis.unsupported_ops().items()))


def _full_report(trace: _Trace) -> FlopReport:
    fca, batch = trace.analysis, trace.batch_size
    counts = fca.by_module()
    by_module = {unit: counts.get(fca.canonical_module_name(unit), 0) for unit in trace.units}
    by_module[TOP_LEVEL] = fca.total() - sum(by_module.values())
    by_module = _per_image(by_module, batch)
    by_operator = _per_image(dict(fca.by_operator()), batch)
    return FlopReport("full", sum(by_module.values()), by_module, by_operator, _unsupported(trace), _tokens(trace),
                      trace.input_size, batch)  # fmt: skip


def _paper_report(trace: _Trace) -> FlopReport:
    if not trace.mixers:
        raise ConfigError(
            "the paper convention is defined for the registered families' mixers, and this model has none; use "
            "convention='full'."
        )
    fca, batch = trace.analysis, trace.batch_size
    by_module: Counter = Counter({unit: 0 for unit in trace.units})
    by_term: Counter = Counter()
    # conv and linear layers outside the mixers: MACs only (patch embedding / stem, head, extra convs)
    per_module = fca.by_module_and_operator()
    for name, module in trace.model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if any(name == m or name.startswith(m + ".") for m in trace.mixers):
            continue
        ops = per_module.get(fca.canonical_module_name(name), Counter())
        macs = ops.get("linear", 0) + ops.get("conv", 0)
        by_module[_unit_of(name, trace.units)] += macs
        by_term["conv+linear outside mixers"] += macs
    for name, dims in trace.mixers.items():
        for b, length, scanned in trace.calls[name]:
            terms = {k: b * v for k, v in dims.terms(length, scanned).items()}
            by_module[_unit_of(name, trace.units)] += sum(terms.values())
            by_term.update(terms)
    by_module_out = _per_image(dict(by_module), batch)
    by_module_out[TOP_LEVEL] = 0
    return FlopReport("paper", sum(by_module_out.values()), by_module_out, _per_image(dict(by_term), batch),
                      _unsupported(trace), _tokens(trace), trace.input_size, batch)  # fmt: skip


_BUILDERS = {"paper": _paper_report, "full": _full_report}


def _resolve(model: str | os.PathLike | nn.Module, revision: str | None, img_size: ImgSize | None = None,
             ) -> nn.Module:
    if isinstance(model, nn.Module):
        return model if img_size is None else resize_model(model, img_size)
    from pathlib import Path

    from ssmtrim.checkpoint import load_model
    from ssmtrim.models.registry import create_model, find_spec

    spec = find_spec(str(model))
    if spec is not None and revision is None and not Path(str(model)).exists():
        built = create_model(spec.name)  # FLOPs depend on the architecture only: nothing to download
        return built if img_size is None else resize_model(built, img_size)
    return load_model(model, revision=revision, img_size=img_size)


def count_flops_all(
    model: str | os.PathLike | nn.Module,
    conventions: Sequence[str] = CONVENTIONS,
    batch_size: int = 1,
    images: Tensor | None = None,
    revision: str | None = None,
    img_size: ImgSize | None = None,
) -> dict[str, FlopReport]:
    """FLOPs per image under several conventions from one trace (see the module docstring).

    ``model``: a model, or a source for :func:`ssmtrim.checkpoint.load_model` (a registered name is built from its
    architecture alone, with no download). ``images`` (B 3 H W) replaces the default batch of ``batch_size`` blank
    images of the model's input size; token pruning that depends on the image content needs real ones. ``img_size``
    (N or (H, W)) counts the model at another input size (see :func:`ssmtrim.models.resize.resize_model`).
    """
    unknown = [c for c in conventions if c not in _BUILDERS]
    if unknown:
        raise ConfigError(f"unknown FLOPs convention {unknown[0]!r}; choose from {', '.join(CONVENTIONS)}.")
    trace = _trace(_resolve(model, revision, img_size), batch_size, images)
    return {c: _BUILDERS[c](trace) for c in conventions}


def count_flops(
    model: str | os.PathLike | nn.Module,
    convention: str = "full",
    batch_size: int = 1,
    images: Tensor | None = None,
    revision: str | None = None,
    img_size: ImgSize | None = None,
) -> FlopReport:
    """FLOPs (MACs) per image of ``model`` under ``convention`` ("paper" or "full"); see the module docstring."""
    return count_flops_all(model, (convention,), batch_size, images, revision, img_size)[convention]
