"""Console progress that shows wherever the output goes: a bar on a terminal, plain lines in a
log file. (What training has done, saved in checkpoints, is run.checkpoint.TrainingState.)

On clusters stdout goes to a file and tqdm switches itself off there, which left a run silent
between epochs (measured: the teacher stage printed nothing for 126 s on 3,000 MNIST images). So
off a terminal a line is printed at a steady interval (``run.progress_every_s``) and at every
epoch end, with what a person watching a log wants: where the run is, the loss, the learning rate,
the speed, the time spent and the time left.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from distill.exports.progress import duration


class ProgressReport:
    """Console progress of one training stage (``name``: student or teacher) over ``total``
    optimizer steps.

    ``step()`` after every optimizer step, ``values(...)`` when the loss is known (every
    run.log_every_steps), ``epoch_end(...)`` at the end of an epoch. Only the main process reports.
    """

    def __init__(
        self,
        name: str,
        total: int,
        done: int,
        epochs: int,
        enabled: bool,
        interval_s: float = 30.0,
        stream: TextIO | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.name, self.total, self.done, self.epochs = name, total, done, epochs
        self.enabled, self.interval_s = enabled, interval_s
        self.stream = stream or sys.stdout
        self.start_done = done  # steps done before this session (a resumed run)
        self.start = self.last_line = time.perf_counter()
        self.latest: dict[str, float] = {}
        self.epoch = 0
        is_tty = self.stream.isatty() if terminal is None else terminal
        self.bar: Any = None
        if enabled and is_tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=name, unit="step", dynamic_ncols=True, leave=False)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # 0-based

    def values(self, values: dict[str, float]) -> None:
        self.latest = values
        if self.bar is not None:
            self.bar.set_postfix(
                epoch=self.epoch + 1,
                loss=f"{values['train/loss']:.4f}",
                lr=f"{values['lr']:.2e}",
                img_s=f"{values['throughput/train_img_s']:.0f}",
            )

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and time.perf_counter() - self.last_line >= self.interval_s:
            self._line()

    def eta_s(self) -> float:
        """Seconds left at this session's pace."""
        elapsed, done_here = time.perf_counter() - self.start, self.done - self.start_done
        return elapsed / done_here * (self.total - self.done) if done_here else math.nan

    def _line(self) -> None:
        v = self.latest
        parts = [f"{self.name}: epoch {self.epoch + 1}/{self.epochs}", f"step {self.done}/{self.total}"]
        if v:
            parts += [
                f"loss {v['train/loss']:.4f}",
                f"lr {v['lr']:.2e}",
                f"{v['throughput/train_img_s']:.0f} img/s",
            ]
        parts += [f"elapsed {duration(time.perf_counter() - self.start)}", f"eta {duration(self.eta_s())}"]
        self._print("  ".join(parts))
        self.last_line = time.perf_counter()

    def epoch_end(self, epoch: int, seconds: float, images: int, extra: str = "") -> None:
        """One line per epoch, on a terminal too: its time and speed (and ``extra``, e.g. val)."""
        if not self.enabled:
            return
        speed = images / seconds if seconds > 0 else math.nan
        text = f"{self.name}: epoch {epoch}/{self.epochs} done in {duration(seconds)} ({speed:.0f} img/s)"
        text += f"  eta {duration(self.eta_s())}" if self.done < self.total else ""
        self._print(text + (f"  {extra}" if extra else ""))
        self.last_line = time.perf_counter()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StudyProgress:
    """Study-wide progress: one line per finished run with the time the rest should take, from
    the seconds per epoch of the runs this process trained (finished runs of an earlier,
    interrupted study count as done and cost nothing). One-off costs inside a run (training the
    teacher, which the other runs reuse) are left out of that rate: counted in, the first run's
    teacher stage made a CIFAR-10 study's first ETA 1h33m for 48 minutes of runs."""

    def __init__(self, epochs: list[int]) -> None:
        self.epochs = epochs  # each run's epochs, in the study's order
        self.done: set[int] = set()
        self.seconds, self.timed_epochs = 0.0, 0

    def skipped(self, i: int) -> None:
        self.done.add(i)

    def finished(self, i: int, seconds: float, one_off: float = 0.0) -> None:
        """Run ``i`` took ``seconds``, ``one_off`` of them on work the other runs will not repeat."""
        self.done.add(i)
        self.seconds += max(0.0, seconds - one_off)
        self.timed_epochs += self.epochs[i]

    def eta_s(self) -> float:
        left = sum(e for i, e in enumerate(self.epochs) if i not in self.done)
        return self.seconds / self.timed_epochs * left if self.timed_epochs else math.nan

    def line(self, i: int, name: str, seconds: float, one_off: float = 0.0) -> str:
        left = len(self.epochs) - len(self.done)
        text = f"study: [{i + 1}/{len(self.epochs)}] {name} finished in {duration(seconds)}"
        if one_off:
            text += f" (teacher training {duration(one_off)}, once)"
        return text + (f"; {left} run{'s' * (left != 1)} left, eta {duration(self.eta_s())}" if left else "; done")
