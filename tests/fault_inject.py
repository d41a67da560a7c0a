"""Run ``distill.train`` with one fault injected: the test-side half of the fault tests.

Faults live here, not in the product: this script patches a library function, then calls the
real entry point, so the product's own error handling is what the tests observe.

``DISTILL_FAULT`` selects the fault:

- ``disk_full:N`` -- the N-th model file written by a checkpoint (1-based) gets half its bytes,
  then the write fails with ENOSPC, as a full disk would.
- ``nan_rank:R:K`` -- on process R only, the K-th training loss (1-based) is NaN.
- ``stale_listing:R`` -- process R sees no summary.json, no checkpoint and no trained teacher, as
  a network file system's stale directory cache would show it.
- ``local_output_dir:R`` -- process R writes to its own ``<run.output_dir>-rank<R>``, as on a
  node-local disk (and waits 1 s, not a minute, for the main process's files to appear).

Usage: ``DISTILL_FAULT=... python tests/fault_inject.py RECIPE [overrides]`` (also under
``accelerate launch``).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def disk_full(nth: int) -> None:
    import accelerate.checkpointing as ac

    real_save, calls = ac.save, [0]

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        if str(f).endswith("model.safetensors"):
            calls[0] += 1
            if calls[0] == nth:
                real_save(obj, f, *args, **kwargs)
                data = Path(f).read_bytes()
                Path(f).write_bytes(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    ac.save = save


def nan_rank(rank: int, nth: int) -> None:
    import torch

    from distill.training.step import Step

    real_call, calls = Step.__call__, [0]

    def call(self: Step, *args: Any) -> Any:
        parts = real_call(self, *args)
        calls[0] += 1
        if int(os.environ.get("RANK", "0")) == rank and calls[0] == nth:
            return parts._replace(total=parts.total * torch.nan)
        return parts

    Step.__call__ = call  # type: ignore[method-assign]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def stale_listing(rank: int) -> None:
    if _rank() != rank:
        return
    import distill.run.checkpoint as ckpt
    import distill.training.teacher_stage as stage
    from distill.run.rundir import RunDir

    ckpt.latest_checkpoint = lambda root: None
    RunDir.finished = lambda self: False  # type: ignore[method-assign]
    stage.TEACHER_INFO = "not-listed.json"


def local_output_dir(rank: int) -> None:
    import distill.run.processes as processes

    processes.VISIBLE_WITHIN_S = 1.0
    if _rank() == rank:
        sys.argv[1:] = [a + f"-rank{rank}" if a.startswith("run.output_dir=") else a for a in sys.argv[1:]]


def main() -> int:
    kind, *params = os.environ["DISTILL_FAULT"].split(":")
    faults = {
        "disk_full": disk_full, "nan_rank": nan_rank, "stale_listing": stale_listing,
        "local_output_dir": local_output_dir,
    }  # fmt: skip
    faults[kind](*map(int, params))
    from distill.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
