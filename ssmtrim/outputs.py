"""Output folders: what ssmtrim may write over, checked before any long work, written atomically.

ssmtrim never deletes what it did not write. An existing output folder is used only when it is empty, or replaced
(with ``force``) when it holds nothing but ssmtrim's own files and carries its mark: a ``config.json`` with
``"format": "ssmtrim"`` (model folders: prune, convert, train, finetune), a ``report.json`` with ``ssmtrim_version``
(reports), or a ``train_log.jsonl`` whose first record is ssmtrim's (a run folder before its model is written). An
output that is, contains or lies inside one of the command's inputs (the source model, the data folders; symlinks
resolved) is refused whatever the flags.

``--force`` replaces only a folder of the kind the command writes (a model a model, a report a report, a training run
a training run), and an output folder is locked from its check until it is written (an ``flock`` on a file in ssmtrim's
cache; the system releases it if the process ends first, however it ends): a second ssmtrim process that asks
for the same folder meanwhile is refused in one sentence.

Whether the output can be written is probed before the work, so a read-only or missing parent fails at once, naming
the path the user gave; an ``OSError`` while writing becomes one sentence (:class:`~ssmtrim.errors.OutputError`)
naming it too, and temporary files are removed on every failure path.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from ssmtrim.errors import ConfigError, OutputError, SsmtrimError
from ssmtrim.notices import notice

FORMAT = "ssmtrim"  # config.json's "format" in every model folder ssmtrim writes
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
README_NAME = "README.md"
STATE_NAME = "train_state.pt"  # a run folder's resumable training state
LOG_NAME = "train_log.jsonl"  # a run folder's metrics, one JSON record a line; the first is ssmtrim's start record
REPORT_NAME = "report.json"
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, README_NAME, STATE_NAME, LOG_NAME, REPORT_NAME, "report.md"})
# report plots, and the temporaries of an interrupted write (a run folder's state file, its model files' folder)
_OWN_PATTERNS = re.compile(r"^([a-z_]+_vs_gflops\.png|train_state\.pt\.tmp\d+|\.model\.tmp-\w+)$")

Inputs = Mapping[str, "str | os.PathLike | None"]  # what an output must stay clear of: label -> path


MODEL, REPORT, RUN = "model", "report", "training run"  # the kinds of folder ssmtrim writes


def folder_kind(folder: Path) -> str:
    """What an ssmtrim folder holds: a training run (its log or state), a report, or a model."""
    if (folder / LOG_NAME).exists() or (folder / STATE_NAME).exists():
        return RUN
    if (folder / REPORT_NAME).exists():
        return REPORT
    return MODEL


def check_output(out_dir: str | os.PathLike, force: bool = False, inputs: Inputs | None = None,
                 kind: str = MODEL) -> Path:
    """Check, before any long work, that ``out_dir`` can be written as a whole folder: not empty text, not a file,
    clear of ``inputs``, writable, not being written by another process, and, if it exists with something in it,
    ssmtrim's own output of the same ``kind`` and ``force`` given. Returns the path."""
    out, text, occupied = inspect_output(out_dir, inputs, kind=kind)
    if occupied and not force:
        raise ConfigError(f"output folder {text!r} already exists; pass --force to replace it or choose another -o.")
    return out


def inspect_output(out_dir: str | os.PathLike, inputs: Inputs | None = None,
                   replacing: bool = True, kind: str = MODEL) -> tuple[Path, str, bool]:
    """Every check of :func:`check_output` but the one for ``force``: (path, the text the user gave, whether it
    exists with something in it, which is then known to be ssmtrim's own output unless ``replacing`` is False, for
    a folder that is written into without deleting anything, such as a resumed run)."""
    text = os.fspath(out_dir)
    if not text.strip():
        raise ConfigError("the output path is empty; give a folder with -o.")
    out = Path(text).expanduser()
    _check_clear_of(out, text, inputs or {})
    lock_output(out, text)
    occupied = False
    if out.is_symlink():  # to a folder, a file, nowhere (dangling) or itself: refused now, not after the work
        if not os.path.exists(out):
            raise ConfigError(f"output {text!r} is a symbolic link to nothing (a dangling link); give -o a real "
                              "folder path.")
        raise ConfigError(f"output {text!r} is a symbolic link; give -o the folder it points to, or another path.")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output {text!r} is a file, not a folder; give -o the path of a folder to write.")
        try:
            occupied = any(True for _ in os.scandir(out))
        except OSError as exc:
            raise output_error(text, exc) from None
        problem = not_own_output(out) if occupied and replacing else None
        if problem is not None:
            raise ConfigError(f"output folder {text!r} {problem}, and ssmtrim replaces only folders it wrote itself; "
                              "choose another -o (a new or empty folder).")
        found = folder_kind(out) if occupied else kind
        if found != kind:
            raise ConfigError(f"output folder {text!r} holds an ssmtrim {found} and this command writes a {kind}; "
                              f"--force replaces only a folder of the same kind, so choose another -o.")
    _probe_writable(out, text)
    return out, text, occupied


