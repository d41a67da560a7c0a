"""The runs a report is about, found from the paths a user names: runs, or study folders whose
finished runs are taken (those its study.json planned, where it records a plan), with what was
passed over and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.study.record import read_study


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
    Inside a folder, unfinished runs, nested studies and runs its study.json did not plan are
    passed over and named in ``skipped``; a report folder, or a folder without runs, is refused
    with what to pass instead."""
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
        record = read_study(p)
        if record is not None and record.settings is not None:  # a plan to hold them to
            found.skipped += [
                f"{c} (not one of the runs {p / 'study.json'} planned)" for c in runs if c.name not in record.runs
            ]
            runs = [c for c in runs if c.name in record.runs]
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
    studies = sorted(str(c) for c in path.iterdir() if _holds_runs(c))
    if studies:
        return f"{path} holds no run of its own, only studies: pass one of them ({', '.join(studies)})"
    return f"{path} holds no finished run (a run directory has summary.json and metrics.jsonl)"
