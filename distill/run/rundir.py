"""A run's directory, ``<run.output_dir>/<run.name>/``: its layout, the decision to
start afresh, resume or refuse, finished-run detection, the summary, and the rows it logged.

Every other module asks this one where a run's files are and what state the run is in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator

from distill.errors import STORAGE_ERRNOS, RunStateError, storage_error
from distill.recipe.keys import changed_for_resume
from distill.recipe.schema import PROVENANCE_KEY, Recipe, recipe_to_dict
from distill.run import checkpoint as ckpt
from distill.run.processes import check_same_checkpoint, check_shared, decided_by_main, shared_dirs
from distill.run.tracking import TRACKERS_FILE, provenance, read_metrics, write_atomic

# What a fresh start clears (a shared directory may hold other files: those stay).
RUN_FILES = ("checkpoints", "tb", "export", "metrics.jsonl", "summary.json", "recipe.yaml", TRACKERS_FILE)


class RunDir:
    """One run's directory. Paths are properties; nothing is created until ``prepare``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, recipe: Recipe) -> RunDir:
        return cls(Path(recipe.run.output_dir) / recipe.run.name)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    @property
    def teacher_dir(self) -> Path:
        return self.path / "teacher"

    def finished(self) -> bool:
        return self.summary_file.is_file()

    def summary(self) -> dict[str, Any]:
        return json.loads(self.summary_file.read_text()) if self.finished() else {}

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary_file, json.dumps(summary, indent=1, default=str))

    def saved_recipe(self) -> dict[str, Any]:
        """The recorded recipe, provenance removed."""
        saved = yaml.safe_load(self.recipe_file.read_text())
        saved.pop(PROVENANCE_KEY, None)
        return saved

    def logged_rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path) if (self.path / "metrics.jsonl").is_file() else []

    def logged_record(self, epoch: int) -> dict[str, Any] | None:
        """The newest evaluation logged for ``epoch``, if any."""
        return next((row for row in reversed(self.logged_rows()) if row.get("epoch") == epoch), None)

    def logged_at(self, epoch: int, step: int) -> dict[str, Any] | None:
        """The evaluation logged at exactly (epoch, step), if the run evaluated there."""
        return next((row for row in self.logged_rows() if (row.get("epoch"), row.get("step")) == (epoch, step)), None)

    # -- fresh / resume / refuse ------------------------------------------------------------

    def discard_unstarted(self, accelerator: Accelerator) -> None:
        """After a failure: a run with no checkpoint yet leaves nothing behind (a folder holding
        only recipe.yaml looked like a run). Other files of a shared directory stay."""
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
        name = decided_by_main(accelerator, lambda: self._decide(recipe))
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

    def _decide(self, recipe: Recipe) -> str | None:
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
