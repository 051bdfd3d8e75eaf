"""benchmarks/bench_batch1.py end to end on a test model: every part timed, with the forward whose steps cost nothing
(each step's captured result handed over) and the realised share."""

from __future__ import annotations

import sys

from .conftest import load_benchmark


def test_the_script_runs_end_to_end(monkeypatch, capsys):
    bench = load_benchmark("bench_batch1")
    monkeypatch.setattr(sys, "argv", ["bench_batch1.py", "--model", "vim_test", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "its steps free" in out and "realised" in out and "fitted:" in out
