"""Shared entry-point behaviour: user errors become one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from distill.errors import STORAGE_ERRNOS, DistillError, storage_error


def _user_message(exc: BaseException) -> str:
    """The message alone: an error raised in a DataLoader worker comes back with the worker's
    traceback folded into its text ("Caught DataError in DataLoader worker process 0 ...")."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def print_error(message: str) -> None:
    """The one line a user-facing failure prints (stderr, flushed before the process exits)."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_guarded(fn: Callable[[], object]) -> int:
    """Run ``fn``; a :class:`DistillError` or a storage ``OSError`` prints ``error: ...`` (no
    traceback) and returns 2."""
    try:
        fn()
    except DistillError as exc:
        print_error(_user_message(exc))
        return exc.exit_code
    except OSError as exc:
        # Disk full or unwritable output anywhere else (logs, exports, reports): name the path.
        if exc.errno not in STORAGE_ERRNOS:
            raise
        err = storage_error(exc, "output", "free space or choose a writable location, then run the same command again")
        print_error(str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
