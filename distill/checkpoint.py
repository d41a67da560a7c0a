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
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from distill.engine import Progress

STEP_PREFIX = "step_"
BEST = "best"
MARKER = "progress.json"
EMA_FILE = "ema.safetensors"


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
    progress: Progress,
    ema: Any = None,
    keep: int | None = None,
) -> Path:
    """Collective: write checkpoint ``name`` atomically; prune ``step_*`` to the newest ``keep``."""
    tmp, final = root / f"{name}.tmp", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(tmp / EMA_FILE))
        (tmp / MARKER).write_text(json.dumps(progress.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        if keep is not None:
            for stale in step_checkpoints(root)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema: Any = None) -> Progress:
    """Collective: restore model/optimizer/scaler/RNG state, EMA weights and progress."""
    accelerator.load_state(str(path))
    if ema is not None and (path / EMA_FILE).is_file():
        from safetensors.torch import load_file

        ema.module.load_state_dict(load_file(str(path / EMA_FILE)))
    return Progress.from_dict(json.loads((path / MARKER).read_text()))


def step_name(global_step: int) -> str:
    return f"{STEP_PREFIX}{global_step:08d}"
