"""ssmtrim's kernel cache: a damaged library is built again (never loaded: a truncated shared object crashes the
process with SIGBUS), and an interrupted build leaves nothing behind for long."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ssmtrim.ops import _cpu_kernel

pytestmark = pytest.mark.skipif(_cpu_kernel._compiler() is None, reason="needs a C compiler")
STATUS = "from ssmtrim.ops import _cpu_kernel as k; s = k.status(); print(s.available, s.detail)"


def _run(cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSMTRIM_CACHE": str(cache), "TMPDIR": str(cache)}
    return subprocess.run([sys.executable, "-c", STATUS], env=env, capture_output=True, text=True)


def test_a_truncated_cached_kernel_is_built_again(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0 and first.stdout.startswith("True"), first.stderr
    (library,) = (tmp_path / "kernels").glob("selective_scan_*.so")
    with open(library, "r+b") as f:
        f.truncate(4096)  # what a full disk or a killed copy leaves
    again = _run(tmp_path)
    assert again.returncode == 0 and again.stdout.startswith("True"), (again.returncode, again.stderr)
    assert library.stat().st_size > 4096


def test_what_an_interrupted_build_left_is_removed_once_old(tmp_path):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    stale, young = kernels / "tmpabc123.so", kernels / "ccXYZ.s"
    for path in (stale, young):
        path.write_bytes(b"")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    _cpu_kernel._clean_stale(kernels)
    assert not stale.exists() and young.exists()  # a young one may be a concurrent build's
