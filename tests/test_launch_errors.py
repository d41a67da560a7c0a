"""What a failed run looks like through each launcher: exit status and the last line of stderr.

The README promises one ``error:`` line and exit 2 (143 after SIGTERM / Ctrl-C). ``python -m
distill.train`` and ``python -m distill.launch`` keep it, on one process and on several;
``accelerate launch`` turns it into exit 1 with a traceback of its own (pinned here, so the README's
description of it stays true).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from distill.launch import Exit, elastic_exit, run_launch
from tests.helpers import REPO, SMOKE, run_train, signal_after_checkpoint, subprocess_env

ONE = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO = [
    "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
    "--dynamo_backend", "no", "--main_process_port", "0", "--monitor_interval", "0.1",
]  # fmt: skip
LAUNCHERS = {
    "accelerate": [str(Path(sys.executable).with_name("accelerate")), "launch", *ONE],
    "launch-1": [sys.executable, "-m", "distill.launch", *ONE],
    "launch-2": [sys.executable, "-m", "distill.launch", *TWO],
}
STOPPED = "a checkpoint was saved: run the same command to resume"


def launch_cmd(launcher: str, *args: str) -> list[str]:
    return [*LAUNCHERS[launcher], "distill/train.py", *args]


def launch_env() -> dict[str, str]:
    # ACCELERATE_USE_CPU: --multi_gpu on a CPU-only machine gives two real ranks (README).
    return subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


def run_launcher(launcher: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_cmd(launcher, *args), cwd=REPO, capture_output=True, text=True, env=launch_env(), timeout=300
    )


def last_line(err: str) -> str:
    return err.rstrip().splitlines()[-1]


def check_clean(proc: subprocess.CompletedProcess | subprocess.Popen, err: str, status: int, last: str) -> None:
    """Exit ``status``; ``last`` in the last line of stderr; no traceback anywhere."""
    assert proc.returncode == status, f"exit {proc.returncode}\n{err[-3000:]}"
    assert last in last_line(err), err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]


# -- the launcher's choice of status, without launching ---------------------------------------------


def failure(rank: int, code: int) -> ProcessFailure:
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")


@pytest.mark.parametrize(
    ("codes", "status", "rank"),
    [
        ({0: 2, 1: -15}, 2, 0),  # rank 0 refused the recipe; the agent then sent SIGTERM to rank 1
        ({0: -15, 1: 2}, 2, 1),
        ({0: 143, 1: 143}, 143, 0),  # both checkpointed after SIGTERM / Ctrl-C
        ({0: 1, 1: -9}, 137, 1),  # rank 1 killed (OOM); rank 0 then failed in its next collective
        ({0: 1, 1: -15}, 1, 0),  # a bug on rank 0 (its traceback is the message)
    ],
)
def test_the_process_that_explains_a_multi_process_failure_decides_the_status(
    codes: dict[int, int], status: int, rank: int
) -> None:
    stop = elastic_exit(ChildFailedError("distill/train.py", {r: failure(r, c) for r, c in codes.items()}))
    assert (stop.status, stop.who) == (status, f"rank {rank} (local rank {rank}, pid {1000 + rank})")


def test_a_process_killed_by_a_signal_gets_one_error_line_and_128_plus_n(capsys: pytest.CaptureFixture) -> None:
    def killed(_args: object) -> None:
        raise subprocess.CalledProcessError(-signal.SIGKILL, ["python", "distill/train.py"])

    class Args:
        quiet = True

    assert run_launch(Args(), killed) == 137
    err = capsys.readouterr().err
    assert last_line(err) == (
        "error: the training process was killed by SIGKILL (often the out-of-memory killer) and the launch "
        "stopped; run the same command to resume from the newest complete checkpoint"
    )
    assert Exit(2).explanation() is None and Exit(2).status == 2


def test_a_child_status_passes_through_and_quiet_is_overridden() -> None:
    seen = {}

    def refused(args: object) -> None:
        seen["quiet"] = args.quiet
        raise subprocess.CalledProcessError(2, ["python", "distill/train.py"])

    class Args:
        quiet = True

    assert run_launch(Args(), refused) == 2
    assert seen["quiet"] is False  # quiet would make Accelerate exit 1 itself
    assert run_launch(Args(), lambda _args: None) == 0


# -- real launches ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bad_recipe_key_through_each_launcher() -> None:
    key = "did you mean 'train.epochs'?"
    proc = run_train(str(SMOKE), "train.epocs=3")
    check_clean(proc, proc.stderr, 2, key)
    proc = run_launcher("launch-2", str(SMOKE), "train.epocs=3")
    check_clean(proc, proc.stderr, 2, key)
    # accelerate launch: the error line, then its own traceback, exit 1 (README, Troubleshooting).
    proc = run_launcher("accelerate", str(SMOKE), "train.epocs=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert key in proc.stderr
    assert last_line(proc.stderr).startswith("subprocess.CalledProcessError: Command ")
    assert last_line(proc.stderr).endswith("returned non-zero exit status 2.")


@pytest.mark.slow
def test_a_finished_run_is_refused_with_status_2(tmp_path: Path) -> None:
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "summary.json").write_text("{}")  # what makes a run finished (rundir.py)
    args = (str(SMOKE), f"run.output_dir={tmp_path}")
    proc = run_train(*args)
    check_clean(proc, proc.stderr, 2, "already finished (summary.json exists)")
    proc = run_launcher("launch-1", *args)
    check_clean(proc, proc.stderr, 2, "already finished (summary.json exists)")


def interrupt_after_checkpoint(cmd: list[str], marker: Path) -> tuple[subprocess.Popen, str]:
    """Ctrl-C as a terminal sends it: SIGINT to the launcher's process group once ``marker`` exists."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launch_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc, err


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_143(tmp_path: Path, teacher_cache: Path) -> None:
    """Through python -m distill.train, and through distill.launch on two processes (torch's agent
    starts each process in a session of its own: only the launcher can pass Ctrl-C on)."""
    for name in ("train", "launch-2"):
        out = tmp_path / name
        args = [str(SMOKE), f"run.output_dir={out}", f"teacher.cache_dir={teacher_cache}"]
        marker = out / "smoke" / "checkpoints" / "step_00000004"
        if name == "train":
            proc = signal_after_checkpoint(args, marker, signal.SIGINT, capture=True)
            _, err = proc.communicate(timeout=120)
        else:
            proc, err = interrupt_after_checkpoint(launch_cmd(name, *args), marker)
        check_clean(proc, err, 143, STOPPED)
        assert last_line(err).startswith("error: stopped by SIGINT at ")
        steps = [int(p.name.split("_")[1]) for p in (out / "smoke" / "checkpoints").glob("step_*")]
        assert max(steps) > 4  # the checkpoint written on Ctrl-C, newer than the periodic one
        assert not (out / "smoke" / "summary.json").exists()
