"""Progress of a long scoring pass (``distill.evaluate`` on many images), wherever output goes: a
bar on a terminal, otherwise a plain line at a steady interval, as training reports its steps
(off a terminal tqdm switches itself off and a log file would stay silent)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO


def duration(seconds: float) -> str:
    """Compact h/m/s: 59s, 4m05s, 2h03m (every progress line's elapsed and eta)."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class ScoreProgress:
    """``score``'s progress callback: call it with (images done, images in all)."""

    def __init__(
        self, name: str, interval_s: float = 30.0, stream: TextIO | None = None, terminal: bool | None = None
    ) -> None:
        self.name, self.interval_s = name, interval_s
        self.stream = stream or sys.stderr
        self.start = self.last_line = time.perf_counter()
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.terminal:
            if self.bar is None:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=self.name, unit="img", file=self.stream, leave=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.interval_s:
            elapsed = now - self.start
            eta = elapsed / done * (total - done) if done else math.nan
            print(
                f"{self.name}: {done:,}/{total:,} images  elapsed {duration(elapsed)}  eta {duration(eta)}",
                file=self.stream, flush=True,
            )  # fmt: skip
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
