"""Where onnxruntime spends a batch-1 forward, dense against reduced, by the line of ssmtrim's code that made each node.

    OMP_NUM_THREADS=1 python benchmarks/onnx_profile.py [--model mambavision_cifar] [--keep 0.7] [--option N=V]
        [--runs 300] [--top 12] [--json out.json]

Both models are exported for one image (the reduced one with its family's recommended plan at ``--keep`` after its
recommended blocks, ``--option`` laid over its options, count mode, compensation off; a registered name without
bundled weights gets random weights) and checked on four random images. Each file then runs ``--runs`` times under
onnxruntime's profiler, one intra-op thread; every node's kernel time and executions are summed by the innermost
module ``forward`` of ssmtrim's in the stack the exporter recorded for it (nodes onnxruntime fused or made itself have
none), and the two files' sums are printed side by side, the lines that cost the reduced file most first. The
profiler's own cost per node inflates every figure (a node of a few microseconds reads several times that): read the
columns against each other. Last, both files unprofiled, timed in turns (wall clock, median of repeats) with their
ratio.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssmtrim.bundled import bundled_or_random
from ssmtrim.export import export_onnx
from ssmtrim.models.loading import data_config_of
from ssmtrim.pruning import PruneConfig, apply_pruning
from ssmtrim.pruning.config import declared_options
from ssmtrim.pruning.options import parse_option

NO_LINE = "(fused or made by onnxruntime)"


def source_lines(path: Path) -> dict[str, str]:
    """Node name -> "file:line" of the innermost ssmtrim module forward the exporter recorded for it."""
    import onnx

    lines = {}
    for node in onnx.load(str(path)).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        frames = [f.strip() for f in meta.get("pkg.torch.onnx.stack_trace", "").split("\n")
                  if f.strip().startswith("File") and "ssmtrim/" in f]
        if frames:
            where = frames[-1][frames[-1].find("ssmtrim/"):]  # 'ssmtrim/x.py", line N, in forward'
            file, _, rest = where.partition('", line ')
            lines[node.name] = f"{file}:{rest.split(',')[0]}"
    return lines


def _session(path: Path, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options)


def profile_by_line(path: Path, x, runs: int, folder: Path) -> dict[str, tuple[float, float]]:
    """line -> (microseconds, node executions) per run, under onnxruntime's profiler."""
    lines = source_lines(path)
    session = _session(path, str(folder / path.stem))
    feed = {session.get_inputs()[0].name: x}
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    time_of: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            line = lines.get(event["name"][: -len("_kernel_time")], NO_LINE)
            time_of[line] += event["dur"]
            count[line] += 1
    return {line: (time_of[line] / runs, count[line] / runs) for line in time_of}


def timed_in_turns(paths: dict[str, Path], x, repeats: int = 30, iters: int = 10) -> dict[str, float]:
    """Milliseconds per call of each file, unprofiled, the files timed in turns (median of repeats, wall clock)."""
    sessions = {k: _session(p) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(iters):
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                s.run(None, feeds[k])
            times[k].append(1e3 * (time.perf_counter() - t0) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mambavision_cifar")
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--option", action="append", default=[], metavar="NAME=V",
                    help="a plug-in option laid over the family's (repeatable), e.g. --option mlp_groups=step")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    dense = bundled_or_random(args.model)
    options = dict(parse_option(o, declared_options()) for o in args.option) or None
    config = PruneConfig.recommended(dense, keep=(args.keep,), compensate="none", options=options)
    reduced = apply_pruning(bundled_or_random(args.model), config)
    shape = data_config_of(dense).input_size
    check = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {"dense": folder / "dense.onnx", "reduced": folder / "reduced.onnx"}
        for kind, model in (("dense", dense), ("reduced", reduced)):
            export_onnx(model, paths[kind], check_images=check)
        profiles = {kind: profile_by_line(path, x, args.runs, folder) for kind, path in paths.items()}
        ms = timed_in_turns(paths, x, args.repeats)
    print(f"{args.model}: {config.arrangement} after {config.layers} at keep {args.keep} ({dict(config.options)}), "
          f"batch 1, onnxruntime, one thread; {args.runs} profiled runs (us and node executions a run, inflated by the "
          "profiler)")
    for kind in ("dense", "reduced"):
        total = sum(t for t, _ in profiles[kind].values())
        nodes = sum(n for _, n in profiles[kind].values())
        print(f"  {kind:8s} nodes {total:8.1f} us  {nodes:6.0f} executions")
    lines = set(profiles["dense"]) | set(profiles["reduced"])
    extra = {line: profiles["reduced"].get(line, (0, 0))[0] - profiles["dense"].get(line, (0, 0))[0] for line in lines}
    print(f"  {'dense us':>9s} {'nodes':>6s} {'reduced us':>11s} {'nodes':>6s}  line (the reduced file's extra first)")
    for line in sorted(lines, key=lambda k: -abs(extra[k]))[: args.top]:
        d, r = profiles["dense"].get(line, (0.0, 0.0)), profiles["reduced"].get(line, (0.0, 0.0))
        print(f"  {d[0]:9.1f} {d[1]:6.0f} {r[0]:11.1f} {r[1]:6.0f}  {line}")
    print(f"  unprofiled, in turns: dense {ms['dense']:.3f} ms, reduced {ms['reduced']:.3f} ms, "
          f"reduced {ms['dense'] / ms['reduced']:.2f}x as fast")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "plan": config.to_dict(), "ms": ms,
                                               "profile": profiles}, indent=1))


if __name__ == "__main__":
    main()
