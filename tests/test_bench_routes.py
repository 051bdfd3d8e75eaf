"""benchmarks/bench_routes.py end to end on a test model: both paths timed, their logits compared."""

from __future__ import annotations

import json
import sys

from .conftest import load_benchmark


def test_the_script_runs_end_to_end(tmp_path, monkeypatch, capsys):
    bench = load_benchmark("bench_routes")
    out = tmp_path / "routes.json"
    monkeypatch.setattr(sys, "argv", ["bench_routes.py", "--models", "vmamba_test", "--batch", "2", "--repeats", "1",
                                      "--json", str(out)])
    bench.main()
    assert "vmamba_test: batch 2" in capsys.readouterr().out
    row = json.loads(out.read_text())[0]
    assert row["max_rel_difference"] < 1e-5  # the two paths agree (tests/models/test_vmamba_tokens.py in full)
    assert row["speedup_batch"] > 0 and row["speedup_one"] > 0
