"""Faults injected into real runs: a full disk, an unwritable output directory, a NaN on one rank
of two, and a tampered checkpoint (safe loading). The injection lives in tests/fault_inject.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    SMOKE,
    check_ok,
    launch_train,
    read_metrics,
    run_train,
    signal_after_checkpoint,
    subprocess_env,
)

INJECT = "tests/fault_inject.py"


def inject(fault: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, INJECT, *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env=subprocess_env(DISTILL_FAULT=fault), timeout=300
    )


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_the_run_resumes_exactly(
    smoke_run: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """The third checkpoint write (step_4, best, then step_8 at the end of epoch 1) hits ENOSPC
    half-way through its model file: the run stops with the path named, step 4 stays the newest
    complete checkpoint, no partial folder is left, and once there is room the same command
    finishes with the uninterrupted run's numbers."""
    args = [str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}"]
    proc = inject("disk_full:3", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    root = tmp_path / "smoke" / "checkpoints"
    assert f"error: cannot write checkpoint {root / 'step_00000008.tmp'}" in proc.stderr
    assert "No space left on device" in proc.stderr
    assert f"the last complete checkpoint ({root / 'step_00000004'}) is kept" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_00000004"]
    assert (root / "step_00000004" / "progress.json").is_file()

    resumed = run_train(*args)
    check_ok(resumed)
    assert f"resuming from {root / 'step_00000004'}" in resumed.stdout
    assert read_metrics(tmp_path / "smoke") == read_metrics(smoke_run)


@pytest.mark.slow
def test_a_kill_right_after_an_epoch_is_evaluated_leaves_no_duplicate_points(
    smoke_run: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """SIGKILL as soon as epoch 1's evaluation reaches metrics.jsonl, while its end-of-epoch
    checkpoints are being written: the resumed run's TensorBoard scalars, val/* included, read
    back exactly like the uninterrupted run's (found by scripts/fault_trials.py: a mid-loop
    checkpoint at the epoch's last step made the resume keep the evaluation's points and log
    them again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}"]
    signal_after_checkpoint(args, tmp_path / "smoke" / "metrics.jsonl", signal.SIGKILL)
    assert not (tmp_path / "smoke" / "summary.json").exists()
    check_ok(run_train(*args))
    assert read_metrics(tmp_path / "smoke") == read_metrics(smoke_run)

    def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
        ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
        ea.Reload()
        tags = [t for t in ea.Tags()["scalars"] if "throughput/" not in t]  # timings differ
        return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags}

    assert scalars(tmp_path / "smoke") == scalars(smoke_run)


@pytest.mark.slow
def test_a_kill_after_the_last_checkpoint_still_summarises_the_logged_epoch(
    smoke_run: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """SIGKILL once the final checkpoint exists, before summary.json: the same command finishes
    the run with the summary the uninterrupted run wrote (its final record, training losses
    included), not a re-evaluation without training sums (found by scripts/fault_trials.py)."""
    args = [str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}"]
    signal_after_checkpoint(args, tmp_path / "smoke" / "checkpoints" / "step_00000016", signal.SIGKILL)
    if (tmp_path / "smoke" / "summary.json").exists():
        pytest.skip("the run finished before the kill landed")
    check_ok(run_train(*args))

    def final(run: Path) -> dict:
        record = json.loads((run / "summary.json").read_text())["final"]
        return {k: v for k, v in record.items() if not k.startswith("throughput/")}

    assert final(tmp_path / "smoke") == final(smoke_run)
    assert read_metrics(tmp_path / "smoke") == read_metrics(smoke_run)


@pytest.mark.slow
def test_an_unwritable_output_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the output directory should be")
    proc = run_train(str(SMOKE), f"run.output_dir={blocker / 'runs'}")
    assert proc.returncode == 2
    assert f"error: cannot write the run directory {blocker / 'runs' / 'smoke'}" in proc.stderr
    assert "Not a directory" in proc.stderr and "choose a writable run.output_dir" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both_ranks_at_the_same_step(tmp_path: Path, teacher_cache: Path) -> None:
    """Rank 1's second loss is NaN; rank 0's stays finite. The collective check at the step-2 log
    must stop both processes there, with the same message, before any checkpoint is written."""
    proc = launch_train(
        str(SMOKE),
        f"run.output_dir={tmp_path}",
        f"teacher.cache_dir={teacher_cache}",
        script=INJECT,
        ACCELERATE_USE_CPU="true",
        DISTILL_FAULT="nan_rank:1:2",
    )
    assert proc.returncode != 0
    message = "error: non-finite loss at epoch 1, step 2 on at least one process; every process stops here"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert not (tmp_path / "smoke" / "checkpoints").exists() or not any((tmp_path / "smoke" / "checkpoints").iterdir())


# -- safe loading ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this would create ``marker``: proof that code ran while loading a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def _checkpoint(tmp_path: Path) -> tuple[object, Path]:
    from accelerate import Accelerator

    from distill.run.checkpoint import TrainingState, save_checkpoint

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = acc.prepare(model, optimizer)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(acc, tmp_path / "checkpoints", "step_00000001", TrainingState(epoch=0, global_step=1))
    return acc, path


def test_resume_loads_nothing_beyond_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill.run.checkpoint import load_checkpoint

    acc, path = _checkpoint(tmp_path)
    calls: list[object] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    progress = load_checkpoint(acc, path)
    assert progress.global_step == 1
    assert calls and all(w is True for w in calls), calls  # optimizer.bin, random_states_0.pkl
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "progress.json",
    }


@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin"])
def test_a_tampered_checkpoint_is_refused_without_running_its_code(tmp_path: Path, victim: str) -> None:
    from distill.errors import RunStateError
    from distill.run.checkpoint import load_checkpoint

    acc, path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker)}, path / victim)
    with pytest.raises(RunStateError, match=rf"checkpoint {path} cannot be loaded safely \(UnpicklingError"):
        load_checkpoint(acc, path)
    assert not marker.exists()


def test_a_damaged_model_file_is_refused_with_the_folder_named(tmp_path: Path) -> None:
    from distill.errors import RunStateError
    from distill.run.checkpoint import load_checkpoint

    acc, path = _checkpoint(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RunStateError, match=rf"checkpoint {path} cannot be loaded safely.*delete that folder"):
        load_checkpoint(acc, path)
    assert json.loads((path / "progress.json").read_text())["global_step"] == 1
