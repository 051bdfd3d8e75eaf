"""The dense-against-pruned report: FLOPs, accuracy, speed and memory, side by side in one run.

:func:`build_report` evaluates a dense model and pruned variants (given as folders, or swept over keep ratios or FLOPs
targets for each arrangement) on the same images, counts their FLOPs in both conventions, and measures throughput
(fixed batch, warm-up, median of repeats), batch-1 latency and peak memory (process RSS above the baseline on CPU,
max allocated on CUDA). :func:`write_report` writes ``report.json``, ``report.md`` and the plots
(``accuracy_vs_gflops.png``, ``throughput_vs_gflops.png``, one curve per arrangement) atomically to a folder.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssmtrim.errors import ConfigError

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------ speed, memory


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; psutil elsewhere; 0 if neither)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


class _PeakRss:
    """Samples the RSS every millisecond in a thread; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak = self.base = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(0.001)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


@dataclass
class Speed:
    batch_size: int
    images_per_s: float  # median over repeats
    latency_ms: float  # batch 1, median
    peak_memory_mb: float  # CPU: peak RSS above the RSS before the timed runs; CUDA: max allocated
    peak_rss_mb: float  # the process's peak RSS during the timed runs (CPU and CUDA)
    device: str
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _time_runs(many: Callable[[], Any], one: Callable[[], Any], batch_size: int, warmup: int, iters: int,
               repeats: int, sync: Callable[[], None] = lambda: None, reset: Callable[[], None] = lambda: None):
    """Warm both calls up, then ``repeats`` timings of ``iters`` calls each: (images/s of ``many`` (a batch of
    ``batch_size``), ms per call of ``one`` (one image), the peak RSS watcher)."""
    for _ in range(warmup):
        many()
        one()
    sync()
    reset()
    rates, lats = [], []
    with _PeakRss() as rss:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                many()
            sync()
            rates.append(iters * batch_size / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(iters):
                one()
            sync()
            lats.append(1e3 * (time.perf_counter() - t0) / iters)
    return rates, lats, rss


@torch.no_grad()
def measure_speed(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 8, warmup: int = 2,
                  iters: int = 5, repeats: int = 3, device: str | torch.device = "cpu",
                  compiled: bool = False) -> Speed:
    """Throughput at ``batch_size`` and latency at batch 1, after warm-up; median of ``repeats`` timings of
    ``iters`` forwards each. Random inputs (speed does not depend on pixel values in count mode). With ``compiled``,
    of ``torch.compile(model, fullgraph=True, dynamic=False)``: a graph for each of the two batch sizes, made during
    the warm-up (minutes on a deep model) and not timed, after dropping the process's earlier compiled graphs; a
    model that does not compile is refused in one sentence."""
    device = torch.device(device)
    model = model.to(device).eval()
    run = _compiled(model) if compiled else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(batch_size, *input_size, device=device)
    x1 = x[:1].clone()
    rates, lats, rss = _time_runs(lambda: run(x), lambda: run(x1), batch_size, max(warmup, 1) if compiled else warmup,
                                  iters, repeats, sync,
                                  (lambda: torch.cuda.reset_peak_memory_stats(device)) if device.type == "cuda"
                                  else (lambda: None))
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        mem = (rss.peak - rss.base) / 2**20
    return Speed(batch_size, statistics.median(rates), statistics.median(lats), mem, rss.peak / 2**20,
                 f"{device} (compiled)" if compiled else str(device), torch.get_num_threads())


def check_compilable(model: nn.Module) -> None:
    """Refuse, in one sentence, a model whose forward one compiled graph cannot hold (a threshold-mode plan)."""
    from ssmtrim.pruning import is_pruned

    if is_pruned(model) and model.prune_config.mode != "count":
        raise ConfigError("--runtime compiled times one graph per batch size, which a threshold-mode plan (a token "
                          "count per image) cannot give; prune with --mode count, or use --runtime torch.")


def _compiled(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``model`` under ``torch.compile(fullgraph=True, dynamic=False)`` (a graph per input shape; not dynamic, which
    would recompile ssmtrim's shared forward for every family compiled in the process), its first call's failure to
    compile said in one sentence. The process's compiled graphs are dropped first (``torch.compiler.reset``): the rows
    of a report share one forward function, and past PyTorch's limit of graphs for one function a full-graph compile
    fails (``FailOnRecompileLimitHit``)."""
    check_compilable(model)
    torch.compiler.reset()
    graph = torch.compile(model, fullgraph=True, dynamic=False)
    made: set[tuple[int, ...]] = set()

    def run(x: Tensor) -> Tensor:
        if tuple(x.shape) in made:
            return graph(x)
        try:
            out = graph(x)
        except Exception as exc:  # dynamo and inductor raise many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"this model could not be compiled ({first}); measure its speed with --runtime torch "
                              "(eager) or onnxruntime.") from None
        made.add(tuple(x.shape))
        return out

    return run


RUNTIMES = ("torch", "compiled", "onnxruntime")


def measure_speed_onnx(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 8, warmup: int = 2,
                       iters: int = 5, repeats: int = 3, progress: Progress | None = None) -> Speed:
    """As :func:`measure_speed`, in onnxruntime: the model exported twice (a file for ``batch_size`` images and one
    for a single image, each checked against PyTorch before it is timed) into a temporary folder, then timed the same
    way on CPU with as many threads as PyTorch uses."""
    import tempfile

    from ssmtrim.export import OnnxModel, export_onnx

    with tempfile.TemporaryDirectory(prefix="ssmtrim-onnx-") as tmp:
        check = torch.randn(2 * batch_size, *input_size, generator=torch.Generator().manual_seed(0))
        runners = []
        for b in (batch_size, 1):
            path = Path(tmp) / f"b{b}.onnx"
            export_onnx(model, path, batch_size=b, check_images=check[: max(2, b)], progress=progress)
            runners.append(OnnxModel(path, threads=torch.get_num_threads()))
        many, one = runners
        x = torch.randn(batch_size, *input_size).numpy()
        x1 = x[:1].copy()
        rates, lats, rss = _time_runs(lambda: many.run(x), lambda: one.run(x1), batch_size, warmup, iters, repeats)
    return Speed(batch_size, statistics.median(rates), statistics.median(lats), (rss.peak - rss.base) / 2**20,
                 rss.peak / 2**20, "cpu (onnxruntime)", torch.get_num_threads())


# ------------------------------------------------------------------------------------------------------- report


@dataclass
class Entry:
    """One row of the report: the dense model or one pruned variant."""

    name: str
    arrangement: str  # "dense" for the dense model
    plan: dict[str, Any] | None
    gflops: dict[str, float]
    accuracy: dict[str, Any]
    speed: dict[str, Any] | None = None
    derived: dict[str, float] = field(default_factory=dict)
    # per stage, the restored feature map against dense: mean cosine similarity and relative error (None: the
    # family gives no feature maps)
    feature_fidelity: list[dict[str, float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``keep=0.9,0.8,0.7`` or ``flops=0.8,0.7,0.6`` -> (kind, values)."""
    kind, _, values = text.partition("=")
    kind = kind.strip().lower()
    if kind not in ("keep", "flops") or not values:
        raise ConfigError(f"--sweep takes keep=R1,R2,... or flops=F1,F2,...; got {text!r}.")
    try:
        out = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep values must be numbers, got {values!r}.") from None
    if not out or any(not 0 < v <= 1 for v in out):
        raise ConfigError(f"--sweep values must be fractions in (0, 1], got {values!r}.")
    return kind, out


def build_report(
    dense: nn.Module,
    data: str | os.PathLike,
    pruned: list[tuple[str, nn.Module]] = (),
    sweep: str | None = None,
    layers: tuple[int, ...] | None = None,
    arrangements: tuple[str, ...] | None = None,
    strategy: dict[str, Any] | None = None,
    task: str | None = None,
    calib: str | os.PathLike | None = None,
    num_images: int | None = None,
    calib_images: int = 256,
    batch_size: int = 8,
    eval_batch_size: int = 64,
    speed: bool = True,
    repeats: int = 3,
    iters: int = 5,
    device: str = "cpu",
    labels_file: str | os.PathLike | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    dense_name: str = "dense",
    skip_unknown_classes: bool = False,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Dense, then each pruned model (or each sweep point x arrangement), on the same images; see the module
    docstring. ``strategy`` holds further PruneConfig fields of the sweep (score, gap, conv, mode, options), and
    ``task`` ("classify", the default, or "dense") the family plan they are laid over, as for ``prune``. Returns the
    report as a dict (what ``report.json`` holds). Inside :func:`ssmtrim.distributed.sharded` each rank evaluates and
    calibrates on its block of the images (every rank gets the one-process accuracies) and rank 0 alone measures the
    speed. ``runtime="onnxruntime"`` measures the speed of every row in onnxruntime instead (each model exported to
    ONNX and checked against PyTorch first, :func:`measure_speed_onnx`), ``runtime="compiled"`` of every row compiled
    (``torch.compile``, :func:`measure_speed` with ``compiled``); accuracy and FLOPs stay eager PyTorch's."""
    from ssmtrim.data import scan_folder
    from ssmtrim.devices import check_device
    from ssmtrim.distributed import is_main, leading, local_prefix, shard_images, sum_counts, work_split
    from ssmtrim.evaluate import check_compatible, evaluate_tensors, label_images, predict
    from ssmtrim.flops import count_flops_all, require_fvcore
    from ssmtrim.memory import check_batch_fits
    from ssmtrim.models.loading import class_names_of, data_config_of
    from ssmtrim.models.registry import family_of
    from ssmtrim.notices import notice
    from ssmtrim.pruning import PruneConfig, is_pruned, reduce_on, remove_pruning, strategy_names
    from ssmtrim.pruning.calibrate import load_images
    from ssmtrim.pruning.engine import check_plan_for, check_provides
    from ssmtrim.pruning.schedule import FlopsModel, fitted_plan, keep_for, reachable_plan

    device = str(check_device(device))
    if is_pruned(dense):
        raise ConfigError("the first model of a report must be dense; give the dense model first.")
    if sweep is None and not pruned:
        raise ConfigError("nothing to compare: give pruned model folders after the dense model, or --sweep.")
    from ssmtrim.models.registry import check_task, recommended_plan_of

    if task is not None:
        check_task(task)
    if sweep is None and (task is not None or (strategy or {}).get("options")):
        raise ConfigError("--task and --option shape the plans of a sweep; give --sweep, or leave them out (a pruned "
                          "folder carries its own plan).")
    chosen = arrangements is not None  # given: each must run; default: the strategies that can run here
    arrangements = strategy_names() if arrangements is None else tuple(arrangements)
    for arrangement in arrangements:
        if arrangement not in strategy_names():
            raise ConfigError(f"--arrangements: {arrangement!r} is not one of {', '.join(strategy_names())}.")
        if chosen and sweep is not None:  # what the family cannot give is refused before any image is read
            check_provides(dense, PruneConfig.recommended(dense, task, **(strategy or {}), arrangement=arrangement))
    for name, model in pruned:
        if not is_pruned(model):
            raise ConfigError(f"{name!r} is not pruned, and a report compares one dense model with pruned ones; give "
                              "the dense model first, then pruned folders (or --sweep).")
        check_compatible(model, dense)
    sweep_values = parse_sweep(sweep) if sweep is not None else None  # a bad --sweep is said before the images load
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}.")
    if runtime == "onnxruntime" and speed:
        from ssmtrim.export import check_exportable, require_export_packages

        require_export_packages()
        if torch.device(device).type != "cpu":
            raise ConfigError("--runtime onnxruntime measures on the CPU; leave --device out or give --device cpu.")
        for _, model in pruned:
            check_exportable(model)
        if sweep_values is not None and (strategy or {}).get("mode", "count") != "count":
            raise ConfigError("--runtime onnxruntime needs plans with fixed token counts; sweep with --mode count.")
    if runtime == "compiled" and speed:
        for _, model in pruned:
            check_compilable(model)
        if sweep_values is not None and (strategy or {}).get("mode", "count") != "count":
            raise ConfigError("--runtime compiled needs plans with fixed token counts; sweep with --mode count.")
    require_fvcore()
    data_cfg = data_config_of(dense)
    if speed and is_main() and torch.device(device).type == "cpu":  # before the images and long work
        check_batch_fits(dense, data_cfg.input_size, batch_size)
    images = label_images(scan_folder(data), dense.config.num_classes, labels_file, class_names_of(dense),
                          skip_unknown_classes).subset(num_images, seed)
    if len(images) < work_split()[1]:
        raise ConfigError(f"{len(images)} images for {work_split()[1]} processes; give at least one image per process "
                          "or start fewer processes.")
    x, y, unreadable = load_images(shard_images(images), data_cfg, eval_batch_size, progress)
    unreadable = sum_counts(unreadable)[0]
    dense.eval()
    dense_logits = predict(dense, x, eval_batch_size)

    fidelity_images = leading(x, FIDELITY_IMAGES)
    dense_maps = _maps(dense, fidelity_images)

    def entry(name: str, arrangement: str, model: nn.Module) -> Entry:
        acc = evaluate_tensors(model, x, y, dense_logits, eval_batch_size).to_dict()
        acc["unreadable"] = unreadable
        plan = model.prune_config.to_dict() if is_pruned(model) else None
        flop_images = leading(x, 16) if plan is not None and plan["mode"] == "threshold" else None
        flops = {c: r.gflops for c, r in count_flops_all(model, images=flop_images).items()}
        spd = None
        if speed and is_main() and runtime == "onnxruntime":
            spd = measure_speed_onnx(model, data_cfg.input_size, batch_size, iters=iters, repeats=repeats).to_dict()
        elif speed and is_main():
            spd = measure_speed(model, data_cfg.input_size, batch_size, iters=iters, repeats=repeats,
                                device=device, compiled=runtime == "compiled").to_dict()
        model.to("cpu")
        fidelity = None
        if dense_maps is not None and fidelity_images.shape[0]:
            fidelity = map_fidelity(_maps(model, fidelity_images), dense_maps)
        return Entry(name, arrangement, plan, flops, acc, spd, feature_fidelity=fidelity)

    variants: list[tuple[str, str, Callable[[], nn.Module], Callable[[], None]]] = []
    for name, model in pruned:
        variants.append((name, model.prune_config.arrangement, lambda m=model: m, lambda: None))
    if sweep_values is not None:
        kind, values = sweep_values
        depth = family_of(dense).depth(dense.config)
        # where the family's recommended plan reduces (its hand-set layers), as prune does
        layers = layers or tuple(recommended_plan_of(family_of(dense), dense.config, task or "classify")["layers"])
        PruneConfig(layers=layers, keep=(1.0,)).validate_for(depth)
        calib_set = scan_folder(calib).subset(calib_images, seed) if calib is not None else None
        xc = load_images(shard_images(calib_set), data_cfg, eval_batch_size)[0] if calib_set is not None \
            else x[:local_prefix(len(x), calib_images)]
        estimate = FlopsModel(dense, "paper") if kind == "flops" else None
        given_options = set(dict((strategy or {}).get("options") or {}))  # held as given, never worked around

        def with_keep(value: float, config: PruneConfig) -> PruneConfig:
            """The row's plan at keep ``value``, or at the keep that meets FLOPs ``value`` (as prune --flops: a
            target the plan cannot reach takes the plan its strategy offers to reach further, said in a note)."""
            if kind == "keep":
                return config.replace(keep=(value,))
            config = reachable_plan(dense, config, value, "paper", layers, held=given_options, estimate=estimate)
            keep = keep_for(estimate.for_plan(config), layers, value)
            if keep is None:
                raise ConfigError(f"--sweep flops={value:g} cannot be reached by pruning after blocks "
                                  f"{','.join(map(str, layers))} with --arrangement {config.arrangement}; choose "
                                  "larger targets or --layers.")
            config = fitted_plan(estimate, config, layers, keep, value, given_options)
            return config.replace(keep=(keep,))

        # every plan checked before any work: a strategy given with --arrangements that cannot run one is refused;
        # by default the sweep leaves out what cannot run on this model (said once)
        runs, left_out = [], []
        for value in values:
            for arrangement in arrangements:
                config = PruneConfig.recommended(dense, task, **(strategy or {}), arrangement=arrangement,
                                                 layers=layers, keep=(1.0,))
                config = with_keep(value, config)
                try:
                    check_plan_for(dense, config, runnable=False)
                except ConfigError:
                    if chosen:
                        raise
                    left_out.append(f"{arrangement} {kind}={value:g}")
                    continue
                runs.append((value, arrangement, config))
        if left_out:
            notice("sweep-left-out", f"--sweep leaves out {', '.join(left_out)}: those plans cannot run on this "
                   "model (name a strategy with --arrangements to see why).")
        for value, arrangement, config in runs:
            label = f"{arrangement} {kind}={value:g}"

            def make(config=config) -> nn.Module:
                # the plan prune resolves for these options (built above): the family's recommended one, with this
                # row's strategy, layers and keep (and its compensation, fitted on the calibration images)
                reduce_on(dense, config, xc, eval_batch_size)
                return dense

            variants.append((label, arrangement, make, lambda: remove_pruning(dense)))
    total = len(variants) + 1
    if progress:
        progress("report", 0, total)
    rows = [entry(dense_name, "dense", dense)]
    if progress:
        progress("report", 1, total)
    for i, (name, arrangement, make, undo) in enumerate(variants):
        rows.append(entry(name, arrangement, make()))
        undo()
        if progress:
            progress("report", i + 2, total)
    base = rows[0]
    for row in rows:
        row.derived["flops_reduction_paper"] = 1 - row.gflops["paper"] / base.gflops["paper"]
        row.derived["flops_ratio_full"] = base.gflops["full"] / row.gflops["full"]
        if row.speed is not None:
            speedup = row.speed["images_per_s"] / base.speed["images_per_s"]
            row.derived["speedup"] = speedup
            row.derived["latency_speedup"] = base.speed["latency_ms"] / row.speed["latency_ms"]
            # how much of the saved FLOPs became saved time
            row.derived["realised"] = speedup / row.derived["flops_ratio_full"]
    return {
        "ssmtrim_version": _version(),
        "data": str(data),
        "num_images": sum_counts(len(y))[0],
        "unreadable": unreadable,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device if runtime == "torch" else f"{device} ({runtime})",
        "runtime": runtime,
        "batch_size": batch_size,
        "sweep": sweep,
        "task": task or "classify",
        "layers": list(layers) if layers else None,
        "entries": [copy.deepcopy(r.to_dict()) for r in rows],
    }


FIDELITY_IMAGES = 64  # the first images of the report's set (of this rank's share) give the feature fidelity


def _maps(model: nn.Module, x: Tensor) -> list[Tensor] | None:
    """Each stage's restored feature map of ``model`` on ``x``; None where the family gives none."""
    from ssmtrim.models.registry import family_of
    from ssmtrim.pruning import feature_maps

    if getattr(family_of(model), "feature_map", None) is None:
        return None
    return feature_maps(model, x)


def map_fidelity(maps: list[Tensor], dense: list[Tensor]) -> list[dict[str, float]]:
    """Per stage: the mean over images of the cosine similarity of the flattened maps, and the relative error
    ||map - dense|| / ||dense|| (over all images)."""
    out = []
    for stage, (got, want) in enumerate(zip(maps, dense, strict=True)):
        a, b = got.flatten(1).double(), want.flatten(1).double()
        out.append({"stage": stage, "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()),
                    "rel_error": float((a - b).norm() / b.norm().clamp_min(1e-30))})
    return out


def _version() -> str:
    from ssmtrim import __version__

    return __version__


# ----------------------------------------------------------------------------------------------------- outputs


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def table_rows(report: dict[str, Any], compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of report.md, or of the terminal table (``compact``: the main columns, short headers; the
    terminal drops the last ones further where it is narrow, see :func:`fit_columns`)."""
    header = ["model", "GFLOPs paper", "GFLOPs full", "FLOPs saved", "top-1", "top-5", "agreement", "KL", "img/s",
              "latency ms", "peak +MB", "peak RSS MB", "speed-up", "realised"]
    short = ["model", "GFLOPs", "", "saved", "top-1", "", "agree", "", "img/s", "ms@1", "+MB", "", "speed", "real"]
    keep = [0, 1, 3, 4, 6, 8, 9, 10, 12, 13] if compact else list(range(len(header)))
    if compact:
        header = short
    rows = []
    for e in report["entries"]:
        acc, spd, der = e["accuracy"], e["speed"] or {}, e["derived"]
        name = Path(e["name"]).name if e["arrangement"] == "dense" else e["name"]
        row = [
            name, f"{e['gflops']['paper']:.4f}", f"{e['gflops']['full']:.4f}",
            _fmt(100 * der["flops_reduction_paper"], ".1f", "%"), _fmt(acc["top1"], ".2f"), _fmt(acc["top5"], ".2f"),
            _fmt(acc["agreement"], ".2f"), _fmt(acc["kl"], ".4f"), _fmt(spd.get("images_per_s"), ".1f"),
            _fmt(spd.get("latency_ms"), ".1f"), _fmt(spd.get("peak_memory_mb"), ".0f"),
            _fmt(spd.get("peak_rss_mb"), ".0f"), _fmt(der.get("speedup"), ".2f", "x"), _fmt(der.get("realised"), ".2f"),
        ]  # fmt: skip
        rows.append([row[i] for i in keep])
    return [header[i] for i in keep], rows


# the terminal table's columns (compact headers) given up first where the terminal is narrow
_DROP_FIRST = ("+MB", "ms@1", "speed", "agree", "img/s")


def fit_columns(header: list[str], rows: list[list[str]], width: int) -> tuple[list[str], list[list[str]]]:
    """The compact table cut to ``width`` characters: columns of :data:`_DROP_FIRST` dropped, in that order, until
    every cell fits whole (report.md keeps them all)."""

    def needed(cols: list[int]) -> int:
        return 1 + sum(3 + max(len(header[c]), *(len(r[c]) for r in rows)) for c in cols)

    cols = list(range(len(header)))
    for name in _DROP_FIRST:
        if needed(cols) <= width:
            break
        cols = [c for c in cols if header[c] != name]
    return [header[c] for c in cols], [[r[c] for c in cols] for r in rows]


def markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    lines = [f"# ssmtrim report ({report['ssmtrim_version']})", "",
             f"{report['num_images']} images from `{report['data']}` ({report['unreadable']} unreadable). Speed: "
             f"batch {report['batch_size']} on {report['device']}, {report['threads']} threads, torch "
             f"{report['torch']}; median of repeats after warm-up. Top-1/top-5/agreement in %, KL(dense || model) "
             "in nats. `speed-up` is throughput over dense; `realised` is the speed-up divided by the FLOPs ratio "
             "(full convention): the share of the saved FLOPs that became saved time.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    reduced = [e for e in report["entries"][1:] if e.get("feature_fidelity")]
    if reduced:
        stages = len(reduced[0]["feature_fidelity"])
        lines += ["", "## Feature fidelity", "",
                  f"Each stage's output restored to its full grid (what a dense head reads: a merged token un-merged "
                  f"to every position it stands for, a pruned position from its nearest token) against dense, on the "
                  f"first {FIDELITY_IMAGES} images: mean cosine similarity / relative error.", "",
                  "| model | " + " | ".join(f"stage {i}" for i in range(stages)) + " |", "|---|" + "---|" * stages]
        lines += ["| " + e["name"] + " | " + " | ".join(f"{f['cosine']:.4f} / {f['rel_error']:.4f}"
                                                          for f in e["feature_fidelity"]) + " |" for e in reduced]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], folder: Path) -> list[str]:
    """accuracy_vs_gflops.png and (with speed) throughput_vs_gflops.png; one curve per arrangement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ssmtrim.notices import notice

        notice("plots-skipped", "matplotlib is not installed, so the report has no plots (report.json and report.md "
               "are complete); pip install matplotlib to get them.")
        return []
    entries = report["entries"]
    dense = entries[0]
    written = []
    metrics = [("top1", "top-1 (%)", "accuracy_vs_gflops.png")]
    if dense["accuracy"]["top1"] is None:
        metrics = [("agreement", "agreement with dense top-1 (%)", "accuracy_vs_gflops.png")]
    if dense["speed"] is not None:
        metrics.append(("images_per_s", "images / s", "throughput_vs_gflops.png"))
    for key, ylabel, name in metrics:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        section = "speed" if key == "images_per_s" else "accuracy"
        value = lambda e, k=key, s=section: e[s][k]  # noqa: E731
        dense_value = value(dense) if key != "agreement" else 100.0
        ax.scatter([dense["gflops"]["paper"]], [dense_value], color="black", zorder=3, label="dense")
        for arrangement in dict.fromkeys(e["arrangement"] for e in entries[1:]):
            pts = sorted((e["gflops"]["paper"], value(e)) for e in entries[1:] if e["arrangement"] == arrangement)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=arrangement)
        ax.set_xlabel("GFLOPs per image (paper convention)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def write_report(report: dict[str, Any], out_dir: str | os.PathLike, force: bool = False,
                 inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """report.json, report.md and the plots, written to a temporary folder renamed into place; an existing folder is
    replaced only with ``force`` and only when ssmtrim wrote it, never when it overlaps ``inputs`` (label -> path;
    see :mod:`ssmtrim.outputs`)."""
    from ssmtrim.checkpoint import write_folder_atomic
    from ssmtrim.outputs import REPORT

    def write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown(report), encoding="utf-8")
        plot(report, tmp)

    return write_folder_atomic(out_dir, force, write, inputs, kind=REPORT)
