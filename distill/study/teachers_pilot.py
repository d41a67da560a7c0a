"""The pilot of python -m distill.teachers: a short distillation of the recipe's student under each
teacher candidate, over matched seeds, ranking the candidates by the student they produce.

Runs that share a seed see the same images in the same order with the same augmentation (the
data contract, as in distill.compare's studies), so a paired difference between two candidates'
students on one seed comes from the teacher alone. Each candidate's outputs are computed once
per data stream and replayed by a study restarted later (teacher.output_cache); a candidate the
pipeline trains is trained once (the trained-teacher cache). Intervals are distill.study.stats'
paired intervals over seeds and validation images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError
from distill.recipe.schema import load_recipe
from distill.run.rundir import RunDir
from distill.study.plan import safe_name
from distill.study.stats import Paired, mean_std, paired_interval

ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class PilotRun:
    teacher: str  # a candidate's label, or ENSEMBLE
    seed: int
    name: str  # its run directory under the pilot folder
    overrides: list[str]


def pilot_plan(
    folder: Path, teachers: list[tuple[str, list[str]]], seeds: list[int], epochs: int, overrides: list[str]
) -> list[PilotRun]:
    """Seed-major runs of every teacher (label, its overrides) for ``epochs`` epochs."""
    shared = [
        "teacher.output_cache.enabled=true",
        f"teacher.output_cache.dir={folder / 'teacher_outputs'}",
        f"train.epochs={epochs}",
        "run.export=false",
    ]
    runs = []
    for seed in seeds:
        for label, own in teachers:
            name = f"{safe_name(label)}-seed{seed}"
            where = [f"run.output_dir={folder}", f"run.name={name}", f"run.seed={seed}"]
            runs.append(PilotRun(label, seed, name, [*shared, *overrides, *own, *where]))
    return runs


def run_pilot(recipe_path: str, runs: list[PilotRun], cache_dir: Path) -> None:
    """Every run in turn (finished ones skipped, unfinished resumed), in one launch."""
    from distill.study.runner import train_runs
    from distill.training.trainer import make_accelerator

    plan = [(r.name, [*r.overrides, f"teacher.cache_dir={cache_dir}"]) for r in runs]
    recipes = [(name, load_recipe(recipe_path, o)) for name, o in plan]  # every run, before any trains
    accelerator = make_accelerator(recipes[0][1])
    train_runs(accelerator, recipe_path, plan, recipes)


@dataclass
class PilotResult:
    teacher: str
    top1: dict[int, float]  # per seed, the student's final fused top-1
    correct: dict[int, np.ndarray]  # per seed, right/wrong per validation image (ascending index)
    val_size: int | None


def read_pilot(folder: Path, runs: list[PilotRun]) -> list[PilotResult]:
    """Each teacher's students as their summary.json and predictions.npz record them."""
    results: dict[str, PilotResult] = {}
    for r in runs:
        run = RunDir(folder / r.name)
        summary = run.summary()
        if summary is None:
            raise DistillError(f"pilot run {run.path} has no summary.json: it did not finish")
        res = results.setdefault(r.teacher, PilotResult(r.teacher, {}, {}, None))
        res.top1[r.seed] = float(summary.final["val/top1_fused"])
        size = summary.data.get("val_size")
        res.val_size = int(size) if size else res.val_size
        predictions = run.predictions_file
        if predictions.is_file():
            with np.load(predictions) as data:
                order = np.argsort(data["index"], kind="stable")
                res.correct[r.seed] = data["pred_fused"][order] == data["label"][order]
    return list(results.values())


def ranked(results: list[PilotResult]) -> list[PilotResult]:
    return sorted(results, key=lambda r: -mean_std(list(r.top1.values()))[0])


def versus_best(results: list[PilotResult]) -> list[tuple[PilotResult, Paired | None]]:
    """Each teacher's students against the best's, paired over their shared seeds (the best: None)."""
    order = ranked(results)
    best, out = order[0], [(order[0], None)]
    for r in order[1:]:
        seeds = sorted(set(r.top1) & set(best.top1))
        images = None
        if seeds and all(s in r.correct and s in best.correct for s in seeds):
            images = (np.stack([r.correct[s] for s in seeds]), np.stack([best.correct[s] for s in seeds]))
        p = paired_interval([r.top1[s] for s in seeds], [best.top1[s] for s in seeds], r.val_size, images)
        out.append((r, p))
    return out


def pilot_rows(results: list[PilotResult]) -> list[dict[str, Any]]:
    """Per teacher: the students' mean and spread, and the paired difference to the best."""
    rows = []
    for r, p in versus_best(results):
        mean, sd = mean_std(list(r.top1.values()))
        rows.append(
            {
                "teacher": r.teacher,
                "student_top1": mean,
                "student_top1_sd": sd,
                "seeds": len(r.top1),
                "vs_best": p.mean / 100 if p else 0.0,
                "vs_best_lo": p.lo / 100 if p else float("nan"),
                "vs_best_hi": p.hi / 100 if p else float("nan"),
                "beyond_noise": bool(p.beyond_noise) if p else False,
            }
        )
    return rows
