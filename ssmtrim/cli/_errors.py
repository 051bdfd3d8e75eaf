"""One table of how library errors reach the user: one sentence on stderr, exit code 1, no traceback.

Set ``SSMTRIM_DEBUG=1`` to get the traceback instead (modelled on huggingface_hub's ``cli/_errors.py``).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ssmtrim.errors import SsmtrimError

F = TypeVar("F", bound=Callable[..., Any])

# exception type -> prefix shown before the message; first match wins
_TABLE: tuple[tuple[type[BaseException], str], ...] = (
    (SsmtrimError, "error"),
    (FileNotFoundError, "file not found"),
    (PermissionError, "permission denied"),
    (MemoryError, "out of memory; try a smaller --batch-size"),
    (OSError, "I/O error"),
)


def debug_enabled() -> bool:
    return os.environ.get("SSMTRIM_DEBUG", "") not in ("", "0")


def handle_errors(fn: F) -> F:
    """Decorator for command functions: known errors become one line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            for kind, prefix in _TABLE:
                if isinstance(exc, kind):
                    message = str(exc) if isinstance(exc, SsmtrimError) else f"{prefix}: {exc}"
                    print(f"ssmtrim: {message}" if prefix == "error" else f"ssmtrim: {message}", file=sys.stderr)
                    raise typer.Exit(1) from None
            print(f"ssmtrim: unexpected {type(exc).__name__}: {exc} (set SSMTRIM_DEBUG=1 for the traceback and "
                  "report it)", file=sys.stderr)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
