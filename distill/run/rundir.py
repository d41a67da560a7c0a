"""A run's directory, ``<run.output_dir>/<run.name>/``: its layout, the decision to start
afresh, resume or refuse, finished-run detection, the summary, and the rows it logged.

Every other module asks this one where a run's files are and what state the run is in, and where
the trained teachers of an output directory are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from accelerate import Accelerator

from distill.errors import STORAGE_ERRNOS, RunStateError, storage_error
from distill.recipe.keys import changed_for_resume, stream_layout
from distill.recipe.schema import PROVENANCE_KEY, Recipe, recipe_to_dict
from distill.run import checkpoint as ckpt
from distill.run.processes import check_same_checkpoint, check_shared, decided_by_main, shared_dirs
from distill.run.records import RunSummary
from distill.run.tracking import TRACKERS_FILE, provenance, read_metrics

CHECKPOINTS, TB, EXPORT, ANALYSIS, TEACHER = "checkpoints", "tb", "export", "analysis", "teacher"
METRICS, SUMMARY, RECIPE, PREDICTIONS = "metrics.jsonl", "summary.json", "recipe.yaml", "predictions.npz"
# Everything a run owns: what a fresh start (run.overwrite=true included) clears. A shared
# directory may hold other files: those stay.
RUN_FILES = (CHECKPOINTS, TB, EXPORT, ANALYSIS, TEACHER, METRICS, SUMMARY, RECIPE, PREDICTIONS, TRACKERS_FILE)
# Trained teachers, shared by the runs of an output directory (teacher.cache_dir by default).
TEACHERS = "teachers"


def teachers_dir(output_dir: Path | str) -> Path:
    """Where the teacher stage keeps the teachers it trained for runs under ``output_dir``."""
    return Path(output_dir) / TEACHERS


class RunDir:
    """One run's directory. Paths are properties; nothing is created until ``prepare``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, recipe: Recipe) -> RunDir:
        return cls(Path(recipe.run.output_dir) / recipe.run.name)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    @property
    def analysis_dir(self) -> Path:
        return self.path / ANALYSIS

    @property
    def teacher_dir(self) -> Path:
        """A teacher-only run's copy of its teacher."""
        return self.path / TEACHER

    @property
    def predictions_file(self) -> Path:
        """Per validation image: index, label and the fused head's prediction at the final evaluation."""
        return self.path / PREDICTIONS

    @property
    def teachers(self) -> Path:
        """The trained teachers of this run's output directory (its parent)."""
        return teachers_dir(self.path.parent)

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def summary(self) -> RunSummary | None:
        """The run's summary; None while it has not finished."""
        return RunSummary.read(self.summary_file) if self.finished() else None

    def write_summary(self, summary: RunSummary) -> None:
        summary.write(self.summary_file)

    def write_predictions(self, arrays: dict[str, np.ndarray]) -> None:
        """predictions.npz, written whole or not at all."""
        tmp = self.predictions_file.with_name(PREDICTIONS + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.predictions_file)

    def predictions(self) -> dict[str, np.ndarray]:
        with np.load(self.predictions_file) as f:
            return {k: f[k] for k in f.files}

    def saved_recipe(self) -> dict[str, Any]:
        """The recorded recipe, provenance removed."""
        saved = yaml.safe_load(self.recipe_file.read_text())
        saved.pop(PROVENANCE_KEY, None)
        return saved

    def recorded_world_size(self) -> int | None:
        """The processes the run was started with (recipe.yaml's provenance), None if unrecorded."""
        if not self.recipe_file.is_file():
            return None
        return (yaml.safe_load(self.recipe_file.read_text()).get(PROVENANCE_KEY) or {}).get("world_size")

    def logged_rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path) if self.metrics_file.is_file() else []

    def logged_record(self, epoch: int) -> dict[str, Any] | None:
        """The newest evaluation logged for ``epoch``, if any."""
        return next((row for row in reversed(self.logged_rows()) if row.get("epoch") == epoch), None)

    def logged_at(self, epoch: int, step: int) -> dict[str, Any] | None:
        """The evaluation logged at exactly (epoch, step), if the run evaluated there."""
        return next((row for row in self.logged_rows() if (row.get("epoch"), row.get("step")) == (epoch, step)), None)

    # -- fresh / resume / refuse ------------------------------------------------------------

    def discard_unstarted(self, accelerator: Accelerator) -> None:
        """After a failure: a run with no checkpoint yet leaves nothing behind (a folder holding
        only recipe.yaml would look like a run). Other files of a shared directory stay."""
        # No collective here: the other processes may not reach this point.
        if not accelerator.is_main_process or ckpt.latest_checkpoint(self.checkpoints) is not None:
            return
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def prepare(self, accelerator: Accelerator, recipe: Recipe, argv: list[str]) -> Path | None:
        """Decide fresh start / resume / refusal; return the checkpoint to resume from, if any.

        Collective. The main process decides from what it sees and every process follows it (a
        process deciding from its own view of a node-local or stale directory would diverge);
        then every process checks that it reads the same checkpoint."""
        check_shared(accelerator, shared_dirs(recipe))
        name = decided_by_main(accelerator, lambda: self._decide(recipe, accelerator.num_processes))
        latest = None if name is None else self.checkpoints / name
        check_same_checkpoint(accelerator, latest)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                self._reset(accelerator, recipe, argv, latest)
            except OSError as exc:
                if exc.errno not in STORAGE_ERRNOS:
                    raise
                raise storage_error(exc, f"the run directory {self.path}", "choose a writable run.output_dir") from None
        accelerator.wait_for_everyone()
        return latest

    def _decide(self, recipe: Recipe, processes: int) -> str | None:
        """Main process: the name of the checkpoint to resume from, None for a fresh start, or
        the RunStateError that refuses the run."""
        if self.finished() and not recipe.run.overwrite:
            raise RunStateError(
                f"run {self.path} already finished (summary.json exists); pick another run.name, or "
                "pass run.overwrite=true to train it again from scratch"
            )
        latest = ckpt.latest_checkpoint(self.checkpoints)
        if recipe.run.overwrite or recipe.run.resume == "never":
            if latest is not None and not recipe.run.overwrite:
                raise RunStateError(
                    f"run {self.path} has checkpoints and run.resume=never; pass run.overwrite=true to "
                    "discard them, or run.resume=auto to continue"
                )
            latest = None
        if latest is not None:
            changed = changed_for_resume(self.saved_recipe(), recipe_to_dict(recipe))
            if changed:
                raise RunStateError(
                    f"cannot resume {self.path}: the recipe differs from the checkpoint's in "
                    f"{', '.join(changed)}; restore those values, or pass run.overwrite=true to start again"
                )
            saved = self.saved_recipe().get("data", {})
            before = stream_layout(recipe.data.model_copy(update=saved), self.recorded_world_size() or processes)
            if before != (now := stream_layout(recipe.data, processes)):
                raise RunStateError(
                    f"cannot resume {self.path}: data.shard_access=stream gives every process and loader worker "
                    f"its own shards, and the checkpoint's run read with {before} where this one reads with {now}; "
                    "launch it as it was launched, or pass run.overwrite=true to start again"
                )
        return None if latest is None else latest.name

    def _reset(self, accelerator: Accelerator, recipe: Recipe, argv: list[str], latest: Path | None) -> None:
        """Main process: clear a run being started afresh, drop half-written checkpoints, record the recipe."""
        if latest is None and self.path.exists():
            for name in RUN_FILES:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(self.checkpoints)
        if latest is None:
            record = recipe_to_dict(recipe)
            record[PROVENANCE_KEY] = provenance(argv, accelerator.num_processes, str(accelerator.device))
            self.recipe_file.write_text(yaml.safe_dump(record, sort_keys=False))