_LOCKS: dict[str, int] = {}  # real path of an output -> the open lock file this process holds


def _lock_dir() -> Path:
    from ssmtrim.ops._cpu_kernel import cache_dir  # ssmtrim's cache: <root>/kernels, <root>/locks

    return cache_dir().parent / "locks"


def lock_output(out: Path, text: str) -> None:
    """Hold an exclusive lock on the output ``out`` until this process ends (re-entrant within the process); another
    process holding it is refused in one sentence. Where no lock can be taken (a read-only cache), nothing is locked."""
    key = os.path.realpath(out)
    if key in _LOCKS or os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 holds it for all ranks
        return
    try:
        folder = _lock_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (process {holder})" if holder.isdigit() else ""
        raise ConfigError(f"output folder {text!r} is being written by another ssmtrim run{who}; wait for it to "
                          "finish or choose another -o.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[key] = fd


def release_output(out_dir: str | os.PathLike) -> None:
    """Give up this process's lock on an output (a long-lived Python session that is done writing it)."""
    fd = _LOCKS.pop(os.path.realpath(Path(os.fspath(out_dir)).expanduser()), None)
    if fd is not None:
        os.close(fd)


def not_own_output(folder: Path) -> str | None:
    """Why ``folder`` is not ssmtrim's own output (``None`` when it is): a file ssmtrim does not write, or no mark."""
    foreign = sorted(p.name for p in folder.iterdir() if not _own_entry(p))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return f"holds files ssmtrim did not write ({', '.join(foreign[:3])}{more})"
    if not _marked(folder):
        return f"holds no {CONFIG_NAME}, {REPORT_NAME} or {LOG_NAME} written by ssmtrim"
    return None


def _own_entry(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.name in OWN_FILES:
        return path.is_file()
    return bool(_OWN_PATTERNS.match(path.name))


def _read_json(path: Path, first_line: bool = False) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.loads(f.readline() if first_line else f.read())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _marked(folder: Path) -> bool:
    config = _read_json(folder / CONFIG_NAME)
    if isinstance(config, dict) and config.get("format") == FORMAT:
        return True
    report = _read_json(folder / REPORT_NAME)
    if isinstance(report, dict) and "ssmtrim_version" in report:
        return True
    first = _read_json(folder / LOG_NAME, first_line=True)
    return isinstance(first, dict) and ("ssmtrim_version" in first or "step" in first)  # "step": logs before 0.x marks


def _check_clear_of(out: Path, text: str, inputs: Inputs, what: str = "output folder") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (symlinks resolved)."""
    target = Path(os.path.realpath(out))
    for label, given in inputs.items():
        if given is None or not os.path.lexists(given):
            continue  # a Hub id or registered name: nothing local to protect
        path = Path(os.path.realpath(given))
        if target == path:
            relation = "is"
        elif path.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(path):
            relation = "lies inside"
        else:
            continue
        shown = "" if repr(os.fspath(given)) in label else f" {os.fspath(given)!r}"  # a label may name it already
        raise ConfigError(f"{what} {text!r} {relation} {label}{shown}; ssmtrim never writes over its inputs, "
                          "so choose an -o outside them.")


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _probe_writable(out: Path, text: str) -> None:
    """Create and remove a temporary folder where the output will be written (beside it, and inside it if it
    exists): a read-only, full or missing place fails now, not after the work."""
    places = [_nearest_existing(Path(os.path.abspath(out)).parent)]
    if out.is_dir():
        places.append(out)
    for place in places:
        if not place.is_dir():
            raise ConfigError(f"cannot create the output folder {text!r}: {str(place)!r} is not a folder; choose "
                              "another -o.")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".ssmtrim-probe-", dir=place))
        except OSError as exc:
            raise OutputError(f"cannot write the output folder {text!r}: nothing can be created in {str(place)!r} "
                              f"({_reason(exc)}); choose another -o.") from None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def embedded_os_error(exc: BaseException) -> OSError | None:
    """The OSError inside a writer's own exception: safetensors' ``SafetensorError`` ("... (os error 28)") and
    torch.save's ``RuntimeError`` ("unexpected pos", "failed writing file"), which a full disk or a file-size limit
    (``ulimit -f``) raise instead of an OSError."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    found = re.search(r"\(os error (\d+)\)", text)
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "failed writing file" in text):
        return OSError(errno.EFBIG, "the file could not be written whole (a full disk or a file-size limit)")
    return None


def output_error(text: str, exc: OSError, what: str = "the output folder") -> OutputError:
    """One sentence for an ``OSError`` met while writing ``text`` (the path as the user gave it)."""
    full, denied = "free some space or choose another -o", "check its permissions or choose another -o"
    advice = {errno.ENOSPC: full, errno.EDQUOT: full, errno.EACCES: denied, errno.EPERM: denied,
              errno.EFBIG: "free some space, raise the file-size limit (ulimit -f) or choose another -o",
              errno.EROFS: "choose an -o on a writable disk"}.get(exc.errno, "check the disk or choose another -o")
    return OutputError(f"could not write {what} {text!r} ({_reason(exc)}); {advice}.")


def write_folder_atomic(out_dir: str | os.PathLike, force: bool, write: Callable[[Path], None],
                        inputs: Inputs | None = None, kind: str = MODEL) -> Path:
    """Run ``write(tmp_dir)`` then move the result to ``out_dir`` in one rename, after :func:`check_output`; the
    temporary folder is removed on every failure path, and a replaced folder comes back if the last rename fails.
    Files get the permissions of any file made with open() (mkstemp-style writers make them 0600)."""
    out = check_output(out_dir, force, inputs, kind)
    text = os.fspath(out_dir)
    target = Path(os.path.abspath(out))
    tmp: Path | None = None
    old: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        # mkdtemp makes the folder 0700; the result must get the permissions of any folder made with mkdir
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(0o666 & ~umask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the previous folder back
                raise
        else:
            os.replace(tmp, target)
    except Exception as exc:
        inner = None if isinstance(exc, SsmtrimError) else embedded_os_error(exc)
        if inner is None:
            raise
        raise output_error(text, inner) from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            _delete_aside(old, target.name)
        release_output(out)  # the folder is complete (or untouched): the run that checked it is done with it
    return out


def clear_own_output(folder: str | os.PathLike) -> None:
    """Delete a folder that :func:`inspect_output` found to be ssmtrim's own output (``--force`` on a run folder);
    refuses anything else."""
    folder = Path(folder)
    problem = not_own_output(folder)
    if problem is not None:
        raise ConfigError(f"output folder {os.fspath(folder)!r} {problem}; ssmtrim replaces only folders it wrote.")
    # moved aside in one rename first: a file that cannot be deleted never leaves the folder half-cleared in place
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    try:
        os.replace(folder, aside / folder.name)
    except BaseException:
        aside.rmdir()
        raise
    _delete_aside(aside, folder.name)


def _delete_aside(aside: Path, name: str) -> None:
    """Delete a replaced folder moved aside; what cannot be deleted is left there and said in a note."""
    failed: list[tuple[str, BaseException]] = []
    shutil.rmtree(aside, onerror=lambda _fn, path, info: failed.append((path, info[1])))
    if failed:
        path, exc = failed[0]
        why = getattr(exc, "strerror", None) or str(exc)
        notice("old-output-left", f"the previous {name!r} was replaced, but some of its files could not be "
               f"deleted ({path!r}: {why}); they are left in {str(aside)!r}, delete them by hand.")
