"""Bad inputs a new user might give, run through the ``ssmtrim`` command line, with a tally of how each was met.

    python benchmarks/bad_inputs.py            # every case (about a minute and a half on 2 CPU cores)
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
CIFAR_CALIB = str(REPO / "examples" / "cifar10" / "calib")  # the bundled calibration images (CIFAR-10 classes)


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


def succeeded(*stderr_words: str, makes: tuple[str, ...] = (), shows: tuple[str, ...] = (),
              clean: bool = False) -> Check:
    """Exit 0, ``stderr_words`` said, ``shows`` printed on stdout, the files ``makes`` (relative to the case folder)
    written, nothing else changed; ``clean``: nothing but ``ssmtrim: note:`` lines on stderr (a ``--quiet`` run: no
    raw warning from a library)."""

    def check(o: Outcome) -> str | None:
        if o.exit_code != 0:
            return f"exit {o.exit_code}: {(o.lines or [''])[-1]}"
        missing = [w for w in stderr_words if w not in o.stderr] + [w for w in shows if w not in o.stdout]
        if missing:
            return f"does not say {missing}"
        if clean and o.lines:
            return f"stderr holds {o.lines[0][:80]!r}"
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
def safetensors_fails(error: Exception) -> Iterator[None]:
    """safetensors writes half a file, then raises ``error``."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise error

    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        safetensors.torch.save_file = real


def full_disk_safetensors() -> contextlib.AbstractContextManager:
    """safetensors writes half a file, then the disk is full."""
    return safetensors_fails(OSError(errno.ENOSPC, "No space left on device"))


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


def writer_error(message: str) -> contextlib.AbstractContextManager:
    """safetensors fails with its own error type (not an OSError) after writing part of the file."""
    from safetensors import SafetensorError

    return safetensors_fails(SafetensorError(message))


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """``ulimit -f``: the file-size limit of this process and its children (DataLoader workers), SIGXFSZ ignored."""
    import resource
    import signal

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def dangling_link(case: Path) -> dict[str, str]:
    """A dangling link, outside the workspace (whose snapshot reads every entry)."""
    outside = Path(tempfile.mkdtemp(prefix="ssmtrim-bad-inputs-link-"))
    (outside / "link").symlink_to(outside / "gone")
    return {"link": str(outside / "link")}


def a_report(case: Path) -> dict[str, str]:
    """r/: a report folder ssmtrim wrote."""
    import json

    (case / "r").mkdir()
    (case / "r" / "report.json").write_text(json.dumps({"ssmtrim_version": "0.1.0", "rows": []}))
    (case / "r" / "report.md").write_text("# report\n")
    return {"r": str(case / "r")}


def plainmamba_file(case: Path) -> dict[str, str]:
    """pm.pth: a dense PlainMamba of the same input size as the workspace's Vim."""
    import torch

    import ssmtrim

    model = ssmtrim.create_model("plainmamba_test", img_size=32, num_classes=2)  # the workspace's images and classes
    torch.save(model.state_dict(), case / "pm.pth")
    return {"pm": str(case / "pm.pth")}


def threshold_folder(case: Path) -> dict[str, str]:
    """thr/: a reduced folder whose plan is in threshold mode."""
    import ssmtrim
    from ssmtrim.pruning import PruneConfig, apply_pruning

    model = ssmtrim.load_model(WORKSPACE["dense"])
    ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,), mode="threshold",
                                                        thresholds=(0.0,))), case / "thr")
    return {"thr": str(case / "thr")}


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
    Case("report-sweep-quartermap-on-vim", ["report", "{dense}", "--data", "{images}", "--sweep", "keep=0.25",
                                            "--arrangements", "quartermap", "--no-speed", "-o", "{case}/r"],
         refused("strided part of the grid")),
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

# ---------------------------------------------------------------------------------------------------------------
# held-out cases: the same families, other inputs (setups and faults first, then the cases)


def images_in(folder: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 2, mode: str = "RGB",
              size: tuple[int, int] = (32, 32), ext: str = "png") -> Path:
    """``folder``/<class>/<i>.<ext>: ``n`` random images per class of a PIL ``mode`` and ``size`` (width, height)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
            img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
            (img.convert("P") if mode == "P" else img).save(folder / c / f"{i}.{ext}")
    return folder


def data_of(**kwargs: object) -> Callable[[Path], dict[str, str]]:
    """{d}: a folder of class sub-folders made by :func:`images_in` with ``kwargs``."""
    return lambda case: {"d": str(images_in(case / "d", **kwargs))}  # type: ignore[arg-type]


def data_with(extra: Callable[[Path], None]) -> Callable[[Path], dict[str, str]]:
    """{d}: 2 classes x 2 images, then ``extra(d)`` adds something odd."""

    def setup(case: Path) -> dict[str, str]:
        extra(images_in(case / "d"))
        return {"d": str(case / "d")}

    return setup


def corrupt_jpeg(d: Path) -> None:
    images_in(d, classes=("a",), n=1, ext="jpg")
    data = (d / "a" / "0.jpg").read_bytes()
    (d / "a" / "0.jpg").write_bytes(data[: len(data) // 3])


def zero_byte_image(d: Path) -> None:
    (d / "a" / "zero.png").write_bytes(b"")


def hidden_files(d: Path) -> None:
    (d / "a" / ".DS_Store").write_bytes(b"\0\1junk")
    (d / ".git").mkdir()
    (d / ".git" / "x.png").write_bytes(b"junk")


def text_beside(d: Path) -> None:
    (d / "a" / "README.txt").write_text("notes")


def nested_folder(d: Path) -> None:
    (d / "a" / "sub").mkdir()
    (d / "a" / "sub" / "n.png").write_bytes((d / "a" / "0.png").read_bytes())


def flat_folder(case: Path) -> dict[str, str]:
    images_in(case / "tmp", classes=("a",), n=3)
    (case / "tmp" / "a").rename(case / "flat")
    return {"d": str(case / "flat")}


def only_text(case: Path) -> dict[str, str]:
    for c in ("a", "b"):
        (case / "d" / c).mkdir(parents=True)
        (case / "d" / c / "x.txt").write_text("hi")
    return {"d": str(case / "d")}


def empty_class_folder(case: Path) -> dict[str, str]:
    (images_in(case / "d", classes=("a",)) / "b").mkdir()
    return {"d": str(case / "d")}


def empty_folder(case: Path) -> dict[str, str]:
    (case / "e").mkdir()
    return {"d": str(case / "e")}


def huge_images(case: Path) -> dict[str, str]:
    """Two 9600 x 9600 images: past Pillow's decompression-bomb warning, below its refusal."""
    from PIL import Image

    for c in ("a", "b"):
        (case / "d" / c).mkdir(parents=True)
        Image.new("L", (9600, 9600)).save(case / "d" / c / "big.png")
    return {"d": str(case / "d")}


