"""benchmarks/bench_deploy.py's timing: the ratio of the medians and the paired speed-up (the median over the turns of
each turn's ratio), and the script end to end on a test model."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_deploy")


class Clock:
    """A clock that each timed call advances by its cost times the machine's slowness at that call (the warm-up calls
    cost nothing)."""

    def __init__(self, slowness: dict[str, list[float]]) -> None:
        self.now, self.slowness, self.seen = 0.0, slowness, {name: -1 for name in slowness}

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, cost: float):
        def run(x) -> None:
            turn = self.seen[name]  # -1: the warm-up
            self.seen[name] += 1
            if turn >= 0:
                self.now += cost * self.slowness[name][turn]

        return run


def test_the_paired_speed_up_is_the_median_of_each_turns_ratio(bench, monkeypatch):
    class Batch:
        shape = (4,)

    # a slow spell that reaches the reduced call one turn later than the dense one: turn by turn the reduced call is
    # 2 / 5, 4, 3, 8 / 3 and 5 / 2 times as fast; the medians of each call's rates, taken apart, say 2
    clock = Clock({"dense": [1.0, 2.0, 3.0, 4.0, 5.0], "reduced": [5.0, 1.0, 2.0, 3.0, 4.0]})
    monkeypatch.setattr(bench.time, "thread_time", clock)
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    (dense, reduced), (one, paired) = bench.rates([clock.call("dense", 2.0), clock.call("reduced", 1.0)], Batch(),
                                                  1, 1, 5)
    assert one == 1.0 and paired == pytest.approx(8 / 3)
    assert dense == pytest.approx(4 / 6.0) and reduced == pytest.approx(4 / 3.0) and reduced / dense == pytest.approx(2)
    row = bench.timing(dense, reduced, paired, flops_ratio=1.6)
    assert row["speedup_paired"] == pytest.approx(8 / 3) and row["realised_paired"] == pytest.approx(8 / 3 / 1.6)
    assert row["speedup"] == pytest.approx(2) and row["realised"] == pytest.approx(2 / 1.6)


def test_the_script_still_runs_end_to_end(bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["bench_deploy.py", "--models", "vmamba_test", "--batch", "2", "--iters", "1",
                                      "--repeats", "1", "--layers", "2", "--keep", "0.5", "--json", str(out)])
    bench.main()
    assert "paired" in capsys.readouterr().out
    import json

    row = json.loads(out.read_text())[0]
    assert {"speedup", "realised", "speedup_paired", "realised_paired"} <= set(row["eager_batch"])
