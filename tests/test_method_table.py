"""benchmarks/method_table.py's table making: runs made side by side combine into the table one run would give."""

from __future__ import annotations

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def method_table():
    return load_benchmark("method_table")


def run(rows: dict[str, list[float]], **overrides) -> dict:
    """A run's JSON: each row's top-1 at targets 0.7 and 0.5."""
    entries = {label: [{"target": t, "top1": v, "flops_reduction": 1 - t, "gflops": {"paper": t}}
                       for t, v in zip((0.7, 0.5), values, strict=True)] for label, values in rows.items()}
    base = {"model": "examples/m", "num_test": 100, "layers": [3, 6, 9], "rows": entries, "seconds": 1.0,
            "dense": {"top1": 80.0, "gflops": {"paper": 1}}}
    return base | overrides


def test_side_by_side_runs_combine_into_one_table(method_table):
    labels = [label for label, _ in method_table.ROWS.values()]
    whole = run({labels[0]: [60, 50], labels[3]: [70, 60], labels[-1]: [75, 70]})
    a = run({labels[-1]: [75, 70], labels[0]: [60, 50]}, model="/elsewhere/m")
    b = run({labels[3]: [70, 60]})
    combined = method_table.combine([a, b])
    assert list(combined["rows"]) == [labels[0], labels[3], labels[-1]]  # the order of ROWS, not of the runs
    assert method_table.markdown(combined) == method_table.markdown(whole)
    assert combined["seconds"] == 2.0


def test_a_later_run_replaces_entries_at_the_same_target(method_table):
    label = next(iter(method_table.ROWS.values()))[0]
    combined = method_table.combine([run({label: [60, 50]}), run({label: [61, 51]})])
    assert [e["top1"] for e in combined["rows"][label]] == [61, 51]


@pytest.mark.parametrize("change", [{"num_test": 99}, {"layers": [3, 6]}, {"model": "examples/other"},
                                    {"dense": {"top1": 79.0, "gflops": {"paper": 1}}}])
def test_runs_of_other_settings_are_refused(method_table, change):
    label = next(iter(method_table.ROWS.values()))[0]
    with pytest.raises(SystemExit, match="cannot share a table"):
        method_table.combine([run({label: [60, 50]}), run({label: [61, 51]}, **change)])