def named_one_class(case: Path) -> dict[str, str]:
    """named/: the dense folder recording classes a, b; d/: only class folder b."""
    import json
    import shutil

    shutil.copytree(WORKSPACE["dense"], case / "named")
    config = json.loads((case / "named" / "config.json").read_text())
    (case / "named" / "config.json").write_text(json.dumps({**config, "classes": ["a", "b"]}))
    return {"named": str(case / "named"), "d": str(images_in(case / "d", classes=("b",)))}


def unicode_folder(case: Path) -> dict[str, str]:
    import shutil

    shutil.copytree(WORKSPACE["images"], case / "dätä mit leer zeichen")
    return {"d": str(case / "dätä mit leer zeichen")}


def spaced_names(case: Path) -> dict[str, str]:
    images_in(case / "d", classes=("a",))
    (case / "d" / "a" / "0.png").rename(case / "d" / "a" / "my photo.png")
    (case / "labels.txt").write_text("a/my photo.png 1\na/1.png 0\n")
    return {"d": str(case / "d"), "labels": str(case / "labels.txt")}


def symlink_to_data(case: Path) -> dict[str, str]:
    os.symlink(WORKSPACE["images"], case / "link")
    return {"link": str(case / "link")}


def symlink_to_users_folder(case: Path) -> dict[str, str]:
    users_folder(case)
    os.symlink(case / "mine", case / "link")
    return {"link": str(case / "link")}


def model_below(case: Path) -> dict[str, str]:
    """proj/sub/m: an ssmtrim folder two levels below proj/."""
    import shutil

    shutil.copytree(WORKSPACE["dense"], case / "proj" / "sub" / "m")
    return {"proj": str(case / "proj"), "m": str(case / "proj" / "sub" / "m")}


def copy_of(name: str, as_: str = "m") -> Callable[[Path], dict[str, str]]:
    def setup(case: Path) -> dict[str, str]:
        import shutil

        shutil.copytree(WORKSPACE[name], case / as_)
        return {as_: str(case / as_)}

    return setup


def ten_classes_and_dense(case: Path) -> dict[str, str]:
    return {**copy_of("dense")(case), **data_of(classes=tuple("abcdefghij"), n=1)(case)}


def finished_run(case: Path) -> dict[str, str]:
    """run/: a finished fine-tuning run, ssmtrim's own."""
    from typer.testing import CliRunner

    from ssmtrim.cli.app import app

    argv = [a.format(pruned=WORKSPACE["pruned"], images=WORKSPACE["images"]) for a in FINETUNE]
    result = CliRunner().invoke(app, [*argv, "-o", str(case / "run")])
    assert result.exit_code == 0, result.output
    return {"run": str(case / "run")}


def run_edited(edit: Callable[[Path], object]) -> Callable[[Path], dict[str, str]]:
    """run/: a finished fine-tuning run, then ``edit(run)``."""

    def setup(case: Path) -> dict[str, str]:
        values = finished_run(case)
        edit(Path(values["run"]))
        return values

    return setup


def folder_file(name: str, content: bytes | str) -> Callable[[Path], dict[str, str]]:
    """m/: the dense folder with ``name`` replaced by ``content``."""

    def setup(case: Path) -> dict[str, str]:
        values = copy_of("dense")(case)
        path = case / "m" / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return values

    return setup


def truncated_weights(case: Path) -> dict[str, str]:
    values = copy_of("dense")(case)
    path = case / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return values


def no_weights(case: Path) -> dict[str, str]:
    values = copy_of("dense")(case)
    (case / "m" / "model.safetensors").unlink()
    return values


def pruned_config(section: str | None, field: str, value: object) -> Callable[[Path], dict[str, str]]:
    """m/: the pruned folder with one config.json field replaced."""

    def setup(case: Path) -> dict[str, str]:
        import json

        values = copy_of("pruned")(case)
        config = json.loads((case / "m" / "config.json").read_text())
        (config[section] if section else config)[field] = value
        (case / "m" / "config.json").write_text(json.dumps(config))
        return values

    return setup


def a_file_of(name: str, content: bytes) -> Callable[[Path], dict[str, str]]:
    def setup(case: Path) -> dict[str, str]:
        (case / name).write_bytes(content)
        return {"f": str(case / name)}

    return setup


def saved(name: str, make: Callable[[], object]) -> Callable[[Path], dict[str, str]]:
    """{f}: ``make()`` written with torch.save."""

    def setup(case: Path) -> dict[str, str]:
        import torch

        torch.save(make(), case / name)
        return {"f": str(case / name)}

    return setup


def edited_state(edit: Callable[[dict], None]) -> Callable[[Path], dict[str, str]]:
    """{f}: the official-layout dense checkpoint with its state dict edited."""

    def setup(case: Path) -> dict[str, str]:
        import torch

        state = torch.load(WORKSPACE["dense_file"])["model"]
        edit(state)
        torch.save({"model": state}, case / "m.pth")
        return {"f": str(case / "m.pth")}

    return setup


def _head(state: dict, suffix: str = "weight") -> str:
    return next(k for k in state if k.startswith("head") and k.endswith(suffix))


def _drop_head_weight(state: dict) -> None:
    del state[_head(state)]


def _extra_key(state: dict) -> None:
    import torch

    state["bogus.weight"] = torch.zeros(2)


def _five_classes(state: dict) -> None:
    import torch

    weight = _head(state)
    state[weight] = torch.zeros(5, state[weight].shape[1])
    state[_head(state, "bias")] = torch.zeros(5)


