"""python -m distill.teachers end to end: candidates parsed and checked, measured, optionally piloted,
then report.md, results.csv and two figures, written into a temporary folder renamed into place
(a failure leaves nothing partly written)."""

from __future__ import annotations

import csv
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import RecipeError
from distill.recipe.schema import load_recipe
from distill.study.teachers import (
    ECE_BINS,
    Measured,
    agreement,
    ensemble_overrides,
    ensemble_recipe,
    measure_teachers,
    measures,
    parse_candidates,
)
from distill.study.teachers_pilot import ENSEMBLE, pilot_plan, pilot_rows, read_pilot, run_pilot

HONESTY = (
    "What this can and cannot conclude: the teachers' own figures (top-1, NLL, ECE, agreement) are measured "
    "on the validation split, the one the students are evaluated on, so choosing a teacher by them is a choice "
    "made on that split. The pilot trains each student for {epochs} epoch(s), not the full run's {full}: its "
    "ranking is of students early in training, and a teacher that helps late (a better calibrated or larger "
    "one) can rank otherwise at full length. A difference is called one only where its 95% interval (seeds "
    "and validation images) excludes zero; with few seeds or few validation images most are within noise, "
    "which says the pilot cannot tell them apart, not that they are equal. Speeds are this machine's, "
    "one process, at the evaluation batch size."
)


@dataclass(frozen=True)
class TeachersOptions:
    recipe: str
    candidates: str
    overrides: list[str] = field(default_factory=list)
    ensemble: bool = False
    pilot_epochs: int | None = None
    seeds: str = "0,1"
    out: str | None = None


def run_teachers(opts: TeachersOptions) -> Path:
    """Measure (and pilot) the candidates; returns report.md."""
    from distill.study.runner import parse_seeds

    base = load_recipe(opts.recipe, opts.overrides)
    candidates = parse_candidates(opts.candidates, base)
    seeds = parse_seeds(opts.seeds)
    if opts.pilot_epochs is not None and opts.pilot_epochs < 1:
        raise RecipeError(f"--pilot {opts.pilot_epochs}: give a number of epochs >= 1")
    recipe = ensemble_recipe(opts.recipe, opts.overrides, candidates)
    teachers = [(c.label, c.overrides()) for c in candidates]
    if opts.ensemble:
        teachers.append((ENSEMBLE, ensemble_overrides(candidates)))
    for _, own in teachers:  # every run's recipe, validated before anything is loaded or trained
        load_recipe(opts.recipe, [*opts.overrides, *own])
    root = Path(base.run.output_dir) / f"{base.run.name}-teachers"
    out = Path(opts.out) if opts.out else root / "report"
    measured = measure_teachers(recipe)
    rows = teacher_rows(measured, [c.label for c in candidates], opts.ensemble)
    pilot: list[dict[str, Any]] = []
    if opts.pilot_epochs is not None:
        cache = base.teacher.cache_dir or Path(base.run.output_dir) / "teachers"
        runs = pilot_plan(root / "pilot", teachers, seeds, opts.pilot_epochs, opts.overrides)
        run_pilot(opts.recipe, runs, cache)
        pilot = pilot_rows(read_pilot(root / "pilot", runs))
    write_report(out, rows, measured, pilot, (opts.pilot_epochs, base.train.epochs))
    print(f"teachers: report in {out / 'report.md'}")
    return out / "report.md"


def teacher_rows(m: Measured, labels: list[str], with_ensemble: bool) -> list[dict[str, Any]]:
    rows = []
    for label, logits, speed, d in zip(labels, m.logits, m.images_per_s, m.described, strict=True):
        rows.append({"teacher": label, **measures(logits, m.labels), "images_per_s": speed, "sha256": d.get("sha256")})
    if with_ensemble:
        rows.append({"teacher": ENSEMBLE, **measures(m.ensemble, m.labels), "images_per_s": _serial(m.images_per_s)})
    return rows


def _serial(speeds: list[float]) -> float:
    """The ensemble's speed when its members run one after the other: 1 / sum(1 / speed)."""
    return 1.0 / sum(1.0 / s for s in speeds) if all(s > 0 for s in speeds) else math.nan


def write_report(
    out: Path, rows: list[dict[str, Any]], m: Measured, pilot: list[dict[str, Any]], epochs: tuple[int | None, int]
) -> None:
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_csv(tmp / "results.csv", rows, pilot)
        _figures(tmp, rows, pilot)
        (tmp / "report.md").write_text(_markdown(rows, m, pilot, epochs))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_csv(path: Path, rows: list[dict[str, Any]], pilot: list[dict[str, Any]]) -> None:
    by_teacher = {p["teacher"]: p for p in pilot}
    keys = ["teacher", "top1", "nll", "ece", "images_per_s", "sha256"]
    pilot_keys = ["student_top1", "student_top1_sd", "seeds", "vs_best", "vs_best_lo", "vs_best_hi", "beyond_noise"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + (pilot_keys if pilot else []))
        for r in rows:
            p = by_teacher.get(r["teacher"], {})
            w.writerow([r.get(k, "") for k in keys] + ([p.get(k, "") for k in pilot_keys] if pilot else []))


