"""Run records: summary.json and the trained teacher's teacher.json, typed, versioned, one writer
and one reader each; a run directory's names all come from RunDir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from distill.errors import RunStateError
from distill.run.records import SUMMARY_VERSION, RunSummary, TrainedTeacher
from distill.run.rundir import RunDir, teachers_dir

# A summary.json as the code before the version field wrote it (keys and values of a smoke run).
UNVERSIONED = {
    "run": "runs/smoke",
    "final": {"epoch": 2, "step": 16, "val/top1_fused": 0.65, "val/kl": 0.5597788706421852},
    "best": {"val/top1_fused": 0.65, "epoch": 1},
    "epochs": 2,
    "steps": 16,
    "wall_time_s": 15.2,
    "train_time_s": 4.1,
    "throughput_train_img_s": 62.4,
    "teacher": {"architecture": "resnet10t", "sha256": "ab" * 32, "val_top1": 1.0, "trained_here": True},
    "student_init": None,
    "distillation": {"type": "hard", "alpha": 0.5, "tau": 1.0, "kl_norm": "batchmean", "token": True},
    "world_size": 1,
    "precision": "fp32",
    "effective_lr": 0.002,
    "data": {"source": "synthetic", "num_classes": 4, "class_names": ["class_0", "class_1", "class_2", "class_3"]},
    "teacher_cache": {"enabled": False},
    "metric_notes": {"val/kl": "KL"},
    "export": None,
}


def test_a_summary_written_before_the_version_field_is_read(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(UNVERSIONED))
    summary = RunDir(tmp_path).summary()
    assert summary is not None and summary.version == SUMMARY_VERSION
    assert summary.epochs == 2 and summary.steps == 16 and summary.best == {"val/top1_fused": 0.65, "epoch": 1}
    assert summary.teacher["architecture"] == "resnet10t" and summary.data["num_classes"] == 4
    assert summary.export is None and summary.student_init is None


def test_a_summary_is_written_and_read_back_with_its_version(tmp_path: Path) -> None:
    summary = RunSummary.from_dict({**UNVERSIONED, "final": {**UNVERSIONED["final"], "val/teacher_top1": math.nan}})
    RunDir(tmp_path).write_summary(summary)
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["version"] == SUMMARY_VERSION and raw["student_init"] is None and raw["export"] is None
    again = RunDir(tmp_path).summary()
    assert again is not None and again.epochs == 2 and math.isnan(again.final["val/teacher_top1"])
    assert RunDir(tmp_path / "unfinished").summary() is None


def test_a_newer_summary_is_refused_with_its_version_named(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({**UNVERSIONED, "version": SUMMARY_VERSION + 1}))
    with pytest.raises(RunStateError) as info:
        RunDir(tmp_path).summary()
    msg = str(info.value)
    assert f"schema version {SUMMARY_VERSION + 1}, newer than this distill reads (up to {SUMMARY_VERSION})" in msg
    assert str(tmp_path / "summary.json") in msg


def test_the_trained_teacher_record_holds_real_nulls(tmp_path: Path) -> None:
    TrainedTeacher("resnet10t", {"epochs": 2}, {"source": "synthetic"}, train_time_s=3.5).write(tmp_path)
    raw = json.loads((tmp_path / "teacher.json").read_text())
    assert raw == {
        "architecture": "resnet10t", "train": {"epochs": 2}, "data": {"source": "synthetic"},
        "train_time_s": 3.5, "val_top1": None, "val_top5": None, "version": 1,
    }  # fmt: skip
    assert TrainedTeacher.read(tmp_path).val_top1 is None and TrainedTeacher.exists(tmp_path)
    # The record the code before the version field wrote: same fields, no version.
    old = {"architecture": "resnet10t", "val_top1": 1.0, "val_top5": 1.0, "train": None, "data": {}}
    (tmp_path / "teacher.json").write_text(json.dumps(old))
    assert TrainedTeacher.read(tmp_path).val_top1 == 1.0
    (tmp_path / "teacher.json").write_text(json.dumps({**old, "version": 7}))
    with pytest.raises(RunStateError, match="schema version 7"):
        TrainedTeacher.read(tmp_path)


def test_the_run_directory_names_every_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "runs" / "smoke")
    assert run.analysis_dir == tmp_path / "runs" / "smoke" / "analysis"
    assert run.export_dir.name == "export" and run.predictions_file.name == "predictions.npz"
    assert run.teachers == teachers_dir(tmp_path / "runs") == tmp_path / "runs" / "teachers"
    run.path.mkdir(parents=True)
    arrays = {"index": np.arange(3, dtype=np.int64), "label": np.zeros(3, dtype=np.int64)}
    run.write_predictions(arrays)
    back = run.predictions()
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert sorted(p.name for p in run.path.iterdir()) == ["predictions.npz"]  # no temporary file left