def _nan_head(state: dict) -> None:
    weight = _head(state)
    state[weight] = state[weight].clone().fill_(float("nan"))


def _whole_model() -> object:
    import ssmtrim

    return ssmtrim.create_model("vim_test", depth=2, num_classes=2)


def pruned_three_classes(case: Path) -> dict[str, str]:
    import ssmtrim
    from ssmtrim.pruning import PruneConfig, apply_pruning

    model = ssmtrim.create_model("vim_test", depth=2, num_classes=3)
    ssmtrim.save_model(apply_pruning(model, PruneConfig(layers=(1,), keep=(0.5,))), case / "p3")
    return {"p3": str(case / "p3")}


@contextlib.contextmanager
def no_fvcore() -> Iterator[None]:
    """fvcore is not installed."""
    saved_modules = {k: v for k, v in sys.modules.items() if k == "fvcore" or k.startswith("fvcore.")}
    sys.modules.update({k: None for k in (*saved_modules, "fvcore", "fvcore.nn")})  # type: ignore[dict-item]
    try:
        yield
    finally:
        for k in (*saved_modules, "fvcore", "fvcore.nn"):
            sys.modules.pop(k, None)
        sys.modules.update(saved_modules)


@contextlib.contextmanager
def ctrl_c_in(module: str, attr: str) -> Iterator[None]:
    """Ctrl-C when ``module.attr`` is called."""
    import importlib

    mod = importlib.import_module(module)
    real = getattr(mod, attr)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    setattr(mod, attr, interrupted)
    try:
        yield
    finally:
        setattr(mod, attr, real)


