"""What the processes of one launch must agree on, and the launch settings that keep them together.

Every process of a launch reads the same recipe but sees the file system from its own node: a
node-local ``run.output_dir``, or a network file system whose directory listings each client
caches for seconds, makes processes disagree about what exists. A decision taken from such a view
on every process (finished, resume or fresh start; train the teacher or reuse it) then differs
between processes, and they hang in a collective or train from different weights (DDP broadcasts
the parameters only when it wraps the model, not after a resume). So the main process decides,
the others receive its decision (``decided_by_main``), and every process checks at start-up that
it sees the main process's directories (``check_shared``) and after a resume decision that it
reads the same checkpoint (``check_same_checkpoint``).

The launch settings: the process group's timeout (``run.process_group_timeout_min``; torch's
default is 10 minutes for NCCL, 30 for gloo, while the main process alone may decode a whole
data set or write a study's report), non-blocking batch copies, and TF32 (``train.tf32``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, broadcast_object_list, gather_object

from distill.errors import STORAGE_ERRNOS, DistillError, LaunchError, RunStateError, storage_error
from distill.recipe.schema import Recipe

T = TypeVar("T")

# How long a process waits for a file the main process has just written to appear: a network file
# system may cache a directory's "no such file" for its attribute-cache time (NFS acdirmax: 60 s).
VISIBLE_WITHIN_S = 60.0


def unique_suffix() -> str:
    """A temporary name's unique part: host, process id and a random part (containers on
    different nodes repeat process ids; two runs of one host share none at the same time)."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def accelerator_options(recipe: Recipe) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator``: the process group's timeout and non-blocking copies.

    ``non_blocking=True`` lets Accelerate's device copy of each batch overlap the step (the
    loaders pin memory on a GPU; without it the host waits for every copy, and pinning buys
    nothing)."""
    timeout = timedelta(minutes=recipe.run.process_group_timeout_min)
    return {
        "kwargs_handlers": [InitProcessGroupKwargs(timeout=timeout)],
        "dataloader_config": DataLoaderConfiguration(non_blocking=True),
    }


def apply_tf32(recipe: Recipe) -> None:
    """TF32 matrix products and convolutions as ``train.tf32`` says, for the whole process.

    Set after the Accelerator is built: Accelerate turns TF32 matmuls on by itself when dynamo is
    on in fp32 on CUDA (AcceleratorState), which would change the numbers (and the teacher-output
    cache's) behind the recipe's back."""
    torch.backends.cuda.matmul.allow_tf32 = recipe.train.tf32
    torch.backends.cudnn.allow_tf32 = recipe.train.tf32


def tf32_state() -> dict[str, bool]:
    """What this process computes with, for the summary and the teacher-output cache key."""
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def decided_by_main(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """Collective: ``decide()`` on the main process only; every process returns its result, or
    raises the error it raised (a DistillError: same class, same message on every process)."""
    if accelerator.num_processes == 1:
        return decide()
    box: list[Any] = [None, None]
    failure: BaseException | None = None
    if accelerator.is_main_process:
        try:
            box = [decide(), None]
        except DistillError as exc:
            box = [None, (type(exc), str(exc))]
        except Exception as exc:  # a bug: its traceback on the main process, a pointer elsewhere
            failure = exc
            box = [None, (RunStateError, f"the main process failed ({type(exc).__name__}: {exc}); see its output")]
    broadcast_object_list(box, from_process=0)
    if failure is not None:
        raise failure
    if box[1] is not None:
        kind, message = box[1]
        raise kind(message)
    return box[0]


def main_value(accelerator: Accelerator, value: T) -> T:
    """Collective: the main process's ``value`` on every process."""
    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def shared_dirs(recipe: Recipe) -> list[Path]:
    """The folders every process of a launch must see as one: the run's output folder, and the
    caches the main process writes and the others read."""
    dirs = [Path(recipe.run.output_dir)]
    if recipe.teacher.train is not None and recipe.teacher.checkpoint is None:
        dirs.append(Path(recipe.teacher.cache_dir or Path(recipe.run.output_dir) / "teachers"))
    if recipe.teacher.output_cache.enabled and recipe.teacher.output_cache.dir is not None:
        dirs.append(Path(recipe.teacher.output_cache.dir))
    return list(dict.fromkeys(dirs))


def _visible(path: Path, token: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_shared(accelerator: Accelerator, dirs: list[Path], within_s: float | None = None) -> None:
    """Collective: every process sees the files the main process writes in ``dirs``, else one
    error on every process naming the folder and the processes (hosts) that cannot see it."""
    if accelerator.num_processes == 1:
        return
    within_s = VISIBLE_WITHIN_S if within_s is None else within_s

    def write_probes() -> list[str]:
        probes = []
        for d in dirs:
            probe = d / f".distill-shared.{unique_suffix()}"
            try:
                d.mkdir(parents=True, exist_ok=True)
                probe.write_text(probe.name)
            except OSError as exc:
                if exc.errno not in STORAGE_ERRNOS:
                    raise
                raise storage_error(exc, str(d), "choose a writable run.output_dir") from None
            probes.append(probe.name)
        return probes

    # Each process looks for the main process's file under its own path of the folder: on a
    # node-local disk that path holds another folder.
    probes = decided_by_main(accelerator, write_probes)
    mine = [_visible(d / name, name, within_s) for d, name in zip(dirs, probes, strict=True)]
    seen = gather_object([(accelerator.process_index, socket.gethostname(), mine)])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for d, name in zip(dirs, probes, strict=True):
            (d / name).unlink(missing_ok=True)
    for i, d in enumerate(dirs):
        blind = [f"process {rank} on {host}" for rank, host, ok in seen if not ok[i]]
        if blind:
            raise LaunchError(
                f"{d} is not shared between the processes of this launch: {', '.join(blind)} cannot "
                f"see a file the main process wrote there within {within_s:.0f} s. Put run.output_dir "
                "(and teacher.cache_dir, teacher.output_cache.dir) on storage every node mounts at the "
                "same path (docs/multi-node.md)"
            )


def checkpoint_digest(folder: Path) -> str:
    """A checkpoint's identity as a process reads it: its progress.json (steps, timings and
    metric sums, which differ between any two checkpoints) and every file's name and size."""
    if not folder.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder)}:{f.stat().st_size}\n".encode())
        if f.name == "progress.json":
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def check_same_checkpoint(accelerator: Accelerator, folder: Path | None) -> None:
    """Collective: every process is about to resume from the same bytes of ``folder``, else one
    error on every process (a stale or node-local copy would train from other weights)."""
    if accelerator.num_processes == 1 or folder is None:
        return
    digests = gather_object([(accelerator.process_index, socket.gethostname(), checkpoint_digest(folder))])
    main = digests[0][2]
    differ = [f"process {rank} on {host} ({d})" for rank, host, d in digests if d != main]
    if differ:
        raise RunStateError(
            f"the processes of this launch read different checkpoints at {folder}: the main "
            f"process reads {main}, {', '.join(differ)}. Every node must mount run.output_dir from "
            "the same shared storage (docs/multi-node.md); delete node-local copies and launch again"
        )
