"""Finished runs as a study reads them: the run record, the per-image results of its final
evaluation, and finding the runs inside the folders a user names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.run.tracking import read_metrics

INT8_FILE = "int8.json"  # <run>/int8.json: distill.exports.export.int8_top1 of the run's final student
# <run>/predictions.npz: int64 arrays index (validation image), label, pred_fused (the fused head's
# argmax) from the run's final evaluation; the exact paired variance of a study's comparisons.
PREDICTIONS_FILE = "predictions.npz"


@dataclass
class RunRecord:
    path: Path
    variant: str
    seed: int
    recipe: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    method: str = ""  # type[-notoken] from the recipe; ``variant`` adds its distillation settings (name_cells)
    cell: str = ""  # the group it is reported in: the variant and its settings (name_cells)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, the varied keys

    def __post_init__(self) -> None:
        self.method = self.method or self.variant
        self.cell = self.cell or self.variant

    @property
    def kind(self) -> str:
        """The distillation type: none, soft or hard."""
        return str(self.recipe["distillation"]["type"])

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]

    def best(self, key: str = "val/top1_fused") -> float:
        return max(m[key] for m in self.metrics if m.get(key) is not None)

    @property
    def val_size(self) -> int | None:
        """The number of validation images its accuracies are counted over (summary.json)."""
        size = (self.summary.get("data") or {}).get("val_size")
        return int(size) if isinstance(size, (int, float)) and size > 0 else None

    def correct(self) -> tuple[Any, Any] | None:
        """(validation image indices ascending, whether the fused head was right on each) from
        predictions.npz, or None where the run has none."""
        path = self.path / PREDICTIONS_FILE
        if not path.is_file():
            return None
        import numpy as np

        with np.load(path) as data:
            index, label, pred = data["index"], data["label"], data["pred_fused"]
        order = np.argsort(index, kind="stable")
        return index[order], pred[order] == label[order]

    def int8(self) -> dict[str, float] | None:
        path = self.path / INT8_FILE
        return json.loads(path.read_text()) if path.is_file() else None


def load_run(path: Path) -> RunRecord:
    path = Path(path)
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json"):
        if not (path / name).is_file():
            raise DistillError(f"{path} is not a finished run: {name} is missing")
    recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    metrics = read_metrics(path)
    if not metrics:
        raise DistillError(f"{path}/metrics.jsonl holds no evaluation")
    d = recipe["distillation"]
    variant = d["type"] if d.get("token", True) else f"{d['type']}-notoken"
    summary = json.loads((path / "summary.json").read_text())
    return RunRecord(path, variant, int(recipe["run"]["seed"]), recipe, metrics, summary)


def is_finished_run(path: Path) -> bool:
    return (path / "summary.json").is_file() and (path / "metrics.jsonl").is_file()


def _holds_runs(path: Path) -> bool:
    return path.is_dir() and any(is_finished_run(c) for c in path.iterdir() if c.is_dir())


@dataclass
class Found:
    """The runs found in the folders a user named, and what was passed over, with why."""

    runs: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def find_runs(paths: list[Path]) -> Found:
    """Each path is a finished run, or a folder whose finished runs are taken (a study folder).
    Inside a folder, unfinished runs and nested studies are passed over and named in ``skipped``;
    a report folder, or a folder without runs, is refused with what to pass instead."""
    found = Found()
    for p in map(Path, paths):
        if is_finished_run(p):
            found.runs.append(p)
            continue
        if not p.is_dir():
            raise DistillError(f"{p} is neither a run directory nor a directory of runs")
        runs = sorted(c for c in p.iterdir() if c.is_dir() and is_finished_run(c))
        if not runs:
            raise DistillError(_no_runs_message(p))
        found.runs += runs
        for c in sorted(c for c in p.iterdir() if c.is_dir() and not is_finished_run(c)):
            if _holds_runs(c):
                found.skipped.append(f"{c} (a study of its own inside {p}: pass it by name to report its runs)")
            elif (c / "recipe.yaml").is_file():
                found.skipped.append(f"{c} (unfinished: no summary.json)")
    return found


def _no_runs_message(path: Path) -> str:
    if (path / "report.md").is_file() and _holds_runs(path.parent):
        return (
            f"{path} is a report, not a run: its runs are in the study folder {path.parent}; "
            f"pass that instead (python -m distill.report {path.parent} --out DIR)"
        )
    return f"{path} holds no finished run (a run directory has summary.json and metrics.jsonl)"