@contextlib.contextmanager
def ctrl_c_while_saving() -> Iterator[None]:
    """Ctrl-C halfway through writing the weights."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    safetensors.torch.save_file = save_file
    try:
        yield
    finally:
        safetensors.torch.save_file = real


@contextlib.contextmanager
def ctrl_c_at_step(n: int = 2) -> Iterator[None]:
    """Ctrl-C at the ``n``-th optimiser step."""
    import torch

    real = torch.optim.AdamW.step
    calls = [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= n:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield
    finally:
        torch.optim.AdamW.step = real


@contextlib.contextmanager
def undeletable(name: str) -> Iterator[None]:
    """Files called ``name`` cannot be deleted (an immutable file; permissions do not stop root)."""
    real = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    os.unlink = unlink
    try:
        yield
    finally:
        os.unlink = real


EVAL = ["eval", "{dense}", "--workers", "0", "--quiet"]
TRAIN = ["train", "vim_test", "--data", "{images}", "--epochs", "1", "--batch-size", "4", "--quiet"]
OUT = ["-o", "{case}/o"]
P1 = [*PRUNE, *OUT]  # PRUNE at layer 1, written to {case}/o
PN = [*PRUNE[:PRUNE.index("--layers")], *PRUNE[PRUNE.index("--layers") + 2:], *OUT]  # without --layers
HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HOME": "{case}/hf"}

CASES += [
    # paths
    Case("prune-source-missing", ["prune", "{case}/nope.pth", *PRUNE[2:], *OUT], refused("nope.pth")),
    Case("eval-data-is-a-file", [*EVAL, "--data", "{dense_file}"], refused("--data")),
    Case("prune-data-missing", ["prune", "{dense_file}", "--data", "{case}/nothing", "--layers", "1", *OUT],
         refused("--data")),
    Case("eval-unicode-spaces-data", [*EVAL, "--data", "{d}"], succeeded(clean=True), unicode_folder),
    Case("prune-output-dotdot", [*PRUNE, "-o", "{case}/x/../out"], succeeded(makes=("out/model.safetensors",),
                                                                              clean=True)),
    Case("output-inside-data-via-symlink", [*PRUNE, "--data", "{link}", "-o", "{link}/pruned"],
         refused("inside the --data"), symlink_to_data, fault=no_calibration),
    Case("output-inside-data-symlink-other-way", [*PRUNE, "-o", "{link}/pruned"], refused("inside the --data"),
         symlink_to_data, fault=no_calibration),
    Case("force-through-symlink-to-users-folder", [*PRUNE, "-o", "{link}", "--force"], refused("symbolic link"),
         symlink_to_users_folder, fault=no_calibration),
    Case("force-over-data-via-dotdot", [*PRUNE, "-o", "{images}/a/..", "--force"], refused("is the --data folder"),
         fault=no_calibration),
    Case("output-under-a-file", [*PRUNE, "-o", "{dense_file}/out"], refused("dense.pth"), fault=no_calibration),
    Case("output-exists-no-force", [*PRUNE, "-o", "{m}"], refused("--force"), copy_of("pruned"),
         fault=no_calibration),
    Case("prune-over-own-output", [*PRUNE, "-o", "{m}", "--force"], succeeded(makes=("m/model.safetensors",),
                                                                               clean=True), copy_of("pruned")),
    Case("convert-over-parent-of-model", ["convert", "{m}", "-o", "{proj}", "--force"], refused("source model"),
         model_below),
    Case("prune-over-parent-of-model", ["prune", "{m}", *PRUNE[2:], "-o", "{proj}", "--force"],
         refused("source model"), model_below, fault=no_calibration),
    Case("convert-output-inside-source-folder", ["convert", "{m}", "-o", "{m}/converted"], refused("source model"),
         copy_of("dense")),
    Case("report-output-is-a-file", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{dense_file}",
                                     "--no-speed"], refused("is a file")),
    Case("report-output-is-source", ["report", "{m}", "{pruned}", "--data", "{images}", "-o", "{m}", "--force",
                                     "--no-speed"], refused("source"), copy_of("dense")),
    Case("report-output-inside-data", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{images}/r",
                                       "--no-speed"], refused("--data")),
    Case("finetune-output-is-source", ["finetune", "{m}", *FINETUNE[2:], "-o", "{m}", "--force"], refused("source"),
         copy_of("pruned")),
    Case("train-output-is-data", [*TRAIN, "-o", "{images}", "--force"], refused("--data")),
    Case("train-output-is-init-folder", [*TRAIN, "--data", "{d}", "--init", "{m}", "-o", "{m}", "--force"],
         refused("--init"), ten_classes_and_dense),
    Case("eval-model-is-empty-folder", ["eval", "{d}", "--data", "{images}"], refused("config.json"), empty_folder),
    Case("prune-source-is-image-folder", ["prune", "{images}", "--data", "{images}", "--layers", "1", *OUT],
         refused("config.json"), fault=no_calibration),
    Case("info-empty-model", ["info", ""], refused("the model is empty")),
    Case("info-blank-model", ["info", "  "], refused("the model is empty")),
    Case("flops-missing-file", ["flops", "{case}/none.pth"], refused("none.pth")),
    # data folders
    Case("eval-data-empty", [*EVAL, "--data", "{d}"], refused("holds no images"), empty_folder),
    Case("prune-data-empty", [*P1, "--data", "{d}"], refused("holds no images"), empty_folder, fault=no_calibration),
    Case("data-is-model-folder", [*P1, "--data", "{dense}"], refused("holds no images"), fault=no_calibration),
    Case("eval-one-class", [*EVAL, "--data", "{d}"], refused("--labels"), data_of(classes=("a",), n=4)),
    Case("eval-one-class-named", ["eval", "{named}", "--data", "{d}", "--workers", "0", "--quiet"],
         succeeded(clean=True), named_one_class),
    Case("prune-one-class", [*P1, "--data", "{d}"], succeeded(makes=("o/model.safetensors",), clean=True),
         data_of(classes=("a",), n=4)),
    Case("finetune-one-class", [*FINETUNE, "--data", "{d}", "-o", "{case}/run"], refused("classes"),
         data_of(classes=("a",), n=4)),
    Case("eval-empty-class-folder", [*EVAL, "--data", "{d}"], refused("class folders"), empty_class_folder),
    Case("eval-nested-folders", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_with(nested_folder)),
    Case("eval-only-text-files", [*EVAL, "--data", "{d}"], refused("holds no images"), only_text),
    Case("eval-text-beside-images", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_with(text_beside)),
    Case("eval-hidden-files", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_with(hidden_files)),
    Case("eval-corrupt-jpeg", [*EVAL, "--data", "{d}"], succeeded(shows=("1 unreadable",), clean=True),
         data_with(corrupt_jpeg)),
    Case("eval-zero-byte-image", [*EVAL, "--data", "{d}"], succeeded(shows=("1 unreadable",), clean=True),
         data_with(zero_byte_image)),
    Case("prune-zero-byte-image", [*P1, "--data", "{d}"], succeeded(shows=("1 unreadable",),
                                                                  makes=("o/model.safetensors",), clean=True),
         data_with(zero_byte_image)),
    Case("eval-huge-images", [*EVAL, "--data", "{d}"], succeeded("very large image", clean=True), huge_images),
    Case("eval-wide-images", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_of(size=(3000, 200), n=1)),
    Case("eval-1px-images", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_of(size=(1, 1))),
    Case("eval-grayscale", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_of(mode="L")),
    Case("eval-rgba", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_of(mode="RGBA")),
    Case("eval-palette", [*EVAL, "--data", "{d}"], succeeded(clean=True), data_of(mode="P")),
    Case("eval-uppercase-ext-unicode-class", [*EVAL, "--data", "{d}"], succeeded(clean=True),
         data_of(classes=("ä", "b c"), ext="PNG")),
    Case("eval-more-classes-than-model", [*EVAL, "--data", "{d}"], refused("3 class folders"),
         data_of(classes=("a", "b", "c"))),
    Case("eval-flat-folder", [*EVAL, "--data", "{d}"], succeeded("not measured", clean=True), flat_folder),
    Case("finetune-eval-data-missing", [*FINETUNE, "--eval-data", "{case}/none", "-o", "{case}/run"],
         refused("--eval-data")),
    Case("labels-out-of-range", [*EVAL, "--data", "{images}", "--labels", "{labels}"], refused("label 5"),
         labels_file(b"a/0.png 5\n")),
    Case("labels-unknown-file", [*EVAL, "--data", "{images}", "--labels", "{labels}"],
         refused("not in the labels file"), labels_file(b"nope.png 0\n")),
    Case("labels-empty-file", [*EVAL, "--data", "{images}", "--labels", "{labels}"], refused("labels"),
         labels_file(b"")),
    Case("labels-not-integer", [*EVAL, "--data", "{images}", "--labels", "{labels}"], refused("line 1"),
         labels_file(b"a/0.png cat\n")),
    Case("labels-missing", [*EVAL, "--data", "{images}", "--labels", "{case}/none.txt"], refused("none.txt")),
    Case("labels-is-a-folder", [*EVAL, "--data", "{images}", "--labels", "{images}"], refused("labels file")),
    Case("labels-crlf-bom", [*EVAL, "--data", "{images}", "--labels", "{labels}"], succeeded(clean=True),
         labels_file(("\ufeff" + "".join(f"{c}/{i}.png {int(c == 'b')}\r\n" for c in "ab" for i in range(4)))
                     .encode())),
    Case("labels-comments-blank-lines", [*EVAL, "--data", "{images}", "--labels", "{labels}"], succeeded(clean=True),
         labels_file(("# file label\n\n" + "".join(f"{c}/{i}.png {int(c == 'b')}\n\n" for c in "ab"
                                                    for i in range(4))).encode())),
    Case("labels-name-with-space", [*EVAL, "--data", "{d}", "--labels", "{labels}"], succeeded(clean=True),
         spaced_names),
    # option values
    *[Case(f"flops-{name}", [*PN, "--flops", value], refused("--flops"), fault=no_calibration)
      for name, value in (("zero", "0"), ("negative", "-0.5"), ("nan", "nan"), ("inf", "inf"), ("above-one", "1.5"))],
    *[Case(f"keep-{name}", [*P1, "--keep", value], refused("--keep"), fault=no_calibration)
      for name, value in (("zero", "0"), ("nan", "nan"), ("negative", "-1"), ("text", "half"),
                          ("too-many", "0.5,0.6"))],
    *[Case(f"layers-{name}", [*PN, "--layers", value], refused("--layers"), fault=no_calibration)
      for name, value in (("zero", "0"), ("out-of-range", "9"), ("last-block", "2"), ("unsorted", "2,1"),
                          ("duplicated", "1,1"), ("empty", ""), ("text", "one"))],
    Case("flops-with-keep", [*PN, "--flops", "0.8", "--keep", "0.5"], refused("--flops", "--keep"),
         fault=no_calibration),
    Case("flops-with-layers", [*P1, "--flops", "0.9"], succeeded(makes=("o/model.safetensors",), clean=True)),
    Case("flops-convention-unknown", [*PN, "--flops", "0.8", "--flops-convention", "bogus"],
         refused("--flops-convention"), fault=no_calibration),
    *[Case(f"{flag}-unknown", [*P1, f"--{flag}", "bogus"], refused(f"--{flag}"), fault=no_calibration)
      for flag in ("score", "arrangement", "metric", "gap", "mode", "compensate")],
    Case("compensate-alpha-nan", [*P1, "--compensate", "head", "--compensate-alpha", "nan"],
         refused("--compensate-alpha"), fault=no_calibration),
    Case("compensate-one-image", [*P1, "--compensate", "head", "--num-images", "1"], refused("--compensate head"),
         fault=no_calibration),
    Case("compensate-few-images", [*P1, "--compensate", "head"],
         succeeded("note: --compensate head", makes=("o/model.safetensors",), clean=True)),
    Case("drop-fraction-nan", [*P1, "--drop-fraction", "nan"], refused("--drop-fraction"), fault=no_calibration),
    Case("prune-batch-zero", [*P1, "--batch-size", "0"], refused("--batch-size"), fault=no_calibration),
    Case("prune-num-images-negative", [*P1, "--num-images", "-5"], refused("--num-images"), fault=no_calibration),
    Case("prune-arch-unknown", [*P1, "--arch", "nope"], refused("'nope'"), fault=no_calibration),
    Case("eval-batch-negative", [*EVAL, "--data", "{images}", "--batch-size", "-1"], refused("--batch-size")),
    Case("eval-batch-huge", [*EVAL, "--data", "{images}", "--batch-size", "100000"], succeeded(clean=True)),
    Case("eval-num-images-zero", [*EVAL, "--data", "{images}", "--num-images", "0"], refused("--num-images")),
    Case("eval-num-images-more-than-there-are", [*EVAL, "--data", "{images}", "--num-images", "100"],
         succeeded(clean=True)),
    Case("eval-workers-negative", [*EVAL, "--data", "{images}", "--workers", "-1"], refused("--workers")),
    Case("eval-seed-negative", [*EVAL, "--data", "{images}", "--num-images", "2", "--seed", "-1"],
         succeeded(clean=True)),
    Case("eval-backend-unknown", [*EVAL, "--data", "{images}", "--backend", "bogus"], refused("--backend 'bogus'")),
    Case("info-backend-unknown", ["info", "{dense}", "--backend", "bogus"], refused("--backend 'bogus'")),
    Case("scan-backend-env-unknown", ["info", "{dense}"], refused("SSMTRIM_SCAN_BACKEND"),
         env={"SSMTRIM_SCAN_BACKEND": "bogus"}),
    Case("img-size-zero", ["info", "{dense}", "--img-size", "0"], refused("--img-size 0")),
    Case("img-size-not-patch-multiple", ["info", "{dense}", "--img-size", "33"], refused("--img-size 33")),
    Case("img-size-garbage", ["info", "{dense}", "--img-size", "32,abc"], refused("--img-size")),
    Case("flops-img-size-zero", ["flops", "vim_test", "--img-size", "0"], refused("--img-size")),
    Case("report-repeats-zero", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{case}/r",
                                 "--repeats", "0"], refused("--repeats")),
    Case("report-sweep-garbage", ["report", "{dense}", "--data", "{images}", "-o", "{case}/r", "--sweep", "abc",
                                  "--no-speed"], refused("--sweep")),
    Case("report-sweep-nan", ["report", "{dense}", "--data", "{images}", "-o", "{case}/r", "--sweep", "keep=nan",
                              "--no-speed"], refused("--sweep")),
    *[Case(f"finetune-{flag}-{name}", [*FINETUNE, f"--{flag}", value, "-o", "{case}/run"], refused(f"--{flag}"))
      for flag, name, value in (("epochs", "zero", "0"), ("epochs", "negative", "-1"), ("lr", "nan", "nan"),
                                ("lr", "negative", "-0.1"), ("lr", "inf", "inf"), ("weight-decay", "nan", "nan"),
                                ("label-smoothing", "above-one", "1.5"), ("warmup-epochs", "nan", "nan"),
                                ("distill-temperature", "zero", "0"), ("distill-weight", "negative", "-1"),
                                ("checkpoint-every", "negative", "-2"), ("clip-grad", "negative", "-1"))],
    Case("train-batch-zero", [*TRAIN, "--batch-size", "0", "-o", "{case}/run"], refused("--batch-size")),
    Case("train-augment-unknown", [*TRAIN, "--augment", "mixup", "-o", "{case}/run"], refused("--augment")),
    Case("train-unknown-arch", ["train", "resnet50", "--data", "{images}", "-o", "{case}/run"], refused("resnet50")),
    Case("train-init-missing", [*TRAIN, "--data", "{d}", "--init", "{case}/none.pth", "-o", "{case}/run"],
         refused("none.pth"), data_of(classes=tuple("abcdefghij"), n=1)),
    Case("finetune-teacher-missing", [*FINETUNE, "--teacher", "{case}/none.pth", "-o", "{case}/run"],
         refused("none.pth")),
    Case("finetune-teacher-pruned", [*FINETUNE, "--teacher", "{pruned}", "-o", "{case}/run"], refused("--teacher")),
    Case("finetune-teacher-other-classes", [*FINETUNE, "--teacher", "{f}", "-o", "{case}/run"], refused("classes"),
         edited_state(_five_classes)),
    Case("finetune-dense-model", ["finetune", "{dense}", *FINETUNE[2:], "-o", "{case}/run"], refused("not pruned")),
    Case("eval-dense-is-pruned", ["eval", "{pruned}", "--dense", "{pruned}", "--data", "{images}", "--workers",
                                  "0"], refused("(--dense) is pruned")),
    Case("eval-dense-other-classes", ["eval", "{pruned}", "--dense", "{f}", "--data", "{images}", "--workers", "0"],
         refused("classes"), edited_state(_five_classes)),
    Case("report-pruned-other-classes", ["report", "{dense}", "{p3}", "--data", "{images}", "-o", "{case}/r",
                                         "--no-speed"], refused("classes"), pruned_three_classes),
    # checkpoints
    Case("truncated-safetensors", ["info", "{m}"], refused("model.safetensors"), truncated_weights),
    Case("folder-without-weights", ["info", "{m}"], refused("model.safetensors"), no_weights),
    Case("pickled-list", ["info", "{f}"], refused("obj.pt"), saved("obj.pt", lambda: [1, 2, 3])),
    Case("pickled-whole-module", ["info", "{f}"], refused("whole.pt"), saved("whole.pt", _whole_model)),
    Case("random-bin", ["info", "{f}"], refused("pytorch_model.bin"), a_file_of("pytorch_model.bin",
                                                                               bytes(range(256)) * 8)),
    Case("zero-byte-checkpoint", ["info", "{f}"], refused("empty.pth"), a_file_of("empty.pth", b"")),
    Case("text-as-safetensors", ["info", "{f}"], refused("w.safetensors"), a_file_of("w.safetensors", b"hello")),
    Case("official-missing-key", ["info", "{f}"], refused("does not match"), edited_state(_drop_head_weight)),
    Case("official-extra-key", ["info", "{f}"], refused("bogus.weight"), edited_state(_extra_key)),
    Case("official-other-head", ["eval", "{f}", "--data", "{images}", "--workers", "0"],
         refused("predicts 5 classes"), edited_state(_five_classes)),
    Case("official-nan-weights", ["eval", "{f}", "--data", "{images}", "--workers", "0"], refused("non-finite"),
         edited_state(_nan_head)),
    Case("config-is-a-list", ["info", "{m}"], refused("config.json"), folder_file("config.json", "[1, 2]")),
    Case("config-is-empty", ["info", "{m}"], refused("config.json"), folder_file("config.json", "")),
    Case("config-is-broken-json", ["info", "{m}"], refused("config.json"), folder_file("config.json", '{"arch": ')),
    Case("config-is-empty-object", ["info", "{m}"], refused("config.json"), folder_file("config.json", "{}")),
    Case("pruned-config-layers-edited", ["info", "{m}"], refused("layers"), pruned_config("pruning", "layers", [7])),
    Case("pruned-config-layers-float", ["info", "{m}"], refused("layers"), pruned_config("pruning", "layers", [1.5])),
    Case("pruned-config-keep-edited", ["info", "{m}"], refused("keep"), pruned_config("pruning", "keep", [2.0])),
    Case("pruned-config-keep-text", ["eval", "{m}", "--data", "{images}", "--workers", "0"], refused("keep"),
         pruned_config("pruning", "keep", ["NaN"])),
    Case("pruned-config-score-edited", ["info", "{m}"], refused("score"), pruned_config("pruning", "score", "bogus")),
    Case("pruned-config-pruning-list", ["info", "{m}"], refused("pruning"), pruned_config(None, "pruning", [1])),
    Case("config-num-classes-zero", ["info", "{m}"], refused("not in the architecture: head"),
         pruned_config("arch", "num_classes", 0)),
    Case("config-depth-negative", ["info", "{m}"], refused("depth"), pruned_config("arch", "depth", -2)),
    Case("config-img-size-bool", ["info", "{m}"], refused("img_size"), pruned_config("arch", "img_size", True)),
    Case("config-unknown-arch", ["info", "{m}"], refused("arch"), pruned_config("arch", "name", "resnet50")),
    Case("convert-pruned-folder", ["convert", "{pruned}", "-o", "{case}/c"],
         succeeded(makes=("c/model.safetensors",), clean=True)),
    # environment
    Case("hub-offline-uncached", ["info", "someone/some-model:weights.pth"], refused("offline", within=20),
         env=HUB_OFFLINE),
    Case("hub-offline-registered-name", ["eval", "vim_tiny", "--data", "{images}", "--workers", "0"],
         refused("HF_HUB_OFFLINE", within=20), env=HUB_OFFLINE),
    Case("hub-weird-id-offline", ["info", "a/b/c/d:"], refused("'a/b/c/d:'"), env=HUB_OFFLINE),
    Case("hf-home-is-a-file", ["info", "someone/some-model:weights.pth"], refused(within=20),
         env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "{dense_file}"}),
    Case("home-and-cache-unwritable", ["info", "{dense}"], succeeded(),
         env={"HOME": "/proc/nohome", "XDG_CACHE_HOME": "/proc/nocache"}),
    Case("tmpdir-unwritable", ["convert", "{dense}", "-o", "{case}/c"], succeeded(makes=("c/model.safetensors",)),
         env={"TMPDIR": "/proc/notmp"}),
    Case("no-fvcore-prune-flops", [*PN, "--flops", "0.8"], refused("pip install fvcore", absent=("--no-flops",)),
         fault=lambda: _both(no_fvcore(), no_calibration())),
    Case("no-fvcore-prune", P1, refused("pip install fvcore", "--no-flops"),
         fault=lambda: _both(no_fvcore(), no_calibration())),
    Case("no-fvcore-prune-no-flops", [*P1, "--no-flops"], succeeded(makes=("o/model.safetensors",), clean=True),
         fault=no_fvcore),
    Case("no-fvcore-info", ["info", "{dense}"], succeeded("fvcore is not installed"), fault=no_fvcore),
    Case("no-fvcore-flops", ["flops", "{dense}"], refused("pip install fvcore"), fault=no_fvcore),
    Case("no-fvcore-report", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{case}/r", "--no-speed",
                              "--quiet"], refused("pip install fvcore"), fault=no_fvcore),
    Case("force-over-run-with-undeletable-file", [*FINETUNE, "-o", "{run}", "--force"],
         succeeded("train_log.jsonl", "delete them by hand", makes=("run/model.safetensors",), clean=True),
         finished_run, fault=lambda: undeletable("train_log.jsonl")),
    Case("prune-over-own-output-with-undeletable-file", [*PRUNE, "-o", "{m}", "--force"],
         succeeded("model.safetensors", "delete them by hand", makes=("m/model.safetensors",), clean=True),
         copy_of("pruned"), fault=lambda: undeletable("model.safetensors")),
    # runs: resumed, replaced, edited by hand
    Case("resume-finished-run", [*FINETUNE, "-o", "{run}", "--resume"], succeeded(clean=True), finished_run),
    Case("resume-other-batch-size", [*FINETUNE, "--batch-size", "2", "-o", "{run}", "--resume"],
         refused("belongs to another run"), finished_run),
    Case("resume-more-epochs", [*FINETUNE, "--epochs", "2", "-o", "{run}", "--resume"],
         refused("belongs to another run"), finished_run),
    Case("resume-truncated-state", [*FINETUNE, "-o", "{run}", "--resume"], refused("train_state.pt"),
         run_edited(lambda run: (run / "train_state.pt").write_bytes((run / "train_state.pt").read_bytes()[:100]))),
    Case("resume-garbage-log", [*FINETUNE, "-o", "{run}", "--resume"], succeeded(clean=True),
         run_edited(lambda run: (run / "train_log.jsonl").write_text("not json\n{"))),
    Case("resume-run-without-config", [*FINETUNE, "-o", "{run}", "--resume"], succeeded(clean=True),
         run_edited(lambda run: (run / "config.json").unlink())),
    Case("resume-killed-before-first-state", [*FINETUNE, "-o", "{run}", "--resume"],
         refused("holds no training state", "--force instead of --resume"),
         run_edited(lambda run: (run / "train_state.pt").unlink())),
    Case("force-after-kill-before-first-state", [*FINETUNE, "-o", "{run}", "--force"], succeeded(clean=True),
         run_edited(lambda run: (run / "train_state.pt").unlink())),
    Case("force-over-run-without-config", [*FINETUNE, "-o", "{run}", "--force"], succeeded(clean=True),
         run_edited(lambda run: (run / "config.json").unlink())),
    Case("train-resume-a-finetune-run", [*TRAIN, "--data", "{d}", "-o", "{run}", "--resume"], refused("another run"),
         lambda case: {**finished_run(case), **data_of(classes=tuple("abcdefghij"), n=1)(case)}),
    # interruption
    Case("ctrl-c-in-calibration", P1, refused("interrupted"),
         fault=lambda: ctrl_c_in("ssmtrim.pruning.calibrate", "calibrate")),
    Case("ctrl-c-while-saving", ["convert", "{dense}", "-o", "{case}/c"], refused("interrupted"),
         fault=ctrl_c_while_saving),
    Case("ctrl-c-while-replacing", ["convert", "{dense}", "-o", "{m}", "--force"], refused("interrupted"),
         copy_of("pruned"), fault=ctrl_c_while_saving),
    Case("ctrl-c-in-finetune", [*FINETUNE, "--epochs", "3", "-o", "{case}/run"], refused("interrupted", "--resume"),
         fault=ctrl_c_at_step),
    # held-out findings: the writer's own errors around a full disk, folders of another kind, plans that would not
    # run as printed, unrelated dense references, allocations beyond memory
    Case("full-disk-safetensors-own-error", [*PRUNE, "-o", "{case}/out"],
         refused("No space left on device", "free some space"),
         fault=lambda: writer_error("Error while serializing: I/O error: No space left on device (os error 28)")),
    Case("file-size-limit-safetensors", [*PRUNE, "-o", "{case}/out"], refused("file-size limit (ulimit -f)"),
         fault=lambda: writer_error("Error while serializing: I/O error: File too large (os error 27)")),
    Case("report-force-over-a-model", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{m}", "--force",
                                       "--quiet"], refused("holds an ssmtrim model", "same kind"), copy_of("pruned")),
    Case("convert-force-over-a-report", ["convert", "{dense}", "-o", "{r}", "--force"],
         refused("holds an ssmtrim report", "same kind"), a_report),
    Case("keep-below-a-step", [*PRUNE, "--keep", "1e-9", "-o", "{case}/out"],
         refused("a step keeps at least")),
    Case("tome-keep-below-half", [*PRUNE, "--arrangement", "tome", "--keep", "0.1", "-o", "{case}/out"],
         refused("merges at most half")),
    Case("gap-with-keep-order", [*PRUNE, "--arrangement", "keep-order", "--gap", "zero", "-o", "{case}/out"],
         refused("--gap sets the decay")),
    Case("flops-convention-without-flops", [*PRUNE, "--flops-convention", "paper", "-o", "{case}/out"],
         refused("there is no --flops")),
    Case("eval-dense-of-another-family", ["eval", "{pruned}", "--data", "{images}", "--dense", "{pm}"],
         refused("is not the model that was reduced"), plainmamba_file),
    Case("vmamba-keep-order", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--layers", "1", "--arrangement",
                               "keep-order", "-o", "{case}/out"], refused("new sequence", "vmamba")),
    Case("unmerge-on-plainmamba", ["prune", "{pm}", "--data", "{images}", "--layers", "1", "--keep", "0.5",
                                   "--arrangement", "unmerge", "-o", "{case}/out"],
         refused("un-merge the updates", "plainmamba"), plainmamba_file),
    Case("unmerge-threshold-mode", [*PRUNE, "--arrangement", "unmerge", "--mode", "threshold", "-o", "{case}/out"],
         refused("use --mode count")),
    Case("mixers-whole-on-vim", [*PRUNE, "--arrangement", "unmerge", "--option", "mixer=positions", "-o",
                                 "{case}/out"], refused("per-token MLPs", "vim")),
    Case("mixers-whole-with-merge", [*PRUNE, "--arrangement", "merge", "--option", "mixer=positions", "-o",
                                     "{case}/out"], refused("option of unmerge")),
    Case("mixers-whole-beyond-reach", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--flops", "0.5", "--option",
                                       "mixer=positions", "-o", "{case}/out"], refused("only the MLPs save FLOPs")),
    Case("mlp-share-on-vim", [*PRUNE, "--arrangement", "unmerge", "--option", "mlp_share=0.5", "-o", "{case}/out"],
         refused("per-token MLPs", "vim")),
    Case("mlp-share-zero", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--layers", "1", "--option", "mlp_share=0",
                            "-o", "{case}/out"], refused("--mlp-share 0", "outside")),
    Case("mlp-groups-unknown", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--layers", "1", "--option",
                                "mlp_groups=layer", "-o", "{case}/out"], refused("is not one of step, block")),
    Case("rescale-unknown", [*PRUNE, "--option", "rescale=length", "-o", "{case}/out"],
         refused("is not one of none, norm")),
    Case("rescale-on-unmerge", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--layers", "1", "--option",
                                "rescale=norm", "-o", "{case}/out"], refused("rescale")),
    Case("task-unknown", [*PRUNE, "--task", "segmentation", "-o", "{case}/out"],
         refused("--task 'segmentation' is not one of classify, dense")),
    Case("quartermap-on-vim", [*PRUNE, "--arrangement", "quartermap", "--keep", "0.25", "-o", "{case}/out"],
         refused("strided part of the grid", "vim")),
    Case("quartermap-other-keep", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--layers", "1", "--arrangement",
                                   "quartermap", "--keep", "0.3", "-o", "{case}/out"], refused("keep 0.25", "0.5")),
    Case("quartermap-flops", ["prune", "vmamba_cifar", "--data", CIFAR_CALIB, "--arrangement", "quartermap", "--flops",
                              "0.7", "-o", "{case}/out"], refused("instead of --flops")),
    Case("export-dynamic-batch-zero", ["export", "{pruned}", "-o", "{case}/m.onnx", "--dynamic-batch",
                                       "--batch-size", "0"], refused("--batch-size must be at least 1")),
    Case("mambavision-reduce-after-a-conv-block", ["prune", "mambavision_cifar", "--data", CIFAR_CALIB, "--layers", "1",
                                                   "-o", "{case}/out"], refused("only after blocks 2,3,6")),
    Case("mambavision-threshold-mode", ["prune", "mambavision_cifar", "--data", CIFAR_CALIB, "--layers", "2",
                                        "--mode", "threshold", "-o", "{case}/out"], refused("--mode count")),
    Case("option-undeclared", [*PRUNE, "--option", "nope=1", "-o", "{case}/out"],
         refused("--option nope", "declares it")),
    Case("option-with-its-own-flag", [*PRUNE, "--option", "gap=mean", "-o", "{case}/out"],
         refused("its own flag", "--gap")),
    Case("option-without-value", [*PRUNE, "--option", "gap", "-o", "{case}/out"], refused("NAME=VALUE")),
    Case("report-batch-beyond-memory", ["report", "{dense}", "--data", "{images}", "--sweep", "keep=0.8",
                                        "--batch-size", "100000000", "-o", "{case}/r"],
         refused("--batch-size 100000000", "free memory", within=30)),
    Case("eval-worker-file-size-limit", ["eval", "{dense}", "--data", "{images}", "--workers", "1"],
         succeeded(), fault=lambda: file_size_limit(8192)),
    Case("report-calib-missing", ["report", "{dense}", "--data", "{images}", "--sweep", "keep=0.8", "--calib",
                                  "{case}/none", "-o", "{case}/r"], refused("--calib", "does not exist")),
    Case("output-dangling-symlink", [*PRUNE, "-o", "{link}"], refused("symbolic link", "dangling", within=15),
         dangling_link),
    Case("report-output-inside-a-model", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{dense}/r"],
         refused("lies inside the model", "choose an -o outside")),
    Case("info-img-size-beyond-memory", ["info", "{dense}", "--img-size", "100000"],
         refused("more than this machine's", "free memory")),
    # ssmtrim export: the output file's rules and what cannot export, before any export work
    Case("export-output-not-onnx", ["export", "{pruned}", "-o", "{case}/model.txt"], refused("does not end in .onnx")),
    Case("export-output-is-a-folder", ["export", "{pruned}", "-o", "{case}/d.onnx"], refused("is a folder"),
         lambda case: (case / "d.onnx").mkdir() or {}),
    Case("export-over-users-file", ["export", "{pruned}", "-o", "{case}/theirs.onnx", "--force"],
         refused("not an ONNX file ssmtrim wrote"), lambda case: (case / "theirs.onnx").write_bytes(b"onnx?") and {}),
    Case("export-existing-without-force", ["export", "{pruned}", "-o", "{case}/theirs.onnx"],
         refused("already exists", "--force"), lambda case: (case / "theirs.onnx").write_bytes(b"onnx?") and {}),
    Case("export-threshold-plan", ["export", "{thr}", "-o", "{case}/m.onnx"], refused("threshold mode", "--mode count"),
         threshold_folder),
    Case("export-batch-size-zero", ["export", "{pruned}", "-o", "{case}/m.onnx", "--batch-size", "0"],
         refused("--batch-size must be at least 1")),
    Case("export-check-images-negative", ["export", "{pruned}", "-o", "{case}/m.onnx", "--check-images", "-3"],
         refused("--check-images must be 0 or more")),
    Case("export-check-data-missing", ["export", "{pruned}", "-o", "{case}/m.onnx", "--check-data", "{case}/none"],
         refused("--check-data", "does not exist")),
    Case("export-output-inside-source", ["export", "{pruned}", "-o", "{pruned}/m.onnx"],
         refused("output file", "lies inside the source model")),
    Case("report-runtime-unknown", ["report", "{dense}", "{pruned}", "--data", "{images}", "-o", "{case}/r",
                                    "--runtime", "tensorrt"], refused("--runtime must be one of")),
    Case("report-compiled-threshold-plan", ["report", "{dense}", "{thr}", "--data", "{images}", "-o", "{case}/r",
                                            "--runtime", "compiled"],
         refused("--runtime compiled times one graph per batch size", "--mode count"), threshold_folder),
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
