"""Bad inputs a new user might give, run through the ``ssmtrim`` command line, with a tally of how each was met.

    python benchmarks/bad_inputs.py            # every case (about a minute on 2 CPU cores)
    python benchmarks/bad_inputs.py -k force   # the cases whose name holds "force"

The cases are the list ``CASES`` below, one :class:`Case` each: a name, the command line (``{placeholders}`` are
filled from the workspace: ``{dense_file}`` a dense checkpoint file, ``{dense}`` the same as an ssmtrim folder,
``{pruned}`` a pruned folder, ``{images}`` 2 classes x 4 images, ``{case}`` a fresh folder of the case's own), an
optional ``setup(case_dir)`` that makes the case's files and returns more placeholders, an optional in-process
``fault`` (a context manager: a full disk, a read-only folder...), ``env`` to run it in a subprocess with these
variables instead, and a ``check``.

The default check, :func:`refused`: a non-zero exit, exactly one line on stderr (``ssmtrim: note:`` lines aside)
without "unexpected" or "Traceback", holding the given words, and nothing in the workspace changed or deleted.
:func:`succeeded` is the check of a case that must work (it may write only under ``{case}``). Everything runs on
tiny models made in a temporary folder; no network, no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    """What one run of the command line did."""

    exit_code: int
    stdout: str
    stderr: str
    seconds: float
    changed: list[str]  # workspace paths changed, created or deleted (relative; the case's own folder too unless
    # its check lets the case write there)
    case_dir: Path

    @property
    def lines(self) -> list[str]:
        """stderr lines, notes aside."""
        return [v for v in self.stderr.splitlines() if v.strip() and not v.startswith("ssmtrim: note:")]


Check = Callable[[Outcome], "str | None"]  # None: as expected; else what was wrong


@dataclass
class Case:
    name: str
    argv: list[str]
    check: Check
    setup: Callable[[Path], dict[str, str]] | None = None
    fault: Callable[[], contextlib.AbstractContextManager] | None = None
    env: dict[str, str] | None = None  # run in a subprocess with these variables ("" removes one)


def refused(*words: str, absent: tuple[str, ...] = (), within: float | None = None) -> Check:
    """Non-zero exit, one line on stderr naming ``words`` (and none of ``absent``), nothing changed."""

    def check(o: Outcome) -> str | None:
        if o.exit_code == 0:
            return "exit 0"
        if len(o.lines) != 1:
            return f"{len(o.lines)} lines on stderr"
        line = o.lines[0]
        if "unexpected" in line or "Traceback" in o.stderr + o.stdout:
            return "the catch-all, not a sentence"
        missing = [w for w in words if w not in line]
        if missing:
            return f"does not say {missing}"
        said = [w for w in absent if w in line]
        if said:
            return f"says {said}"
        if o.changed:
            return f"changed {o.changed[:3]}"
        if within is not None and o.seconds > within:
            return f"took {o.seconds:.0f} s"
        return None

    return check


def succeeded(*stderr_words: str, makes: tuple[str, ...] = ()) -> Check:
    """Exit 0, ``stderr_words`` said, the files ``makes`` (relative to the case folder) written, nothing else
    changed."""

    def check(o: Outcome) -> str | None:
        if o.exit_code != 0:
            return f"exit {o.exit_code}: {(o.lines or [''])[-1]}"
        missing = [w for w in stderr_words if w not in o.stderr]
        if missing:
            return f"does not say {missing}"
        absent = [m for m in makes if not (o.case_dir / m).exists()]
        if absent:
            return f"did not write {absent}"
        return f"changed {o.changed[:3]}" if o.changed else None

    check.may_write = True  # type: ignore[attr-defined]  # under the case's own folder
    return check


# ---------------------------------------------------------------------------------------------------------------
# setups and faults


def project_folder(case: Path) -> dict[str, str]:
    """proj/ holding the model, the data and the user's own notes."""
    import shutil

    proj = case / "proj"
    proj.mkdir()
    shutil.copy(WORKSPACE["dense_file"], proj / "model.pth")
    shutil.copytree(WORKSPACE["images"], proj / "data")
    (proj / "notes.txt").write_text("my notes\n")
    return {"proj": str(proj)}


