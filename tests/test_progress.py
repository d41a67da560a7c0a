"""TrainingState off a terminal: plain lines at an interval and per epoch, with an ETA (distill/progress.py)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from distill.exports.progress import duration
from distill.training.progress import ProgressReport
from tests.helpers import SMOKE, check_ok, run_train

VALUES = {"train/loss": 1.23456, "lr": 1e-3, "throughput/train_img_s": 512.4}


def test_duration_is_compact() -> None:
    assert [duration(s) for s in (0, 59.4, 60, 245, 3599, 3600, 7380, float("nan"))] == [
        "0s", "59s", "1m00s", "4m05s", "59m59s", "1h00m", "2h03m", "?",
    ]  # fmt: skip


def test_lines_at_the_interval_with_loss_lr_speed_elapsed_and_eta() -> None:
    out = io.StringIO()
    report = ProgressReport("student", total=10, done=0, epochs=2, enabled=True, interval_s=0.0, stream=out)
    report.begin_epoch(0)
    report.values(VALUES)
    report.step()
    line = out.getvalue().strip()
    assert re.fullmatch(
        r"student: epoch 1/2  step 1/10  loss 1\.2346  lr 1\.00e-03  512 img/s  elapsed \d+s  eta \d+s", line
    ), line
    report.epoch_end(1, 2.0, 320)
    assert out.getvalue().strip().splitlines()[-1].startswith("student: epoch 1/2 done in 2s (160 img/s)  eta ")


def test_no_line_before_the_interval_and_none_off_the_main_process() -> None:
    out = io.StringIO()
    report = ProgressReport("teacher", total=10, done=0, epochs=1, enabled=True, interval_s=3600.0, stream=out)
    for _ in range(5):
        report.step()
    assert out.getvalue() == ""
    quiet = io.StringIO()
    other = ProgressReport("teacher", total=10, done=0, epochs=1, enabled=False, interval_s=0.0, stream=quiet)
    other.step()
    other.epoch_end(1, 1.0, 10)
    assert quiet.getvalue() == ""


def test_eta_counts_this_sessions_pace_from_a_resumed_step() -> None:
    report = ProgressReport("student", total=100, done=50, epochs=2, enabled=False)
    assert report.eta_s() != report.eta_s()  # nan: no step done yet in this session
    report.start -= 10.0  # 10 s spent on the next 10 steps
    for _ in range(10):
        report.step()
    assert report.eta_s() == pytest.approx(40.0, rel=0.05)  # 40 steps left at 1 s each


@pytest.mark.slow
def test_a_run_logging_to_a_file_shows_teacher_and_student_progress(tmp_path: Path) -> None:
    """stdout captured (not a terminal), as on a cluster: lines for both stages with an ETA."""
    proc = run_train(
        str(SMOKE),
        f"run.output_dir={tmp_path}",
        f"teacher.cache_dir={tmp_path / 'teachers'}",  # a fresh cache: the teacher trains here
        "run.progress_every_s=0.01",
        "run.export=false",
    )
    check_ok(proc)
    lines = proc.stdout.splitlines()
    for stage in ("teacher", "student"):
        steps = [s for s in lines if re.match(rf"{stage}: epoch \d/2  step \d+/16  .*elapsed .*eta ", s)]
        assert len(steps) >= 4, (stage, lines)
        assert any(re.match(rf"{stage}: epoch 1/2 done in \d+s \(\d+ img/s\)", s) for s in lines), (stage, lines)
    assert any("loss" in s and "lr" in s and "img/s" in s for s in lines if s.startswith("student: epoch"))


def test_study_eta_from_seconds_per_epoch_of_the_runs_trained_here() -> None:
    from distill.training.progress import StudyProgress

    study = StudyProgress([2, 2, 4, 2])
    study.skipped(0)  # finished by an earlier, interrupted study: done, and no time of ours
    assert study.eta_s() != study.eta_s()  # nan until a run is timed
    study.finished(1, 30.0)  # 15 s per epoch
    assert study.eta_s() == pytest.approx(15.0 * (4 + 2))
    assert study.line(1, "soft-seed0", 30.0) == "study: [2/4] soft-seed0 finished in 30s; 2 runs left, eta 1m30s"
    study.finished(2, 60.0)
    study.finished(3, 30.0)
    assert study.line(3, "hard-seed1", 30.0) == "study: [4/4] hard-seed1 finished in 30s; done"


def test_study_eta_leaves_out_the_teacher_training_the_other_runs_reuse() -> None:
    from distill.training.progress import StudyProgress

    study = StudyProgress([8, 8, 8])
    study.finished(0, 400.0, one_off=200.0)  # the first run trained the teacher for 200 s
    assert study.eta_s() == pytest.approx(200.0 / 8 * 16)  # 25 s per epoch, not 50
    line = study.line(0, "none-seed0", 400.0, 200.0)
    assert line == "study: [1/3] none-seed0 finished in 6m40s (teacher training 3m20s, once); 2 runs left, eta 6m40s"
