"""A command leaves nothing in TMPDIR (torch's compiler cache folder goes to ssmtrim's cache)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_info_leaves_nothing_in_tmpdir(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "SSMTRIM_CACHE": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "ssmtrim", "info", "vim_cifar"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert list(tmp.iterdir()) == []


def test_an_input_size_beyond_memory_is_one_sentence():
    """Refused before anything is allocated (a 100000x100000 position embedding would otherwise be met by the
    system's out-of-memory killer part-way)."""
    from typer.testing import CliRunner

    from ssmtrim.cli.app import app

    result = CliRunner().invoke(app, ["info", "vim_test", "--img-size", "100000"])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "more than this machine's" in line and "--img-size" in line, line