def model_folder(case: Path) -> dict[str, str]:
    """mymodel/: an ssmtrim folder with the user's training log beside it."""
    import shutil

    shutil.copytree(WORKSPACE["dense"], case / "mymodel")
    (case / "mymodel" / "my_training.log").write_text("epoch 1 ...\n")
    return {"mymodel": str(case / "mymodel")}


def users_folder(case: Path) -> dict[str, str]:
    (case / "mine").mkdir()
    (case / "mine" / "thesis.tex").write_text("chapter 1\n")
    return {"mine": str(case / "mine")}


def a_file(case: Path) -> dict[str, str]:
    (case / "results.csv").write_text("a,b\n")
    return {"file": str(case / "results.csv")}


def bad_image_folders(case: Path) -> dict[str, str]:
    for c in ("a", "b"):
        (case / "unreadable" / c).mkdir(parents=True)
        (case / "unreadable" / c / "x.png").write_bytes(b"not a png")
    (case / "empty").mkdir()
    return {"unreadable": str(case / "unreadable"), "empty": str(case / "empty")}


@contextlib.contextmanager
def full_disk_safetensors() -> Iterator[None]:
    """safetensors writes half a file, then the disk is full."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        safetensors.torch.save_file = real


@contextlib.contextmanager
def full_disk_torch_save() -> Iterator[None]:
    """torch.save of the training state writes half a file, then the disk is full."""
    import torch

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp" in str(f):
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


@contextlib.contextmanager
def read_only(name: str) -> Iterator[None]:
    """Nothing can be created in folders called ``name`` (permissions do not stop root, so it is simulated)."""
    real = tempfile.mkdtemp

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == name:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    tempfile.mkdtemp = mkdtemp
    try:
        yield
    finally:
        tempfile.mkdtemp = real


@contextlib.contextmanager
def no_calibration() -> Iterator[None]:
    """The calibration must not start (the case is to be refused before it)."""
    import ssmtrim.pruning.calibrate as calibrate_module

    real = calibrate_module.calibrate

    def calibrate(*args, **kwargs):
        raise AssertionError("the calibration started before the input was checked")

    calibrate_module.calibrate = calibrate
    try:
        yield
    finally:
        calibrate_module.calibrate = real


def locked_folder(case: Path) -> dict[str, str]:
    (case / "locked").mkdir()
    return {"locked": str(case / "locked")}


def named_model(case: Path) -> dict[str, str]:
    """named/: the dense folder recording its class names (a, b); data/: class folders a and kitten."""
    import json
    import shutil

    shutil.copytree(WORKSPACE["dense"], case / "named")
    config = json.loads((case / "named" / "config.json").read_text())
    (case / "named" / "config.json").write_text(json.dumps({**config, "classes": ["a", "b"]}))
    shutil.copytree(WORKSPACE["images"] / "a", case / "data" / "a")
    shutil.copytree(WORKSPACE["images"] / "b", case / "data" / "kitten")
    return {"named": str(case / "named"), "data": str(case / "data")}


def edited_config(section: str | None, field: str, value: object) -> Callable[[Path], dict[str, str]]:
    """edited/: the dense folder with one config.json field replaced."""

    def setup(case: Path) -> dict[str, str]:
        import json
        import shutil

        shutil.copytree(WORKSPACE["dense"], case / "edited")
        config = json.loads((case / "edited" / "config.json").read_text())
        (config[section] if section else config)[field] = value
        (case / "edited" / "config.json").write_text(json.dumps(config))
        return {"edited": str(case / "edited")}

    return setup


def int_weights(case: Path) -> dict[str, str]:
    import torch

    from ssmtrim.checkpoint import load_model

    state = {k: v.to(torch.int32) if v.is_floating_point() else v
             for k, v in load_model(WORKSPACE["dense"]).state_dict().items()}
    torch.save(state, case / "int.pth")
    return {"int": str(case / "int.pth")}


def labels_file(content: bytes) -> Callable[[Path], dict[str, str]]:
    def setup(case: Path) -> dict[str, str]:
        (case / "labels.txt").write_bytes(content)
        return {"labels": str(case / "labels.txt")}

    return setup


PRUNE = ["prune", "{dense_file}", "--data", "{images}", "--layers", "1", "--num-images", "8", "--batch-size", "4",
         "--compensate", "none", "--quiet"]  # no compensation: 8 images would draw its warning about too few
FINETUNE = ["finetune", "{pruned}", "--data", "{images}", "--epochs", "1", "--batch-size", "4", "--quiet"]
NO_CUDA = "cuda:99"  # absent on a CPU machine and on one with fewer than 100 GPUs

# ---------------------------------------------------------------------------------------------------------------
# the cases: one entry each; append new ones here

CASES: list[Case] = [
    # --force never deletes what ssmtrim did not write, nor its inputs
    Case("force-over-project-folder", ["prune", "{proj}/model.pth", "--data", "{proj}/data", "--layers", "1", "-o",
                                       "{proj}", "--force"], refused("contains the source model"), project_folder,
         fault=no_calibration),
    Case("force-over-source-folder", ["prune", "{mymodel}", "--data", "{images}", "--layers", "1", "-o", "{mymodel}",
                                      "--force"], refused("is the source model"), model_folder, fault=no_calibration),
    Case("convert-over-source-folder", ["convert", "{mymodel}", "-o", "{mymodel}", "--force"],
         refused("is the source model"), model_folder),
    Case("force-over-users-folder", [*PRUNE, "-o", "{mine}", "--force"], refused("did not write (thesis.tex)"),
         users_folder, fault=no_calibration),
    Case("output-inside-data", [*PRUNE, "-o", "{images}/pruned"], refused("lies inside the --data folder"),
         fault=no_calibration),
    Case("train-output-inside-data", ["train", "vim_test", "--data", "{images}", "-o", "{images}/a/run"],
         refused("lies inside the --data folder")),
    # the output checked before any long work
    Case("output-empty", [*PRUNE, "-o", ""], refused("empty"), fault=no_calibration),
    Case("finetune-output-empty", [*FINETUNE, "-o", ""], refused("empty")),
    Case("output-is-a-file", [*PRUNE, "-o", "{file}"], refused("is a file", absent=("--force",)), a_file,
         fault=no_calibration),
    Case("output-is-a-file-force", [*PRUNE, "-o", "{file}", "--force"], refused("is a file", absent=("--force",)),
         a_file, fault=no_calibration),
    Case("output-in-proc", [*PRUNE, "-o", "/proc/ssmtrim-nowhere/out"],
         refused("'/proc/ssmtrim-nowhere/out'", absent=(".tmp",)), fault=no_calibration),
    Case("output-read-only", [*PRUNE, "-o", "{locked}/out"], refused("Permission denied", "/locked/out'",
                                                                     absent=(".tmp",)),
         locked_folder, fault=lambda: _both(read_only("locked"), no_calibration())),
    Case("full-disk-prune", [*PRUNE, "-o", "{case}/out"], refused("No space left on device", "/out'",
                                                                  absent=(".tmp",)),
         fault=full_disk_safetensors),
    Case("full-disk-finetune-state", [*FINETUNE, "--checkpoint-every", "1", "-o", "{case}/run"],
         refused("No space left on device", "train_state.pt", absent=(".tmp",)), fault=full_disk_torch_save),
    # runs
    Case("finetune-resume-nothing", [*FINETUNE, "-o", "{case}/run", "--resume"], refused("no training state")),
    Case("train-resume-nothing", ["train", "vim_test", "--data", "{images}", "-o", "{case}/run", "--resume"],
         refused("no training state")),
    Case("finetune-fewer-images-than-a-batch", [*FINETUNE, "--batch-size", "128", "-o", "{case}/run"],
         succeeded("fewer than a batch", makes=("run/model.safetensors",))),
    # devices
    Case("train-device-cuda", ["train", "vim_test", "--data", "{images}", "-o", "{case}/run", "--device", NO_CUDA],
         refused(f"--device '{NO_CUDA}'")),
    Case("finetune-device-cuda", [*FINETUNE, "-o", "{case}/run", "--device", NO_CUDA], refused("--device")),
    Case("eval-device-unknown", ["eval", "{pruned}", "--data", "{images}", "--device", "gpu0"],
         refused("--device 'gpu0'")),
    Case("info-device-unknown", ["info", "{pruned}", "--device", "gpu0"], refused("--device 'gpu0'")),
    Case("report-device-unknown", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{case}/r",
                                   "--device", "gpu0"], refused("--device 'gpu0'")),
    # --eval-data found before the calibration, named as --eval-data
    Case("prune-eval-data-missing", [*PRUNE, "--eval-data", "{case}/missing", "-o", "{case}/out"],
         refused("--eval-data", absent=("--data folder",)), fault=no_calibration),
    Case("prune-eval-data-empty", [*PRUNE, "--eval-data", "{empty}", "-o", "{case}/out"],
         refused("--eval-data", absent=("--data folder",)), bad_image_folders, fault=no_calibration),
    Case("prune-eval-data-unreadable", [*PRUNE, "--eval-data", "{unreadable}", "-o", "{case}/out"],
         refused("--eval-data", absent=("--data folder",)), bad_image_folders, fault=no_calibration),
    # class folders matched to the recorded class names by name, never by sorted position
    Case("eval-unknown-class-folder", ["eval", "{named}", "--data", "{data}", "--workers", "0"],
         refused("'kitten'", "--skip-unknown-classes"), named_model),
    Case("eval-skip-unknown-class-folder", ["eval", "{named}", "--data", "{data}", "--workers", "0",
                                            "--skip-unknown-classes"], succeeded("kitten"), named_model),
    Case("prune-unknown-class-folder", ["prune", "{named}", "--data", "{data}", "--layers", "1", "--quiet"],
         refused("'kitten'"), named_model, fault=no_calibration),
    # config.json fields typed and in range, weights floating point
    Case("config-std-zero", ["info", "{edited}"], refused("data.std", "config.json"),
         edited_config("data", "std", [0.0, 0.2, 0.2])),
    Case("config-mean-length", ["info", "{edited}"], refused("data.mean"), edited_config("data", "mean", [0.5])),
    Case("config-interpolation", ["info", "{edited}"], refused("data.interpolation"),
         edited_config("data", "interpolation", "cubic")),
    Case("config-null-field", ["info", "{edited}"], refused("arch.depth is null"),
         edited_config("arch", "depth", None)),
    Case("config-wrong-type", ["info", "{edited}"], refused("arch.embed_dim"), edited_config("arch", "embed_dim", "8")),
    Case("config-classes-count", ["info", "{edited}"], refused("classes lists 3 names"),
         edited_config(None, "classes", ["a", "b", "c"])),
    Case("int32-weights", ["info", "{int}"], refused("floating point"), int_weights),
    # --labels files
    Case("labels-binary", ["eval", "{dense}", "--data", "{images}", "--labels", "{labels}", "--workers", "0"],
         refused("not UTF-8 text"), labels_file(b"\x00\xff\xfe\x00 binary")),
    Case("labels-negative", ["eval", "{dense}", "--data", "{images}", "--labels", "{labels}", "--workers", "0"],
         refused("line 2", "-1"), labels_file(b"a/0.png 0\na/1.png -1\n")),
    Case("labels-twice-different", ["eval", "{dense}", "--data", "{images}", "--labels", "{labels}", "--workers",
                                    "0"], refused("twice"), labels_file(b"a/0.png 0\na/0.png 1\n")),
    # options honoured or refused
    Case("info-revision-local", ["info", "{dense}", "--revision", "x"], refused("local path")),
    Case("report-two-dense", ["report", "{dense}", "{dense}", "--data", "{images}", "-o", "{case}/r", "--no-speed"],
         refused("is not pruned")),
    # --mode threshold from the command line
    Case("prune-threshold-mode", [*PRUNE, "--mode", "threshold", "-o", "{case}/out"],
         succeeded(makes=("out/model.safetensors",))),
    # no network
    Case("hub-unreachable", ["info", "someone/some-model:weights.pth"],
         refused("cannot reach the Hugging Face Hub", within=45),
         env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{case}/hf", "HF_HUB_OFFLINE": ""}),
]


@contextlib.contextmanager
def _both(a: contextlib.AbstractContextManager, b: contextlib.AbstractContextManager) -> Iterator[None]:
    with a, b:
        yield


# ---------------------------------------------------------------------------------------------------------------
# the workspace and the runner

WORKSPACE: dict[str, Path] = {}


def make_workspace(root: Path) -> dict[str, Path]:
    """Tiny models and images: vim_test (2 blocks, 2 classes) as a checkpoint file, an ssmtrim folder, a pruned
    folder; 2 class folders of 4 images 32x32."""
    import numpy as np
    import torch
    from PIL import Image

    import ssmtrim
    from ssmtrim.pruning import PruneConfig, apply_pruning

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.png")
    torch.manual_seed(0)
    model = ssmtrim.create_model("vim_test", depth=2, num_classes=2)
    torch.save({"model": model.state_dict()}, root / "dense.pth")
    ssmtrim.save_model(model, root / "dense")
    ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,))), root / "pruned")
    (root / "cases").mkdir()
    return {"root": root, "images": root / "images", "dense_file": root / "dense.pth", "dense": root / "dense",
            "pruned": root / "pruned"}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a digest of its content ("dir" for folders)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def run_case(case: Case) -> tuple[str | None, Outcome]:
    case_dir = WORKSPACE["root"] / "cases" / case.name
    case_dir.mkdir()
    values = {k: str(v) for k, v in WORKSPACE.items()} | {"case": str(case_dir)}
    if case.setup is not None:
        values |= case.setup(case_dir)
    argv = [a.format(**values) for a in case.argv]
    before = snapshot(WORKSPACE["root"])
    start = time.perf_counter()
    if case.env is not None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        for k, v in case.env.items():
            if v:
                env[k] = v.format(**values)
            else:
                env.pop(k, None)
        proc = subprocess.run([sys.executable, "-m", "ssmtrim", *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        from typer.testing import CliRunner

        from ssmtrim.cli.app import app

        with contextlib.suppress(ImportError):
            from ssmtrim.notices import reset_notices

            reset_notices()  # each case hears its notes, as a fresh process would
        with case.fault() if case.fault is not None else contextlib.nullcontext():
            result = CliRunner().invoke(app, argv)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    seconds = time.perf_counter() - start
    after = snapshot(WORKSPACE["root"])
    own = os.path.relpath(case_dir, WORKSPACE["root"])
    may_write = getattr(case.check, "may_write", False)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not (may_write and k.startswith(own + os.sep)))
    outcome = Outcome(code, stdout, stderr, seconds, changed, case_dir)
    return case.check(outcome), outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="Run only the cases whose name holds this text.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("SSMTRIM_DEBUG", None)
    cases = [c for c in CASES if args.k in c.name]
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    with tempfile.TemporaryDirectory(prefix="ssmtrim-bad-inputs-") as tmp:
        WORKSPACE.update(make_workspace(Path(tmp)))
        wrong = 0
        width = max(len(c.name) for c in cases)
        for case in cases:
            try:
                problem, outcome = run_case(case)
            except Exception as exc:  # noqa: BLE001 - a case that breaks the runner is a failed case, not the end
                problem, outcome = f"runner: {type(exc).__name__}: {exc}", None
            wrong += problem is not None
            said = (outcome.lines or [""])[-1] if outcome is not None else ""
            took = f"{outcome.seconds:5.1f}s" if outcome is not None else "     "
            print(f"{'ok  ' if problem is None else 'FAIL'} {case.name:<{width}} {took}  "
                  f"{problem + ' | ' if problem else ''}{said[:150]}", flush=True)
    print(f"\n{len(cases) - wrong} of {len(cases)} bad inputs met as expected" + ("" if wrong else ": all clear"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
