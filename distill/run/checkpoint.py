"""Atomic checkpoints on top of ``accelerator.save_state``.

Accelerate's ``save_state`` writes files in place, its ``total_limit`` deletes old folders before
the new one exists, and ``load_state`` trusts the newest folder blindly (measured: a truncated
safetensors file in the newest folder killed every rank on resume). So every checkpoint is
written as ``<name>.tmp``, completed with ``progress.json`` (the commit marker, written last),
then renamed once every process is done; only then are old ones pruned. A folder is a
checkpoint only if its name has no ``.tmp`` suffix and it holds ``progress.json``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils.other import load as accelerate_load
from safetensors import SafetensorError

from distill.errors import STORAGE_ERRNOS, RunStateError, storage_error

STEP_PREFIX = "step_"
BEST = "best"
MARKER = "progress.json"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainingState:
    """Where training stands; stored in every checkpoint as JSON (no pickle)."""

    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # micro-batches done in the current epoch (per process)
    global_step: int = 0  # optimizer steps done
    best_top1: float = -1.0  # best val/top1_fused so far
    best_epoch: int = 0
    train_time: float = 0.0  # seconds spent in training steps, over all sessions
    train_images: int = 0  # images trained on, all processes, over all sessions
    epoch_sums: dict[str, float] = field(default_factory=dict)  # global sums for this epoch

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingState:
        return cls(**d)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / MARKER).is_file()


def step_checkpoints(root: Path) -> list[Path]:
    """Complete ``step_*`` checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{STEP_PREFIX}*") if _is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(STEP_PREFIX).split(".")[0]))


def latest_checkpoint(root: Path) -> Path | None:
    found = step_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: Path) -> list[Path]:
    """Delete folders a crash left half-written (main process only)."""
    if not root.is_dir():
        return []
    partial = [p for p in root.iterdir() if p.is_dir() and not _is_complete(p)]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = final.with_name(final.name + ".old.tmp")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    root: Path,
    name: str,
    progress: TrainingState,
    ema: Any = None,
    keep: int | None = None,
) -> Path:
    """Collective: write checkpoint ``name`` atomically; prune ``step_*`` to the newest ``keep``.

    A write that fails (disk full, read-only or unwritable directory) removes the half-written
    ``.tmp`` folder and raises :class:`StorageError` naming the path; nothing older is touched,
    so the same command resumes from the last complete checkpoint once there is room again.
    """
    tmp, final = root / f"{name}.tmp", root / name
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            if ema is not None:
                from safetensors.torch import save_file

                state = {k: v.contiguous() for k, v in ema.module.state_dict().items()}
                save_file(state, str(tmp / EMA_FILE))
            (tmp / MARKER).write_text(json.dumps(progress.to_dict(), indent=1))
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(root)
        raise storage_error(
            exc,
            f"checkpoint {tmp}",
            f"the last complete checkpoint ({kept or 'none yet'}) is kept; free space or fix "
            "permissions there, then run the same command again to resume",
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        if keep is not None:
            for stale in step_checkpoints(root)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: Any = None) -> TrainingState:
    """Collective: restore model/optimizer/scaler/RNG state, EMA weights and progress.

    Nothing is unpickled beyond ``torch.load(weights_only=True)``: weights are safetensors,
    progress is JSON, and Accelerate (>= 1.x) loads optimizer and RNG files with
    ``weights_only=True`` plus an allow-list of numpy array types. A file that needs more (a
    tampered or foreign checkpoint) or is damaged stops the run with the folder named.
    """
    try:
        # Accelerate swallows any error while loading its RNG file ("Could not load random
        # states"), so a tampered or damaged one would pass unnoticed: read it strictly first.
        rng_file = path / f"random_states_{accelerator.process_index}.pkl"
        if rng_file.is_file():
            accelerate_load(rng_file)  # weights_only=True + numpy arrays; raises on anything else
        accelerator.load_state(str(path))
        if ema is not None and (path / EMA_FILE).is_file():
            from safetensors.torch import load_file

            ema.module.load_state_dict(load_file(str(path / EMA_FILE)))
        return TrainingState.from_dict(json.loads((path / MARKER).read_text()))
    except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunStateError(
            f"checkpoint {path} cannot be loaded safely ({type(exc).__name__}: {reason}); delete "
            "that folder to resume from an older checkpoint, or pass run.overwrite=true to start again"
        ) from None


def step_name(global_step: int) -> str:
    return f"{STEP_PREFIX}{global_step:08d}"
