"""What a run leaves behind and reports when it cannot start: the recipe's inputs are checked
before the run directory is, the teacher before anything of the student exists, a fresh run that
fails before its first checkpoint leaves no folder behind, and run.overwrite=true clears
everything the run owns."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from accelerate import Accelerator

from distill.errors import TeacherError
from distill.recipe.schema import load_recipe
from distill.run.rundir import RunDir
from tests.helpers import SMOKE, run_train


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


def test_a_fresh_run_that_fails_before_its_first_checkpoint_leaves_only_the_other_files(tmp_path: Path) -> None:
    """A bad teacher file stops the run after its directory was prepared: a shared directory keeps
    its other files and loses every file of the run (a run directory of its own is removed
    whole: test_a_teacher_below_the_floor_stops_the_run_before_the_student_is_built)."""
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"not a weights file")
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path / 'runs'}", f"teacher.checkpoint={weights}")
    assert proc.returncode == 2
    assert "cannot read teacher checkpoint" in proc.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_a_teacher_below_the_floor_stops_the_run_before_the_student_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher stage trains the teacher, evaluates it once on the saved weights and refuses it
    (an lr of 1e-9 leaves it at chance) before the student is built, prepared or decoded; the
    teacher leaves the cache and the run leaves no folder."""
    from distill.training import engine, trainer

    evaluations: list[int] = []
    evaluate = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: evaluations.append(1) or evaluate(*a, **k))

    def no_student(*_: object) -> None:
        raise AssertionError("the student was built for a teacher that fails its check")

    monkeypatch.setattr(trainer, "setup_student", no_student)
    recipe = load_recipe(
        SMOKE,
        [f"run.output_dir={tmp_path}", f"teacher.cache_dir={tmp_path / 'teachers'}", "teacher.train.lr=1e-9"],
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(TeacherError) as info:
            trainer.DistillRun(recipe, accelerator=Accelerator(cpu=True)).run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "the teacher the pipeline trained (resnet10t) scores 22.5% top-1" in str(info.value)
    assert evaluations == [1]  # trained here and evaluated once
    assert not any((tmp_path / "teachers").iterdir())  # dropped: the next run trains it again
    assert not (tmp_path / "smoke").exists()


def test_overwrite_clears_everything_the_run_owns(tmp_path: Path) -> None:
    """run.overwrite=true on a finished run: its analysis (naming a checkpoint that the new run
    will not have), predictions, export and teacher copy go with it; other files stay."""
    run = RunDir(tmp_path / "smoke")
    for name in ("analysis", "export", "teacher", "checkpoints/step_00000016"):
        (run.path / name).mkdir(parents=True)
    (run.analysis_dir / "analysis.json").write_text(json.dumps({"checkpoint": "step_00000016"}))
    for name in ("summary.json", "metrics.jsonl", "predictions.npz", "recipe.yaml", "notes.txt"):
        (run.path / name).write_text("{}")
    recipe = load_recipe(SMOKE, [f"run.output_dir={tmp_path}", "run.overwrite=true"])
    assert run.prepare(Accelerator(cpu=True), recipe, []) is None
    assert sorted(p.name for p in run.path.iterdir()) == ["notes.txt", "recipe.yaml"]


def test_a_missing_student_init_stops_before_anything_runs(tmp_path: Path) -> None:
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path}", f"student.init={tmp_path / 'no-run'}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: student.init ") and "does not exist; give a run directory" in last
    assert "teacher" not in proc.stdout  # nothing trained
    assert not (tmp_path / "smoke").exists()
