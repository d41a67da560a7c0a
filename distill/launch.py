"""``accelerate launch`` that keeps the run's exit status and leaves its ``error:`` line last.

    python -m distill.launch [accelerate launch options] distill/train.py RECIPE.yaml [a.b=value ...]

Same options, same processes, same environment as ``accelerate launch`` (it calls Accelerate's own
launch code). Why it exists, measured with accelerate 1.15 / torch 2.14 (README, Troubleshooting):
``accelerate launch`` turns every failed run into exit status 1 and prints a report of its own
after the run's ``error:`` line: a ``subprocess.CalledProcessError`` traceback for one process, the
``ChildFailedError`` report of ``torch.distributed.elastic`` for several, a ``KeyboardInterrupt``
traceback (status 130) on Ctrl-C. No launch option or config key changes that (``--quiet`` drops
the traceback of a one-process launch but still exits 1). This launcher exits with the status of
the process that stopped the launch (2: an error to fix, 143: stopped by SIGTERM or Ctrl-C after
checkpointing) and prints nothing after its message.

Signals: SIGINT (Ctrl-C) and SIGTERM sent to the launcher (a terminal, a scheduler, ``kill PID``,
``docker stop``) reach every process of the launch exactly once; they checkpoint and stop with 143.
A second Ctrl-C stops them without checkpointing; a third kills them and the launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from distill.entrypoint import print_error

# Statuses with which a distill command reports its own verdict after printing why (cli.run_guarded):
# 2 = DistillError, 143 = Preempted (checkpointed after SIGTERM / Ctrl-C), 130 = a second Ctrl-C.
OWN_STATUSES = frozenset({2, 130, 143})
# torch.distributed.elastic logs its view of a failure ("failed (exitcode: 2) local_rank: 0 ...",
# "Sending process N closing signal SIGTERM"): held back, and shown only when no process explained it.
ELASTIC_LOGGER = "torch.distributed.elastic"
# The agent runs in a worker thread so that it does not take over SIGINT/SIGTERM (it would send a
# second SIGINT to every process on Ctrl-C); it says so in this warning, which is expected here.
EXPECTED_ELASTIC_WARNING = "Failed to register signal handlers"


@dataclass(frozen=True)
class Exit:
    """What stopped the launch: a process's exit status (negative: killed by that signal)."""

    code: int
    who: str = "the training process"

    @property
    def status(self) -> int:
        """The launcher's exit status: the process's own, or 128 + N after signal N (as a shell)."""
        return 128 - self.code if self.code < 0 else self.code

    def explanation(self) -> str | None:
        """A line for a process that could not explain itself (killed by a signal), else None."""
        if self.code >= 0:
            return None
        try:
            name = signal.Signals(-self.code).name
        except ValueError:
            name = f"signal {-self.code}"
        resume = "run the same command to resume from the newest complete checkpoint"
        if name == "SIGINT":  # a second Ctrl-C while the first one's checkpoint was being saved
            return f"{self.who} stopped on a second Ctrl-C (SIGINT); {resume}"
        hint = " (often the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"{self.who} was killed by {name}{hint} and the launch stopped; {resume}"


def _failure_rank(code: int) -> int:
    """Which failed process explains the launch, lowest first: one that printed its own verdict;
    one killed by a signal other than SIGTERM (the others then fail in their next collective);
    one that exited otherwise (a traceback); last, SIGTERM, which the agent sends to the survivors."""
    if code in OWN_STATUSES:
        return 0
    if code < 0 and code != -signal.SIGTERM:
        return 1
    return 2 if code > 0 else 3


