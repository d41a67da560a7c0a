"""Finished runs as a study reads them: the run record and the per-image results of its final
evaluation."""

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
