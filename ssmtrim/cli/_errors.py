"""One table of how library errors reach the user: one sentence on stderr, exit code 1, no traceback.

Set ``SSMTRIM_DEBUG=1`` to get the traceback instead (modelled on huggingface_hub's ``cli/_errors.py``).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ssmtrim.errors import SsmtrimError

F = TypeVar("F", bound=Callable[..., Any])

def _os_error(exc: OSError) -> str:
    """An environment error (full disk, permissions, read-only file system...) as one sentence."""
    name = exc.filename or getattr(exc, "filename2", None)
    where = f" ({name!r})" if name else ""
    full = "no space left on the device" + where + "; free some space or write elsewhere, then run again"
    denied = "permission denied" + where + "; check the permissions or use another path"
    sentence = {
        errno.ENOSPC: full, errno.EDQUOT: full, errno.EACCES: denied, errno.EPERM: denied,
        errno.EROFS: "read-only file system" + where + "; write elsewhere",
        errno.ENOENT: f"{name!r} does not exist; check the path" if name else f"not found: {exc.strerror or exc}",
        errno.EMFILE: "too many open files; lower --workers or raise the limit (ulimit -n)",
        errno.EFBIG: "file too large" + where + " for the file-size limit (ulimit -f) or the file system; raise the "
                     "limit or write elsewhere",
    }.get(exc.errno)
    return sentence or f"I/O error{where}: {exc.strerror or exc}; check the disk and run again"


def _out_of_memory(exc: BaseException) -> str:
    import re

    where = "the GPU" if type(exc).__name__ == "OutOfMemoryError" else "the machine"
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    need = f" (one tensor alone needed {int(asked.group(1)) / 2**30:.1f} GiB)" if asked else ""
    return f"{where} ran out of memory{need}; try a smaller --batch-size (or --img-size)"


def _is_allocation_failure(exc: BaseException) -> bool:
    """PyTorch's CPU allocator raises a RuntimeError, not a MemoryError, when an allocation fails."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("not enough memory" in text or "DefaultCPUAllocator" in text)


def _no_cuda(exc: BaseException) -> str:
    return f"CUDA is not usable here ({_first_line(exc)}); use --device cpu"


def _is_no_cuda(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, (RuntimeError, AssertionError)) and "CUDA" in text and any(
        w in text for w in ("not compiled", "NVIDIA driver", "no CUDA GPUs", "not available"))


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# (matches, sentence) in order, first match wins; the sentence is printed after "ssmtrim: "
_TABLE: tuple[tuple[Callable[[BaseException], bool], Callable[[BaseException], str]], ...] = (
    (lambda e: isinstance(e, SsmtrimError), _one_line),
    (lambda e: isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError", _out_of_memory),
    (_is_allocation_failure, _out_of_memory),
    (_is_no_cuda, _no_cuda),
    (lambda e: isinstance(e, OSError), _os_error),  # type: ignore[list-item]
    # a writer's own exception around an OSError (safetensors' "(os error 28)", torch.save's "unexpected pos")
    (lambda e: _embedded(e) is not None, lambda e: _os_error(_embedded(e))),  # type: ignore[arg-type]
)


def _embedded(exc: BaseException) -> OSError | None:
    from ssmtrim.outputs import embedded_os_error

    return embedded_os_error(exc)


def debug_enabled() -> bool:
    return os.environ.get("SSMTRIM_DEBUG", "") not in ("", "0")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or ``kill`` stopping the job), raised where the main thread is, so that it stops the
    work exactly as Ctrl-C does: temporary files removed, nothing half-written, one line, exit code 143."""


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in this process (the ``ssmtrim`` entry point calls it)."""
    import signal

    def raise_terminated(signum, frame):  # noqa: ARG001 - the signal module's handler signature
        raise Terminated

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)


def handle_errors(fn: F) -> F:
    """Decorator for command functions: known errors become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line, exit code 130 / 143 as a shell expects
            if debug_enabled():
                raise
            how, code = ("stopped by SIGTERM", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            print(f"ssmtrim: {how}; run the command again to finish (a train or finetune run continues from its "
                  "last saved state with --resume).", file=sys.stderr)
            raise typer.Exit(code) from None
        except Exception as exc:
            if debug_enabled():
                raise
            # under torchrun every rank meets the error: rank 0 alone says it (all exit 1), as the README promises
            speak = os.environ.get("RANK", "0") == "0"
            for matches, sentence in _TABLE:
                if matches(exc):
                    if speak:
                        print(f"ssmtrim: {sentence(exc)}", file=sys.stderr, flush=True)
                    raise typer.Exit(1) from None
            if speak:
                print(f"ssmtrim: unexpected {type(exc).__name__}: {_first_line(exc)} (set SSMTRIM_DEBUG=1 for the "
                      "traceback and report it)", file=sys.stderr, flush=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
