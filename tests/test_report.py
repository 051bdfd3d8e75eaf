"""``ssmtrim report``: dense against pruned folders or a sweep; JSON, Markdown and plots; speed; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ssmtrim
from ssmtrim.cli.app import app
from ssmtrim.errors import ConfigError
from ssmtrim.pruning import PruneConfig, apply_pruning, strategy_names
from ssmtrim.report import measure_speed, parse_sweep

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", num_classes=3)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    dense = ssmtrim.save_model(model, root / "dense")
    pruned = ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(2,), keep=(0.5,))), root / "pruned")
    return root, dense, pruned


def test_report_of_folders_writes_json_md_and_plots(setup):
    root, dense, pruned = setup
    res = runner.invoke(app, ["report", str(dense), str(pruned), "--data", str(root / "data"), "-o",
                              str(root / "r1"), "--repeats", "1", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {p.name for p in (root / "r1").iterdir()} == {"report.json", "report.md", "accuracy_vs_gflops.png",
                                                         "throughput_vs_gflops.png"}
    assert json.loads((root / "r1" / "report.json").read_text())["entries"] == report["entries"]
    d, p = report["entries"]
    assert d["arrangement"] == "dense" and p["arrangement"] == "align"
    assert d["accuracy"]["agreement"] == 100.0 and d["derived"]["speedup"] == 1.0
    assert p["gflops"]["paper"] < d["gflops"]["paper"] and p["derived"]["flops_reduction_paper"] > 0.2
    assert p["accuracy"]["num_images"] == 18 and p["accuracy"]["top1"] is not None
    for key in ("images_per_s", "latency_ms", "peak_rss_mb"):
        assert p["speed"][key] > 0, key  # measured, not a default
    assert p["speed"]["peak_rss_mb"] >= p["speed"]["peak_memory_mb"]  # the peak includes what was there before
    assert p["derived"]["realised"] == pytest.approx(p["derived"]["speedup"] / p["derived"]["flops_ratio_full"])
    assert "| align |" not in (root / "r1" / "report.md").read_text()  # names, not arrangements, label rows
    # an existing folder is not replaced without --force
    res = runner.invoke(app, ["report", str(dense), str(pruned), "--data", str(root / "data"), "-o", str(root / "r1")])
    assert res.exit_code == 1 and "--force" in res.output


class _Holds(torch.nn.Module):
    """A model whose forward holds ``mb`` MiB of fresh pages for a moment (an anonymous mapping, written so the pages
    are resident, then unmapped: what the allocator kept from earlier tests cannot hide it)."""

    def __init__(self, mb: int) -> None:
        super().__init__()
        self.mb, self.weight = mb, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import mmap
        import time

        if self.mb:
            with mmap.mmap(-1, self.mb * 2**20) as pages:
                for offset in range(0, self.mb * 2**20, mmap.PAGESIZE):
                    pages[offset] = 1
                time.sleep(0.05)  # long enough for the 1 ms RSS sampler, even on a loaded machine
        return x.mean() + self.weight


def test_peak_memory_sees_what_a_forward_allocates():
    light = measure_speed(_Holds(0), (3, 8, 8), batch_size=2, warmup=1, iters=2, repeats=1)
    heavy = measure_speed(_Holds(96), (3, 8, 8), batch_size=2, warmup=1, iters=2, repeats=1)
    print(f"\npeak above baseline: light {light.peak_memory_mb:.1f} MiB, heavy {heavy.peak_memory_mb:.1f} MiB")
    assert heavy.peak_memory_mb >= 80  # the 96 MiB buffer, less what the allocator kept from the warm-up
    assert light.peak_memory_mb < 40
    assert heavy.peak_rss_mb >= heavy.peak_memory_mb


def test_sweep_covers_every_arrangement_that_can_run(setup):
    root, dense, _ = setup
    res = runner.invoke(app, ["report", str(dense), "--data", str(root / "data"), "--sweep", "keep=0.75,0.5",
                              "--layers", "1,2", "--no-speed", "-o", str(root / "r2"), "--json"])
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)["entries"]
    # every registered strategy that can run on a Vim; quartermap thins a 2-D cross-scan (VMamba only): left out,
    # said in a note
    names = [n for n in strategy_names() if n != "quartermap"]
    assert "leaves out quartermap keep=0.75, quartermap keep=0.5" in res.stderr
    assert {"align", "keep-order", "reorder", "merge", "tome"} <= set(names)
    assert [e["arrangement"] for e in entries] == ["dense"] + names * 2
    assert all(e["speed"] is None for e in entries)
    n = len(names)
    assert entries[1]["plan"]["layers"] == [1, 2] and entries[1 + n]["plan"]["keep"] == [0.5, 0.5]
    assert entries[1 + n]["gflops"]["full"] < entries[1]["gflops"]["full"] < entries[0]["gflops"]["full"]
    # the restored feature maps against dense, per stage (a flat model: one), worse at the smaller keep
    fidelity = [e["feature_fidelity"] for e in entries]
    assert fidelity[0] is not None and fidelity[0][0]["cosine"] == pytest.approx(1.0)
    assert fidelity[0][0]["rel_error"] == pytest.approx(0.0, abs=1e-12)
    merge = names.index("merge")
    assert fidelity[1 + n + merge][0]["rel_error"] > fidelity[1 + merge][0]["rel_error"] > 0
    assert "## Feature fidelity" in (root / "r2" / "report.md").read_text()
    # one plan everywhere: each sweep row is the plan prune resolves for it (the family's recommended one, with the
    # row's strategy, layers and keep), compensation included
    from ssmtrim.pruning import PruneConfig

    for e in entries[1:]:
        keep = e["plan"]["keep"][0]
        want = PruneConfig.recommended(ssmtrim.load_model(dense), arrangement=e["arrangement"], layers=(1, 2),
                                       keep=(keep,)).to_dict()
        assert {k: v for k, v in e["plan"].items() if k != "thresholds"} == \
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in want.items() if k != "thresholds"}


def test_a_sweep_takes_the_task_and_options(setup):
    """report --sweep --task dense --option ...: each row's plan is the family's plan for that task with the options
    laid over it, as prune resolves it; neither applies without a sweep (a pruned folder carries its own plan)."""
    root, _, pruned = setup
    torch.manual_seed(0)
    dense = ssmtrim.save_model(ssmtrim.create_model("mambavision_test", num_classes=3), root / "mv_dense")
    res = runner.invoke(app, ["report", str(dense), "--data", str(root / "data"), "--sweep", "keep=0.5",
                              "--arrangements", "unmerge", "--task", "dense", "--option", "mlp_share=0.3",
                              "--no-speed", "-o", str(root / "r_task"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["task"] == "dense"
    options = out["entries"][1]["plan"]["options"]
    assert options["reach_share"] == 0.2 and options["mlp_share"] == 0.3 and options["mixer"] == "positions"
    bad = runner.invoke(app, ["report", str(root / "dense"), str(pruned), "--data", str(root / "data"), "--task",
                              "dense", "--no-speed", "-o", str(root / "r_task_bad")])
    assert bad.exit_code == 1 and "--task and --option shape the plans of a sweep" in bad.output
    assert not (root / "r_task_bad").exists()


def test_speed_is_measured():
    model = ssmtrim.create_model("vim_test").eval()
    speed = measure_speed(model, (3, 32, 32), batch_size=4, warmup=1, iters=2, repeats=2)
    assert speed.images_per_s > 0 and speed.latency_ms > 0 and speed.batch_size == 4 and speed.device == "cpu"


def test_a_report_times_every_row_compiled(setup):
    """``--runtime compiled``: each row timed as a torch.compile graph (the dense model and the reduced one, a graph
    per batch size, made before the timing), the JSON saying where; the accuracy is eager PyTorch's as in any report."""
    root, dense, pruned = setup
    res = runner.invoke(app, ["report", str(dense), str(pruned), "--data", str(root / "data"), "-o",
                              str(root / "r_compiled"), "--repeats", "1", "--batch-size", "2", "--runtime", "compiled",
                              "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["runtime"] == "compiled" and report["device"] == "cpu (compiled)"
    for row in report["entries"]:
        assert row["speed"]["device"] == "cpu (compiled)"
        assert row["speed"]["images_per_s"] > 0 and row["speed"]["latency_ms"] > 0
    assert report["entries"][1]["accuracy"]["top1"] is not None


def test_compiled_speed_times_a_fullgraph_static_graph_and_resets_the_caches(monkeypatch):
    calls, real = [], torch.compile

    def recording(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    resets = []
    monkeypatch.setattr(torch, "compile", recording)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    model = apply_pruning(ssmtrim.create_model("vim_test", depth=2).eval(),
                          PruneConfig(layers=(1,), keep=(0.5,), arrangement="merge"))
    speed = measure_speed(model, (3, 32, 32), batch_size=2, warmup=1, iters=1, repeats=1, compiled=True)
    assert calls == [{"fullgraph": True, "dynamic": False}] and resets == [1]
    assert speed.device == "cpu (compiled)" and speed.images_per_s > 0


def test_compiled_speed_refuses_what_cannot_compile(monkeypatch):
    from ssmtrim.report import build_report

    model = ssmtrim.create_model("vim_test", depth=2).eval()
    thresholded = apply_pruning(ssmtrim.create_model("vim_test", depth=2).eval(),
                                PruneConfig(layers=(1,), keep=(0.5,), mode="threshold", thresholds=(0.0,)))
    with pytest.raises(ConfigError, match="--runtime compiled times one graph per batch size"):
        measure_speed(thresholded, (3, 32, 32), batch_size=2, warmup=1, iters=1, repeats=1, compiled=True)
    with pytest.raises(ConfigError, match="--runtime compiled times one graph per batch size"):
        build_report(model, "unused", [("t", thresholded)], runtime="compiled")
    with pytest.raises(ConfigError, match="--runtime must be one of torch, compiled, onnxruntime"):
        build_report(model, "unused", [("t", thresholded)], runtime="tvm")

    def fails(*args, **kwargs):
        def graph(x):
            raise RuntimeError("backend compiler failed\nmore lines")
        return graph

    monkeypatch.setattr(torch, "compile", fails)
    with pytest.raises(ConfigError, match=r"could not be compiled \(backend compiler failed\); measure its speed"):
        measure_speed(model, (3, 32, 32), batch_size=2, warmup=1, iters=1, repeats=1, compiled=True)


@pytest.mark.parametrize("text", ["keep", "keep=", "size=0.5", "keep=1.5", "flops=a"])
def test_bad_sweeps(text):
    with pytest.raises(ConfigError, match="--sweep"):
        parse_sweep(text)


@pytest.mark.parametrize("args,message", [
    (["--sweep", "flops=0.01", "--layers", "3"], "cannot be reached"),
    ([], "at least one pruned folder"),
    (["--sweep", "keep=0.5", "--arrangements", "shuffle"], "not one of"),
    (["--sweep", "keep=0.5", "--layers", "9"], "out of range"),
    (["--sweep", "keep=0.5", "--task", "seg"], "--task 'seg' is not one of classify, dense"),
    (["--sweep", "keep=0.5", "--option", "nope=1"], "no strategy or score declares it"),
])  # fmt: skip
def test_bad_input(setup, args, message):
    root, dense, _ = setup
    res = runner.invoke(app, ["report", str(dense), "--data", str(root / "data"), "--no-speed", "-o",
                              str(root / "bad"), *args])
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert not (root / "bad").exists()


def test_first_model_must_be_dense(setup):
    root, _, pruned = setup
    res = runner.invoke(app, ["report", str(pruned), str(pruned), "--data", str(root / "data"), "--no-speed",
                              "-o", str(root / "bad2")])
    assert res.exit_code == 1 and "must be dense" in res.output


def test_a_batch_beyond_free_memory_is_refused_before_the_work(monkeypatch):
    import ssmtrim.memory as memory

    model = ssmtrim.create_model("vim_test", num_classes=3).eval()
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2**20)
    memory.check_batch_fits(model, (3, 32, 32), 8)  # a few MiB: fits
    words = r"--batch-size 100000: one forward needs about .* use --batch-size \d+ or less"
    with pytest.raises(ConfigError, match=words):
        memory.check_batch_fits(model, (3, 32, 32), 100_000)


def test_the_terminal_table_fits_80_columns_with_whole_cells():
    from ssmtrim.report import fit_columns

    header = ["model", "GFLOPs", "saved", "top-1", "agree", "img/s", "ms@1", "+MB", "speed", "real"]
    rows = [["vim_cifar", "0.0725", "0.0%", "73.00", "100.00", "150.8", "21.2", "0", "1.00x", "1.00"],
            ["merge keep=0.8", "0.0547", "24.5%", "65.00", "72.00", "139.4", "27.2", "0", "0.92x", "0.71"]]
    for width, dropped in ((120, set()), (80, {"+MB", "ms@1"}), (60, {"+MB", "ms@1", "speed", "agree"})):
        h, r = fit_columns(header, rows, width)
        assert set(header) - set(h) == dropped, (width, h)
        assert 1 + sum(3 + max(len(x) for x in col) for col in zip(h, *r, strict=True)) <= width
        assert r[1][0] == "merge keep=0.8" and "top-1" in h and "real" in h


def test_compiled_rows_past_the_recompile_limit(monkeypatch):
    """Many plans of one model timed compiled in one process (a sweep's rows share the engine's forward): each row
    starts from dropped caches, so PyTorch's limit of graphs for one function (here lowered to 2) is never reached."""
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(dynamo_config, "recompile_limit", 2)
    from ssmtrim.pruning import remove_pruning

    model = ssmtrim.create_model("vim_test", depth=2).eval()
    for keep in (0.3, 0.4, 0.5, 0.6):
        apply_pruning(model, PruneConfig(layers=(1,), keep=(keep,), arrangement="merge"))
        speed = measure_speed(model, (3, 32, 32), batch_size=2, warmup=1, iters=1, repeats=1, compiled=True)
        assert speed.images_per_s > 0
        remove_pruning(model)
