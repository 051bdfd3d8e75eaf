"""Fallbacks said aloud: one line on stderr, once per process and kind, without ``-v``.

When ssmtrim quietly does something other than what the user may expect (the slow reference scan instead of the
fast one, ImageNet preprocessing for an unknown architecture, a skipped plot), it says so with :func:`notice`. The
same line is also logged (``ssmtrim.notices`` logger, level DEBUG) for programs that collect logs; set
``SSMTRIM_QUIET_NOTICES=1`` to keep stderr clean.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)
_said: set[str] = set()
_lock = threading.Lock()


def notice(key: str, message: str) -> bool:
    """Print ``ssmtrim: note: <message>`` on stderr the first time ``key`` is seen in this process; returns whether
    it was printed."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
    log.debug(message)
    # under torchrun every rank meets the same fallbacks: rank 0 alone says them
    if os.environ.get("SSMTRIM_QUIET_NOTICES", "") in ("", "0") and os.environ.get("RANK", "0") == "0":
        print(f"ssmtrim: note: {message}", file=sys.stderr)
    return True


def reset_notices() -> None:
    """Forget which notices were given (tests; a long-lived process that wants to hear them again)."""
    with _lock:
        _said.clear()
