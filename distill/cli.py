"""Shared entry-point behaviour: user errors become one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from distill.errors import DistillError


def run_guarded(fn: Callable[[], object]) -> int:
    """Run ``fn``; a :class:`DistillError` prints ``error: ...`` (no traceback) and returns 2."""
    try:
        fn()
    except DistillError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
