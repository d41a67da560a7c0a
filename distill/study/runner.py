"""A study run end to end: the plan checked, every run trained in turn (finished ones skipped), each
finished run analysed and optionally quantized, then the report. distill.compare parses the
command line into StudyOptions and calls run_study.

Runs go one after the other inside one launch, on any number of processes. The teacher is trained
or loaded once: the teacher cache key does not depend on the seed or the distillation type. Its
outputs are computed once per data stream and replayed by the other runs (teacher.output_cache).
A study started again skips finished runs and resumes the unfinished one, and refuses, before
anything trains, runs made with other result-changing settings (plan.refuse_changed_runs).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import RecipeError
from distill.study.plan import Axis, Variant, parse_list, refuse_changed_runs, study_plan, study_record
from distill.study.record import write_study


@dataclass(frozen=True)
class StudyOptions:
    recipe: str
    overrides: list[str] = field(default_factory=list)
    types: str = "none,soft,hard"
    seeds: str = "0,1,2"
    vary: list[str] = field(default_factory=list)
    out: str | None = None  # report directory; default <study>/report
    teacher_outputs: bool = True  # replay the teacher's outputs between runs (teacher.output_cache)
    data_seed: int | None = None
    analysis: bool = True
    analysis_images: int = 512
    int8: bool = False


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in parse_list(text, "seeds")]
    except ValueError:
        raise RecipeError(f"--seeds must be integers, got '{text}'") from None


def run_study(opts: StudyOptions) -> Path:
    """Plan, check, train, analyse and report; returns the report's report.md."""
    from distill.recipe.schema import load_recipe
    from distill.run.tracking import check_trackers
    from distill.study.report import build_report
    from distill.training.trainer import make_accelerator

    variants = [Variant.parse(t) for t in parse_list(opts.types, "types")]
    seeds = parse_seeds(opts.seeds)
    axes = [Axis.parse(text) for text in opts.vary]
    study, runs = study_plan(opts.recipe, variants, seeds, opts.overrides, opts.teacher_outputs, opts.data_seed, axes)
    recipes = [(name, load_recipe(opts.recipe, overrides)) for name, overrides in runs]  # every cell, before any run
    for _, recipe in recipes:
        check_trackers(recipe.run.trackers)
    refuse_changed_runs(study, recipes)
    record = study_record(opts.recipe, variants, seeds, axes, opts.overrides, recipes)
    accelerator = make_accelerator(load_recipe(opts.recipe, opts.overrides))
    if accelerator.is_main_process:  # for python -m distill.report on the folder later
        study.mkdir(parents=True, exist_ok=True)
        write_study(study, record)
    train_runs(accelerator, opts.recipe, runs, recipes)
    out = Path(opts.out) if opts.out else study / "report"
    if accelerator.is_main_process:
        if opts.analysis:
            analyse_runs(study, [name for name, _ in runs], opts.analysis_images)
        if opts.int8:
            quantize_runs(study, [name for name, _ in runs])
        build_report([study / name for name, _ in runs], out, record)
        print(f"study: report in {out / 'report.md'}")
    accelerator.wait_for_everyone()
    return out / "report.md"


def train_runs(
    accelerator: Any, recipe_path: str, runs: list[tuple[str, list[str]]], recipes: list[tuple[str, Any]]
) -> None:
    """Each run in turn; a finished one is skipped (refuse_changed_runs has checked its settings)
    unless the study starts afresh (run.overwrite=true)."""
    from distill.run.rundir import RunDir
    from distill.training.progress import StudyProgress
    from distill.training.trainer import DistillRun

    progress = StudyProgress([r.train.epochs for _, r in recipes])
    for i, ((name, overrides), (_, recipe)) in enumerate(zip(runs, recipes, strict=True)):
        if RunDir.of(recipe).finished() and not recipe.run.overwrite:
            progress.skipped(i)
            accelerator.print(f"study: [{i + 1}/{len(runs)}] {name} finished earlier, skipped")
            continue
        accelerator.print(f"study: [{i + 1}/{len(runs)}] {name}")
        start = time.perf_counter()
        summary = DistillRun(recipe, [recipe_path, *overrides], accelerator=accelerator).run()
        seconds = time.perf_counter() - start
        one_off = (summary.get("teacher") or {}).get("train_time_s") or 0.0  # later runs reuse the teacher
        progress.finished(i, seconds, one_off)
        accelerator.print(progress.line(i, name, seconds, one_off))


def _stale(run: Path, done: Path) -> bool:
    """Whether ``done`` (a file derived from a finished run) is missing or older than the run."""
    from distill.run.rundir import RunDir

    return not done.is_file() or done.stat().st_mtime < RunDir(run).summary_file.stat().st_mtime


def analyse_runs(study: Path, names: list[str], images: int) -> None:
    """python -m distill.analyze on each finished run, once: a restarted study keeps what is current."""
    from distill.analysis.runner import analyze_run

    for name in names:
        if _stale(study / name, study / name / "analysis" / "analysis.json"):
            print(f"study: analysing {name}")
            analyze_run(study / name, images)


def quantize_runs(study: Path, names: list[str]) -> None:
    """Each finished run's student quantized to int8 and its top-1 recorded, once, as the analyses."""
    from distill.exports.int8 import int8_top1
    from distill.study.runs import INT8_FILE

    for name in names:
        done = study / name / INT8_FILE
        if _stale(study / name, done):
            print(f"study: int8 top-1 of {name}")
            done.write_text(json.dumps(int8_top1(study / name), indent=1))