def _figures(folder: Path, rows: list[dict[str, Any]], pilot: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.study.plots import save

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter(100 * r["ece"], 100 * r["top1"])
        ax.annotate(r["teacher"], (100 * r["ece"], 100 * r["top1"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(f"expected calibration error, % ({ECE_BINS} bins; lower is better)")
    ax.set_ylabel("validation top-1, %")
    ax.set_title("teachers: accuracy vs calibration")
    ax.grid(alpha=0.3)
    save(fig, folder / "teachers_accuracy_calibration.png")
    if not pilot:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    names = [p["teacher"] for p in pilot]
    means = [100 * p["student_top1"] for p in pilot]
    # Whiskers: the 95% interval of each teacher's difference to the best, around its mean.
    lo = [100 * (p["vs_best"] - p["vs_best_lo"]) if math.isfinite(p["vs_best_lo"]) else 0.0 for p in pilot]
    hi = [100 * (p["vs_best_hi"] - p["vs_best"]) if math.isfinite(p["vs_best_hi"]) else 0.0 for p in pilot]
    err = [lo, hi]
    ax.bar(names, means, yerr=err, capsize=4)
    ax.set_ylabel("student validation top-1, % (mean over seeds)")
    ax.set_title("pilot: student per teacher (bars: 95% interval of the difference to the best)")
    ax.tick_params(axis="x", rotation=30)
    save(fig, folder / "pilot_student_top1.png")


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%" if math.isfinite(v) else "n/a"


def _markdown(
    rows: list[dict[str, Any]], m: Measured, pilot: list[dict[str, Any]], epochs: tuple[int | None, int]
) -> str:
    lines = ["# Teacher candidates", "", f"Validation split: {len(m.labels)} images.", ""]
    lines += ["| teacher | top-1 | NLL (nats) | ECE | img/s | sha256 |", "|---|---|---|---|---|---|"]
    for r in rows:
        sha = str(r.get("sha256") or "")[:12]
        lines.append(
            f"| {r['teacher']} | {_pct(r['top1'])} | {r['nll']:.3f} | {_pct(r['ece'])} | "
            f"{r['images_per_s']:.0f} | {sha} |"
        )
    lines += ["", "The ensemble row (when asked) is the equal-weight mean of the candidates' softmax at temperature 1; "
              "its speed is the members' run one after the other.", ""]  # fmt: skip
    labels = [r["teacher"] for r in rows if r["teacher"] != ENSEMBLE]
    agree = agreement([x.argmax(-1) for x in m.logits])
    lines += ["## Agreement (share of validation images with the same prediction)", ""]
    lines += ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {a} | " + " | ".join(_pct(v) for v in agree[i]) + " |" for i, a in enumerate(labels)]
    lines += ["", "![accuracy vs calibration](teachers_accuracy_calibration.png)", ""]
    if pilot:
        lines += [f"## Pilot: the recipe's student under each teacher, {epochs[0]} epoch(s)", ""]
        lines += ["| rank | teacher | student top-1 (mean ± sd) | seeds | vs best (95% CI) |", "|---|---|---|---|---|"]
        for k, p in enumerate(pilot):
            ci = (
                "best"
                if k == 0
                else f"{100 * p['vs_best']:+.2f} ({100 * p['vs_best_lo']:.2f} to {100 * p['vs_best_hi']:.2f})"
            )
            if k and not math.isfinite(p["vs_best_lo"]):
                ci = f"{100 * p['vs_best']:+.2f} (no interval: fewer than 2 seeds)"
            sd = _pct(p["student_top1_sd"]) if p["seeds"] > 1 else "n/a"
            lines.append(f"| {k + 1} | {p['teacher']} | {_pct(p['student_top1'])} ± {sd} | {p['seeds']} | {ci} |")
        apart = [p["teacher"] for p in pilot[1:] if p["beyond_noise"]]
        lines += ["", f"Behind the best beyond noise: {', '.join(apart) or 'none'}.", ""]
        lines += ["![student top-1 per teacher](pilot_student_top1.png)", ""]
    lines += ["## Reading it", "", HONESTY.format(epochs=epochs[0] or 0, full=epochs[1]), ""]
    return "\n".join(lines)
