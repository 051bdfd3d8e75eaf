"""Usage errors (a wrong value type, an unknown option or command, a missing argument) reach the user as one line on
stderr and exit code 2, through the real entry point rather than typer's multi-line box."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssmtrim", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, names",
    [
        (("prune", "--flops", "abc"), "--flops"),
        (("prune", "--nope"), "--nope"),
        (("bogus",), "bogus"),
        (("eval",), "model"),
        (("flops", "vim_test", "--convention", "bogus"), "--convention"),
    ],
)
def test_usage_error_is_one_line(argv, names):
    res = _run(*argv)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("ssmtrim: ") and names in lines[0], res.stderr
    assert "--help" in lines[0] and "Traceback" not in res.stderr and res.stdout == ""


def test_help_and_no_arguments_still_show_the_help():
    assert _run("--help").returncode == 0 and "Usage" in _run("--help").stdout
    res = _run()
    assert "Usage" in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_help_lists_flags_without_a_value_type():
    res = _run("eval", "--help")
    assert res.returncode == 0
    flags = [line for line in res.stdout.splitlines() if "--json" in line or "--quiet" in line]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags), flags
    assert "<int>" in res.stdout  # options that take a value still say its type
