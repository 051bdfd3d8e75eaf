"""Output folders: one writer at a time, --force only over a folder of the same kind, files with the usual
permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from ssmtrim.errors import ConfigError
from ssmtrim.outputs import MODEL, REPORT, RUN, check_output, folder_kind, release_output, write_folder_atomic


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ssmtrim.outputs import check_output; "
                               f"check_output({str(out)!r}); print('held', flush=True); time.sleep(30)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "RANK": "0"})
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-c", "from ssmtrim.outputs import check_output; "
                                 f"check_output({str(out)!r})"], capture_output=True, text=True)
        assert second.returncode != 0
        assert f"is being written by another ssmtrim run (process {holder.pid})" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    check_output(out)  # the system released the lock with the process
    release_output(out)


def _write(folder, kind):
    def write(tmp):
        if kind == REPORT:
            (tmp / "report.json").write_text(json.dumps({"ssmtrim_version": "0"}))
        else:
            (tmp / "config.json").write_text(json.dumps({"format": "ssmtrim"}))
            if kind == RUN:
                (tmp / "train_log.jsonl").write_text(json.dumps({"ssmtrim_version": "0", "event": "start"}) + "\n")
    return write_folder_atomic(folder, True, write, kind=kind)


@pytest.mark.parametrize("first", [MODEL, REPORT, RUN])
@pytest.mark.parametrize("second", [MODEL, REPORT, RUN])
def test_force_replaces_only_a_folder_of_the_same_kind(tmp_path, first, second):
    out = tmp_path / "out"
    _write(out, first)
    assert folder_kind(out) == first
    if first == second:
        _write(out, second)
        assert folder_kind(out) == second
    else:
        with pytest.raises(ConfigError, match=f"holds an ssmtrim {first} and this command writes a {second}"):
            _write(out, second)
        assert folder_kind(out) == first  # untouched


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = write_folder_atomic(tmp_path / "m", False, lambda tmp: (tmp / "model.safetensors").write_bytes(b"x")
                                  or os.chmod(tmp / "model.safetensors", 0o600))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644


def test_a_file_size_limit_while_the_weights_are_written_is_one_sentence(tmp_path):
    """safetensors raises its own error ("File too large (os error 27)"; a full disk: os error 28), not an OSError:
    it reads like every other full disk, exit code 1, and nothing is left behind."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from ssmtrim.cli.app import main; sys.argv = ['ssmtrim', 'convert', 'vim_cifar', '-o', "
            f"{str(tmp_path / 'out')!r}]; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unexpected" not in lines[0], lines
    assert "file-size limit (ulimit -f)" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder


def test_an_output_inside_an_input_names_the_input_once(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError) as err:
        check_output(tmp_path / "m" / "r", inputs={f"the model {str(tmp_path / 'm')!r}": tmp_path / "m"})
    assert str(err.value).count(str(tmp_path / "m") + "'") == 1, str(err.value)