def elastic_exit(exc: Any) -> Exit:
    """The deciding failure of a ``ChildFailedError`` (``failures``: global rank -> ProcessFailure),
    by :func:`_failure_rank`, then torch's own order (first observed), then rank."""
    root, _ = exc.get_first_failure()
    rank, failure = min(exc.failures.items(), key=lambda kv: (_failure_rank(kv[1].exitcode), kv[0] != root, kv[0]))
    return Exit(failure.exitcode, f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid})")


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Hand the held records to the handlers they would have reached (torch's and the root's)."""
        out = logging.getLogger(ELASTIC_LOGGER).parent
        for record in self.records:
            if EXPECTED_ELASTIC_WARNING not in record.getMessage() and out is not None:
                out.handle(record)


@contextmanager
def _elastic_logs_held() -> Iterator[_Held]:
    logger = logging.getLogger(ELASTIC_LOGGER)
    held, propagate = _Held(), logger.propagate
    logger.addHandler(held)
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(held)
        logger.propagate = propagate


def _pass_on(signum: int, everyone: bool) -> None:
    """Send ``signum`` to the launched processes. torch.distributed.elastic starts each process in
    a session of its own (the terminal cannot reach it): signal its whole group, as torchrun does.
    A process in the launcher's own group (Accelerate's one-process launch) already received a
    Ctrl-C from the terminal: it gets the signal only when ``everyone``."""
    import psutil

    own_group = os.getpgrp()
    for child in psutil.Process().children():
        try:
            group = os.getpgid(child.pid)
            if group != own_group:
                os.killpg(group, signum)
            elif everyone:
                os.kill(child.pid, signum)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass  # it exited meanwhile


@contextmanager
def _signals_passed_on() -> Iterator[None]:
    """SIGTERM to the launcher goes on to every process; SIGINT (Ctrl-C) to those the terminal
    cannot reach. Twice (the trainer's "stop now" is a second Ctrl-C); the third one kills the
    processes and interrupts the launcher."""
    interrupts = 0

    def on_term(signum: int, _frame: Any) -> None:
        _pass_on(signum, everyone=True)

    def on_int(signum: int, _frame: Any) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts < 3:
            _pass_on(signum, everyone=False)
            return
        _pass_on(signal.SIGKILL, everyone=True)
        raise KeyboardInterrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _outcome_of(launch: Any, args: Any) -> BaseException | None:
    """Run ``launch(args)`` in a worker thread (see EXPECTED_ELASTIC_WARNING); its exception or None."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            launch(args)
            outcome.append(None)
        except BaseException as exc:  # handed to the main thread, judged there
            outcome.append(exc)

    worker = threading.Thread(target=target, name="accelerate-launch", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # short waits: signal handlers run in the main thread between them
    return outcome[0] if outcome else None


def run_launch(args: Any, launch: Any = None) -> int:
    """Launch as ``accelerate launch`` would (``launch``: Accelerate's ``launch_command``); return
    the status of the process that stopped the launch."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if launch is None:
        from accelerate.commands.launch import launch_command as launch
    args.quiet = False  # quiet turns a one-process failure into sys.exit(1): the status is lost
    with _elastic_logs_held() as held, _signals_passed_on():
        try:
            outcome = _outcome_of(launch, args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
    if outcome is None:
        return 0
    if isinstance(outcome, subprocess.CalledProcessError):
        stop = Exit(outcome.returncode)
    elif isinstance(outcome, ChildFailedError):
        stop = elastic_exit(outcome)
    elif isinstance(outcome, SystemExit):
        code = outcome.code
        return code if isinstance(code, int) else 1
    else:
        raise outcome  # the launch itself failed (a bad option, a port in use): Accelerate's message
    if stop.code not in OWN_STATUSES:
        held.replay()
    if (line := stop.explanation()) is not None:
        print_error(line)
    return stop.status


def default_threads(args: Any, physical_cores: int | None = None) -> int | None:
    """Threads per process when the user passed no --num_cpu_threads_per_process and set no
    OMP_NUM_THREADS, on a machine without GPUs: the physical cores shared by the processes of
    this machine. Accelerate gives each process one thread there unless the config says
    use_cpu (measured: 1,150 img/s against 1,900 through ``python -m distill.train``). None:
    leave Accelerate's choice."""
    if args.num_cpu_threads_per_process is not None or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    processes, machines = args.num_processes, args.num_machines
    if processes is None or machines is None:
        from accelerate.commands.config.config_args import default_config_file, load_config_from_file

        config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
        config = load_config_from_file(config_file) if config_file else None
        processes = processes or (config.num_processes if config is not None else 1)
        machines = machines or (config.num_machines if config is not None else 1)
    if physical_cores is None:
        import psutil

        physical_cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    per_machine = max(int(processes or 1) // max(int(machines or 1), 1), 1)
    return max(physical_cores // per_machine, 1)


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    parser.prog = "python -m distill.launch"
    parser.usage = "python -m distill.launch [accelerate launch options] distill/train.py RECIPE.yaml [a.b=value ...]"
    parser.epilog = (
        "accelerate launch with distill's exit statuses: 2 for an error to fix, 143 after SIGTERM or "
        "Ctrl-C (checkpointed), 128+N when a process was killed by signal N."
    )
    args = parser.parse_args(argv)
    threads = default_threads(args)
    if threads is not None:
        args.num_cpu_threads_per_process = threads
        print(f"launch: {threads} CPU threads per process (no --num_cpu_threads_per_process given)", flush=True)
    return run_launch(args)


if __name__ == "__main__":
    sys.exit(main())
