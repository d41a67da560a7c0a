"""What a run leaves behind and reports when it cannot start (issue 12): the recipe's inputs are
checked before the run directory is, and a fresh run that fails before its first checkpoint
leaves no folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SMOKE, run_train


@pytest.mark.slow
def test_a_bad_data_path_is_reported_even_for_a_finished_run(smoke_run: Path) -> None:
    proc = run_train(
        str(SMOKE),
        f"run.output_dir={smoke_run.parent}",
        "data.source=imagefolder",
        f"data.path={smoke_run.parent / 'no-such-folder'}",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "no-such-folder" in last and "is not a directory" in last, last
    assert (smoke_run / "summary.json").is_file()  # the finished run is untouched


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"not a weights file")
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path / 'runs'}", f"teacher.checkpoint={weights}")
    assert proc.returncode == 2
    assert "cannot read teacher checkpoint" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs" / "smoke").exists()


def test_a_shared_folder_keeps_its_other_files_after_a_failed_start(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(b"\x00" * 16)
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path / 'runs'}", f"teacher.checkpoint={weights}")
    assert proc.returncode == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_a_missing_student_init_stops_before_anything_runs(tmp_path: Path) -> None:
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path}", f"student.init={tmp_path / 'no-run'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: student.init ") and "does not exist; give a run directory" in last
    assert "teacher" not in proc.stdout  # nothing trained
    assert not (tmp_path / "smoke").exists()
