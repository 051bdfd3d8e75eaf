"""benchmarks/onnx_profile.py: onnxruntime's profile of an exported file summed by the line of ssmtrim's code that
made each node, end to end on a test model."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_benchmark

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx")


def test_the_profile_sums_nodes_by_their_line_dense_and_reduced(monkeypatch, capsys, tmp_path):
    bench = load_benchmark("onnx_profile")
    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["onnx_profile.py", "--model", "vim_test", "--runs", "2", "--repeats", "1",
                                      "--json", str(out)])
    bench.main()
    text = capsys.readouterr().out
    assert "ssmtrim/models/vim.py:" in text  # nodes traced to a Vim module's forward
    assert "ssmtrim/pruning/engine.py:" in text  # the reduced forward's own nodes (its steps) to the engine's
    assert "reduced" in text and "x as fast" in text
    import json

    profile = json.loads(out.read_text())["profile"]
    # the blocks' lines in both files; the engine's only in the reduced one (the dense model runs its own forward)
    assert set(profile["dense"]) & set(profile["reduced"]) - {bench.NO_LINE}
    assert not any("engine.py" in line for line in profile["dense"])
    assert any("engine.py" in line for line in profile["reduced"])
    assert all(us >= 0 and count > 0 for us, count in profile["dense"].values())
