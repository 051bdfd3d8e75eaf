"""The GPU check's dry run: every section's plumbing on the CPU, with tiny models and steps."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert list(sections) == ["cuda_tests", "scan", "throughput", "compile", "finetune"]
    assert sections["compile"]["max_rel_diff"] <= 1e-4 and sections["compile"]["speedup"] > 0
    assert all(s["ok"] is True for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert sections["cuda_tests"]["files"] and sum(sections["cuda_tests"]["counts"].values()) > 0
    scan = sections["scan"]
    assert scan["backends"][:2] == ["ref", "portable"] and all(e["passed"] for e in scan["errors"].values())
    assert all(t["forward_ms"] > 0 for t in scan["times"].values())
    for row in sections["throughput"]["models"]:
        dense, pruned = row["dense"], row["pruned"]
        assert pruned["gflops"]["full"] < dense["gflops"]["full"] and dense["images_per_s"] > 0
        assert row["realised"] == pytest.approx(pruned["images_per_s"] / dense["images_per_s"]
                                                / (dense["gflops"]["full"] / pruned["gflops"]["full"]))
    tuned = sections["finetune"]["finetune"]
    assert tuned["steps"] == 2 and tuned["top1_after"] is not None
    summary = proc.stdout[proc.stdout.rindex("\nsection "):]
    for name in sections:
        assert re.search(rf"^{name} +ok ", summary, re.M), summary


def test_without_a_gpu_it_asks_for_the_dry_run(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
