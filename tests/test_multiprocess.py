"""Processes of one launch that see the file system differently: the main process decides, the
others follow, and a launch whose processes cannot share the run's files stops with one error
(two gloo processes on the CPU, faults injected by tests/fault_inject.py on process 1)."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tests.helpers import SMOKE, check_ok, launch_train, read_metrics

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on the CPU (ACCELERATE_USE_CPU)")
FAULTS = "tests/fault_inject.py"


def launch(out: Path, teacher_cache: Path, *extra: str, fault: str | None = None, timeout: int = 300):
    env = {"ACCELERATE_USE_CPU": "true", **({"DISTILL_FAULT": fault} if fault else {})}
    args = (str(SMOKE), f"run.output_dir={out}", f"teacher.cache_dir={teacher_cache}", "run.export=false", *extra)
    # A hang would be a failure here: the process group gives up after a minute, the test after `timeout`.
    return launch_train(
        *args, "run.process_group_timeout_min=1", script=FAULTS if fault else "distill/train.py", timeout=timeout, **env
    )


def test_the_process_group_waits_as_long_as_the_recipe_says() -> None:
    from accelerate.utils import InitProcessGroupKwargs

    from distill.recipe.schema import load_recipe
    from distill.run.processes import accelerator_options

    options = accelerator_options(load_recipe(SMOKE, ["run.process_group_timeout_min=90"]))
    (handler,) = options["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs) and handler.timeout == timedelta(minutes=90)
    assert options["dataloader_config"].non_blocking is True
    assert accelerator_options(load_recipe(SMOKE, []))["kwargs_handlers"][0].timeout == timedelta(minutes=60)


@pytest.mark.slow
def test_a_stale_listing_on_one_process_follows_the_main_processs_decision(tmp_path: Path, teacher_cache: Path) -> None:
    """Process 1 sees no checkpoint, no summary and no trained teacher. Resuming a run killed
    before its summary, it still resumes the main process's checkpoint and reuses its teacher;
    on a finished run both processes refuse with the same message, at once."""
    check_ok(launch(tmp_path, teacher_cache, "train.epochs=1"))
    run = tmp_path / "smoke"
    logged = read_metrics(run)
    (run / "summary.json").unlink()  # killed after the last checkpoint, before the summary

    proc = launch(tmp_path, teacher_cache, "train.epochs=1", fault="stale_listing:1")
    check_ok(proc)
    assert "resuming from" in proc.stdout and "teacher: reusing" in proc.stdout
    assert read_metrics(run) == logged  # the logged record, not a re-evaluation
    assert json.loads((run / "summary.json").read_text())["steps"] == logged[-1]["step"]

    proc = launch(tmp_path, teacher_cache, "train.epochs=1", fault="stale_listing:1", timeout=120)
    assert proc.returncode != 0  # the launcher exits 1 when its processes exit 2
    out = proc.stdout + proc.stderr
    assert out.count(f"error: run {run} already finished (summary.json exists)") == 2, out[-3000:]


@pytest.mark.slow
def test_a_node_local_output_dir_stops_the_launch_with_one_message(tmp_path: Path, teacher_cache: Path) -> None:
    proc = launch(tmp_path / "runs", teacher_cache, "train.epochs=1", fault="local_output_dir:1", timeout=120)
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"error: {tmp_path / 'runs'} is not shared between the processes of this launch: process 1 on " in out
    assert "cannot see a file the main process wrote there within 1 s" in out
    assert not (tmp_path / "runs" / "smoke" / "checkpoints").exists()


def test_processes_that_read_different_checkpoints_are_refused(tmp_path: Path) -> None:
    """The digest every process compares: a stale copy of progress.json differs."""
    from distill.run.processes import checkpoint_digest

    a = tmp_path / "a"
    a.mkdir()
    (a / "progress.json").write_text('{"global_step": 16, "train_time": 1.5}')
    (a / "model.safetensors").write_bytes(b"x" * 10)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert checkpoint_digest(a) == checkpoint_digest(b)
    (b / "progress.json").write_text('{"global_step": 16, "train_time": 1.6}')
    assert checkpoint_digest(a) != checkpoint_digest(b)
    assert checkpoint_digest(tmp_path / "none") == "missing"
