"""Fault trials: kill training at random moments, resume it, and demand the same result.

Why this exists: the end-to-end tests kill a run at *one* well-chosen moment (right after a
checkpoint appears). Real crashes (OOM killer, preempted node, power loss) land anywhere: during
start-up, halfway through writing a checkpoint, between the evaluation row and the checkpoint
that records it, while old checkpoints are being pruned. Each of those leaves a different state
on disk, and each must resume from the newest *complete* checkpoint and log exactly what an
uninterrupted run logs. This script samples those moments at random instead of picking them.

Trials mode (default)::

    python scripts/fault_trials.py --trials 20

runs the recipe once uninterrupted (the reference, timed), then for each trial starts the same
command in a fresh output directory, SIGKILLs it after a delay drawn uniformly from
[0.1, 1.0] x the reference wall time, records the checkpoint folders left behind (complete or
partial), runs the same command again to completion and checks that

* it resumed from the newest checkpoint that was complete at kill time (never a partial one),
* metrics.jsonl, minus the timing keys ``throughput/*``, is exactly equal to the reference's,
* summary.json, minus timing values and run-directory paths, is exactly equal too,
* the final checkpoint's model weights are byte-identical,
* TensorBoard's scalars, as TensorBoard reads them back (purges applied), are equal too.

Most random kills land outside the few milliseconds a small model's checkpoint takes to write;
``--kill-at checkpoint-write`` waits, after the random delay, for the next ``*.tmp`` checkpoint
folder to appear and kills 0..``--jitter-ms`` later, so half-written checkpoints are exercised
on purpose. ``--source`` runs the trainer from another tree (e.g. ``git archive HEAD``
unpacked), so a fixed commit can be tested while this checkout is being edited.

By default the recipe runs with every source of randomness that makes exact resume hard
switched on (drop-path, mixup/cutmix, RandAugment, random erasing, two loader workers); pass
``--no-hard`` for the plain recipe. Exit status 1 when any trial differs or loads a partial
checkpoint.

Soak mode::

    python scripts/fault_trials.py --soak 30

trains the quickstart recipe (with ``train.epochs`` raised so it outlasts the soak) for the given
minutes while sampling resident memory (VmRSS, summed over the trainer and all its descendant
processes, read from /proc; no psutil), then stops it with SIGTERM (the trainer checkpoints and
exits 143, which is expected). It reports RSS at the end of the first epoch, the maximum, the
last sample and growth relative to the end of the first epoch, and exits 1 when that growth
exceeds ``--max-growth`` percent. Summed RSS counts pages shared between the trainer and forked
loader workers more than once; it is a leak detector, not an accounting of memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Every source of randomness that makes exact resume hard (tests/test_train_variants.py uses it too).
HARD_OVERRIDES = (
    "student.drop_path=0.1",
    "data.augment.mixup=0.8",
    "data.augment.cutmix=1.0",
    "data.augment.auto_augment=rand-m9-mstd0.5-inc1",
    "data.augment.re_prob=0.25",
    "data.num_workers=2",
)
TIMING_PREFIXES = ("throughput/",)  # metrics.jsonl keys that depend on the clock
SUMMARY_TIMING = {"wall_time_s", "train_time_s", "throughput_train_img_s"}
RESUME_RE = re.compile(r"resuming from (\S+) \(epoch (\d+), step (\d+)\)")
STEP_RE = re.compile(r"^step_(\d+)")
MARKER = "progress.json"


# -- processes ------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
    return env


def train_command(recipe: Path, output_dir: Path, teacher_cache: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "distill.train",
        str(recipe),
        f"run.output_dir={output_dir}",
        f"teacher.cache_dir={teacher_cache}",
        *overrides,
    ]


def start(cmd: list[str], log: Path, source: Path) -> subprocess.Popen:
    """Start ``cmd`` in ``source`` (``python -m`` imports distill from there), stdout and stderr
    into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=source, env=child_env(), stdout=f, stderr=subprocess.STDOUT)


def run_to_end(cmd: list[str], log: Path, timeout: float, source: Path) -> tuple[int, float, str]:
    """Run ``cmd`` to completion; (exit status, wall seconds, its output)."""
    t0 = time.perf_counter()
    proc = start(cmd, log, source)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        rc = -9
    return rc, time.perf_counter() - t0, log.read_text(errors="replace")


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid``, found by walking /proc."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry), st[1]))
    found: list[tuple[int, int]] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc`` (as a crash would), then any of its descendants (DataLoader workers)
    still alive, each by pid and only if it is the same process (same start time). Returns how
    many descendants had to be killed."""
    family = descendants(proc.pid)
    proc.kill()
    proc.wait()
    killed = 0
    for pid, started in family:
        st = _stat(pid)
        if st is not None and st[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB summed over ``pid`` and its descendants, number of processes counted)."""
    total, count = 0, 0
    for p in [pid, *(d for d, _ in descendants(pid))]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    count += 1
                    break
        except OSError:
            continue  # ended between the walk and the read
    return total, count


# -- run directories ------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def count_rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def normalised_summary(run_dir: Path) -> Any:
    """summary.json without timing values, with the run directory replaced by ``<run>``."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError as exc:  # e.g. truncated by the kill
        return f"<unreadable summary.json: {exc}>"
    prefix = str(run_dir)

    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if k not in SUMMARY_TIMING and not k.startswith(TIMING_PREFIXES)}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, str):
            return v.replace(prefix, "<run>")
        return v

    return clean(summary)


def final_weights_sha(run_dir: Path) -> str | None:
    """sha256 of model.safetensors in the newest complete step checkpoint."""
    complete = [c for c in snapshot(run_dir / "checkpoints") if c["complete"] and c["step"] is not None]
    if not complete:
        return None
    newest = max(complete, key=lambda c: c["step"])
    path = run_dir / "checkpoints" / newest["name"] / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def snapshot(root: Path) -> list[dict[str, Any]]:
    """Every folder under checkpoints/: name, step, complete (distill's rule: no ``.tmp``
    suffix and a progress.json), and its file names."""
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        files = sorted(f.name for f in p.iterdir()) if p.is_dir() else []
        m = STEP_RE.match(p.name)
        out.append(
            {
                "name": p.name,
                "step": int(m.group(1)) if m else None,
                "complete": not p.name.endswith(".tmp") and MARKER in files,
                "files": files,
            }
        )
    return out


def diff_rows(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> list[str]:
    """Human-readable differences between two metrics tables (exact comparison)."""
    out = []
    if len(ref) != len(got):
        out.append(f"{len(got)} rows, reference has {len(ref)}")
    for i, (a, b) in enumerate(zip(ref, got)):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<missing>") != b.get(k, "<missing>"):
                out.append(f"row {i} (epoch {a.get('epoch')}) {k}: reference {a.get(k)!r}, resumed {b.get(k)!r}")
    return out


def diff_tree(ref: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(ref, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(ref) | set(got)):
            out += diff_tree(ref.get(k, "<missing>"), got.get(k, "<missing>"), f"{path}.{k}" if path else k)
        return out
    return [] if ref == got else [f"summary {path}: reference {ref!r}, resumed {got!r}"]


# -- trials ---------------------------------------------------------------------------------


@dataclass
class Reference:
    wall_s: float
    metrics: list[dict[str, Any]]
    summary: Any
    weights_sha: str | None
    checkpoint_files: list[str]  # what a complete step checkpoint holds
    tb: dict[str, list[list[float]]] | None


@dataclass
class Trial:
    index: int
    delay_s: float
    delay_frac: float
    killed: bool = False  # False: the run finished before the kill was due
    summary_at_kill: bool = False  # killed while exiting: summary.json already written
    first_rc: int | None = None
    orphans_killed: int = 0
    step_at_kill: int | None = None  # newest step folder present, complete or partial
    epochs_logged_at_kill: int = 0
    folders_at_kill: list[dict[str, Any]] = field(default_factory=list)
    partial_at_kill: list[str] = field(default_factory=list)
    expected_resume: str | None = None  # newest complete step checkpoint at kill time
    resumed_from: str | None = None
    resume_epoch_step: list[int] | None = None
    resumed_partial: bool = False
    resumed_incomplete_files: list[str] = field(default_factory=list)
    resume_rc: int | None = None
    resume_wall_s: float | None = None
    metrics_identical: bool = False
    summary_identical: bool = False
    weights_identical: bool = False
    tb_identical: bool | None = None  # None: tensorboard not importable here
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        tb = self.tb_identical is not False
        return self.metrics_identical and self.summary_identical and self.weights_identical and tb

    @property
    def ok(self) -> bool:
        return self.identical and not self.resumed_partial and self.resumed_from_expected

    @property
    def resumed_from_expected(self) -> bool:
        if not self.rerun:
            return True
        return Path(self.resumed_from).name == self.expected_resume if self.resumed_from else not self.expected_resume

    @property
    def rerun(self) -> bool:
        """Killed before it finished, so the same command was run again."""
        return self.killed and not self.summary_at_kill


def run_reference(args: argparse.Namespace, workdir: Path, overrides: list[str]) -> Reference:
    """The uninterrupted run every trial is compared with, timed with the teacher already in the
    cache (a run that trains the teacher first is run again, so the kill delays fit a trial)."""
    cmd = train_command(args.recipe, workdir / "reference", args.teacher_cache, overrides)
    for attempt in range(2):
        rc, wall, out = run_to_end(cmd, workdir / "reference.log", args.timeout, args.source)
        if rc != 0:
            raise SystemExit(f"reference run failed (exit {rc}), see {workdir / 'reference.log'}:\n{out[-3000:]}")
        if attempt or "teacher: training" not in out:
            break
        print(
            f"teacher: trained into {args.teacher_cache} (with the reference, {wall:.1f} s); timing again", flush=True
        )
        os.replace(workdir / "reference", workdir / "reference_teacher_trained")
        os.replace(workdir / "reference.log", workdir / "reference_teacher_trained.log")
    run_dir = find_run_dir(workdir / "reference")
    complete = [c for c in snapshot(run_dir / "checkpoints") if c["complete"] and c["step"] is not None]
    ref = Reference(
        wall_s=wall,
        metrics=read_metrics(run_dir),
        summary=normalised_summary(run_dir),
        weights_sha=final_weights_sha(run_dir),
        checkpoint_files=complete[-1]["files"] if complete else [],
        tb=tb_scalars(run_dir),
    )
    steps = ref.summary.get("steps") if isinstance(ref.summary, dict) else None
    print(
        f"reference: {wall:.1f} s wall, {len(ref.metrics)} evaluations, {steps} steps, "
        f"final fused top-1 {ref.metrics[-1].get('val/top1_fused') if ref.metrics else None}",
        flush=True,
    )
    return ref


def find_run_dir(output_dir: Path) -> Path:
    """The single run directory under ``output_dir`` (the recipe's run.name)."""
    dirs = (
        [p for p in output_dir.iterdir() if p.is_dir() and (p / "recipe.yaml").is_file()] if output_dir.is_dir() else []
    )
    if len(dirs) == 1:
        return dirs[0]
    dirs = [p for p in output_dir.iterdir() if p.is_dir()] if output_dir.is_dir() else []
    return dirs[0] if len(dirs) == 1 else output_dir / "<none>"


def run_trial(
    index: int, frac: float, ref: Reference, args: argparse.Namespace, workdir: Path, overrides: list[str]
) -> Trial:
    tdir = workdir / f"trial_{index:02d}"
    tdir.mkdir(parents=True)
    out_dir = tdir / "runs"
    cmd = train_command(args.recipe, out_dir, args.teacher_cache, overrides)
    trial = Trial(index=index, delay_s=frac * ref.wall_s, delay_frac=frac)

    proc = start(cmd, tdir / "first.log", args.source)
    due = time.perf_counter() + trial.delay_s
    while proc.poll() is None and time.perf_counter() < due:
        time.sleep(0.005)
    if args.kill_at == "checkpoint-write":
        # The next checkpoint being written: wait for a *.tmp folder, then a random few ms more
        # so the kill lands at different points of save_state / marker / rename / pruning.
        while proc.poll() is None and not writing_checkpoint(out_dir):
            time.sleep(0.001)
        time.sleep(random.Random(args.seed * 1000 + index).uniform(0, args.jitter_ms / 1000))
    if proc.poll() is None:
        trial.orphans_killed = kill_tree(proc)
        trial.killed = True
    trial.first_rc = proc.returncode

    run_dir = find_run_dir(out_dir)
    # The trainer is dead: what is on disk now is exactly what the second run will find.
    folders = snapshot(run_dir / "checkpoints")
    trial.folders_at_kill = folders
    trial.partial_at_kill = [f["name"] for f in folders if not f["complete"]]
    steps = [f["step"] for f in folders if f["step"] is not None]
    trial.step_at_kill = max(steps) if steps else None
    trial.epochs_logged_at_kill = count_rows(run_dir / "metrics.jsonl")
    complete = sorted((f for f in folders if f["complete"] and f["step"] is not None), key=lambda f: f["step"])
    trial.expected_resume = complete[-1]["name"] if complete else None
    # Killed while exiting (export, TensorBoard, interpreter shutdown): the run is finished and
    # the same command would be refused, as it should be.
    trial.summary_at_kill = trial.killed and (run_dir / "summary.json").is_file()

    if trial.rerun:
        rc, wall, out = run_to_end(cmd, tdir / "resume.log", args.timeout, args.source)
        trial.resume_rc, trial.resume_wall_s = rc, wall
        if rc != 0:
            trial.differences.append(f"resumed run exited {rc}: {out.strip().splitlines()[-1:]}")
        m = RESUME_RE.search(out)
        if m:
            trial.resumed_from = m.group(1)
            trial.resume_epoch_step = [int(m.group(2)), int(m.group(3))]
            at_kill = {f["name"]: f for f in folders}.get(Path(m.group(1)).name)
            trial.resumed_partial = at_kill is None or not at_kill["complete"]
            if at_kill is not None:
                trial.resumed_incomplete_files = sorted(set(ref.checkpoint_files) - set(at_kill["files"]))
                if trial.resumed_incomplete_files:
                    trial.resumed_partial = True
        if not trial.resumed_from_expected:
            got, want = trial.resumed_from or "(fresh start)", trial.expected_resume or "(fresh start)"
            trial.differences.append(f"resumed from {got}, expected {want}")
    elif not trial.killed and trial.first_rc != 0:
        trial.differences.append(f"run exited {trial.first_rc} before the kill was due")

    run_dir = find_run_dir(out_dir)
    got = read_metrics(run_dir)
    trial.metrics_identical = got == ref.metrics
    trial.differences += diff_rows(ref.metrics, got)
    summary = normalised_summary(run_dir)
    trial.summary_identical = summary == ref.summary
    trial.differences += diff_tree(ref.summary, summary)
    sha = final_weights_sha(run_dir)
    trial.weights_identical = sha is not None and sha == ref.weights_sha
    if not trial.weights_identical:
        trial.differences.append(f"final model.safetensors sha256 {sha} != reference {ref.weights_sha}")
    if ref.tb is not None:
        tb = tb_scalars(run_dir)
        trial.tb_identical = tb == ref.tb
        trial.differences += diff_tb(ref.tb, tb or {})
    return trial


def writing_checkpoint(out_dir: Path) -> bool:
    """A ``*.tmp`` folder exists under ``<out_dir>/<run>/checkpoints``."""
    try:
        runs = [e.path for e in os.scandir(out_dir) if e.is_dir()]
        return any(e.name.endswith(".tmp") for r in runs for e in os.scandir(Path(r) / "checkpoints"))
    except OSError:
        return False


def tb_scalars(run_dir: Path) -> dict[str, list[list[float]]] | None:
    """TensorBoard scalars as read back by TensorBoard (purges applied): tag -> [[step, value]],
    timing tags left out. None when tensorboard cannot be imported."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    if not (run_dir / "tb").is_dir():
        return {}
    # A resumed run's purge is expected; TensorBoard logs a warning for every one it applies.
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {
        tag: [[e.step, e.value] for e in ea.Scalars(tag)]
        for tag in sorted(ea.Tags()["scalars"])
        if not any(t in tag for t in TIMING_PREFIXES)  # also hparam/throughput/...
    }


def diff_tb(ref: dict[str, list[list[float]]], got: dict[str, list[list[float]]]) -> list[str]:
    """Per tag: points the resumed run has more of than the reference (duplicates included) and
    points it lacks, as [step, value]."""
    out = []
    for tag in sorted(set(ref) | set(got)):
        a, b = ref.get(tag, []), got.get(tag, [])
        if a == b:
            continue
        ca, cb = Counter(map(tuple, a)), Counter(map(tuple, b))
        extra, missing = sorted((cb - ca).elements()), sorted((ca - cb).elements())
        out.append(
            f"tensorboard {tag}: {len(b)} points, reference {len(a)}; extra {[list(x) for x in extra[:4]]}, "
            f"missing {[list(x) for x in missing[:4]]}" + ("" if extra or missing else " (order differs)")
        )
    return out


def trial_line(t: Trial) -> str:
    if not t.killed:
        where = "finished before kill"
    elif t.summary_at_kill:
        where = "killed while exiting (summary written)"
    elif t.step_at_kill is None:
        where = "killed before any checkpoint"
    else:
        where = f"killed, newest ckpt step {t.step_at_kill}, {t.epochs_logged_at_kill} epoch(s) logged"
    partial = ",".join(t.partial_at_kill) or "-"
    if t.resumed_from and t.resume_epoch_step:
        epoch, step = t.resume_epoch_step
        resumed = f"{Path(t.resumed_from).name} (epoch {epoch}, step {step})"
    else:
        resumed = "(fresh start)" if t.rerun else "-"
    flags = "" if t.ok else "  FAIL"
    return (
        f"trial {t.index:2d}  delay {t.delay_s:6.2f} s ({t.delay_frac:.2f}x)  {where:<46}  partial: {partial:<20}"
        f"  resumed from: {resumed:<34}  identical: {'yes' if t.identical else 'no'}{flags}"
    )


def trials_mode(args: argparse.Namespace) -> int:
    workdir = prepare_workdir(args.workdir, "fault_trials-")
    args.teacher_cache = (args.teacher_cache or workdir / "teachers").resolve()
    overrides = [*(HARD_OVERRIDES if args.hard else ()), *args.set]
    print(f"workdir: {workdir}", flush=True)
    print(f"source: {args.source}", flush=True)
    print(f"recipe: {args.recipe}  overrides: {' '.join(overrides) or '(none)'}  kill at: {args.kill_at}", flush=True)
    t0 = time.perf_counter()
    ref = run_reference(args, workdir, overrides)
    rng = random.Random(args.seed)
    fracs = [rng.uniform(0.1, 1.0) for _ in range(args.trials)]
    trials = []
    for i, frac in enumerate(fracs, 1):
        trial = run_trial(i, frac, ref, args, workdir, overrides)
        trials.append(trial)
        print(trial_line(trial), flush=True)
        for d in trial.differences[:20]:
            print(f"    {d}", flush=True)
    total = time.perf_counter() - t0

    identical = sum(t.identical for t in trials)
    loaded_partial = sum(t.resumed_partial for t in trials)
    left_partial = sum(bool(t.partial_at_kill) for t in trials if t.killed)
    finished = sum(not t.killed for t in trials)
    exiting = sum(t.summary_at_kill for t in trials)
    fresh = sum(t.rerun and t.resumed_from is None for t in trials)
    wrong_choice = sum(not t.resumed_from_expected for t in trials)
    failed = [t.index for t in trials if not t.ok]
    print(
        f"\n{identical}/{len(trials)} identical to the reference; {loaded_partial} trials loaded a partial "
        f"checkpoint; {left_partial} kills left a partial folder",
        flush=True,
    )
    print(
        f"{finished} finished before the kill; {exiting} killed after summary.json was written; "
        f"{fresh} restarted from scratch (killed before the first checkpoint); "
        f"{wrong_choice} resumed from other than the newest complete checkpoint; "
        f"reference {ref.wall_s:.1f} s; total {total:.0f} s",
        flush=True,
    )
    if failed:
        print(f"FAILED trials: {failed} (logs under {workdir})", flush=True)
    if args.json:
        result = {
            "mode": "trials",
            "source": str(args.source),
            "recipe": str(args.recipe),
            "overrides": overrides,
            "seed": args.seed,
            "kill_at": args.kill_at,
            "workdir": str(workdir),
            "reference": {"wall_s": ref.wall_s, "metrics": ref.metrics, "weights_sha256": ref.weights_sha},
            "trials": [{**asdict(t), "identical": t.identical, "ok": t.ok, "rerun": t.rerun} for t in trials],
            "identical": identical,
            "loaded_partial": loaded_partial,
            "kills_left_partial": left_partial,
            "finished_before_kill": finished,
            "killed_after_summary": exiting,
            "total_s": total,
            "failed": failed,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


# -- soak -----------------------------------------------------------------------------------


def soak_mode(args: argparse.Namespace) -> int:
    workdir = prepare_workdir(args.workdir, "soak-")
    args.teacher_cache = (args.teacher_cache or workdir / "teachers").resolve()
    overrides = ["train.epochs=100000", "run.export=false", *args.set]
    out_dir = workdir / "soak"
    cmd = train_command(args.recipe, out_dir, args.teacher_cache, overrides)
    print(f"workdir: {workdir}\nsource: {args.source}\ncommand: {' '.join(cmd)}", flush=True)
    proc = start(cmd, workdir / "soak.log", args.source)
    t0 = time.perf_counter()
    end = t0 + args.soak * 60
    samples: list[dict[str, Any]] = []
    epochs, next_sample = 0, t0
    while proc.poll() is None and time.perf_counter() < end:
        now = time.perf_counter()
        rows = count_rows(out_dir_run(out_dir) / "metrics.jsonl")
        if now >= next_sample or rows != epochs:  # also sample the moment an epoch is logged
            kib, nproc = rss_kib(proc.pid)
            if nproc:
                samples.append(
                    {"elapsed_s": round(now - t0, 2), "epoch": rows, "rss_mib": kib / 1024, "processes": nproc}
                )
            epochs = rows
            if now >= next_sample:
                next_sample += args.interval
        time.sleep(0.2)
    stopped_early = proc.poll() is not None
    if not stopped_early:
        proc.send_signal(signal.SIGTERM)  # the trainer checkpoints at its next log step, exits 143
        try:
            proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
    rc = proc.returncode
    wall = time.perf_counter() - t0

    print(f"\n{'elapsed s':>10}  {'epoch':>5}  {'RSS MiB':>8}  processes")
    for s in samples:
        print(f"{s['elapsed_s']:10.1f}  {s['epoch']:5d}  {s['rss_mib']:8.1f}  {s['processes']}")
    first = next((s for s in samples if s["epoch"] >= 1), None)
    peak = max(samples, key=lambda s: s["rss_mib"]) if samples else None
    last = samples[-1] if samples else None
    growth = growth_max = None
    if first is not None and last is not None and peak is not None:
        growth = 100 * (last["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
        growth_max = 100 * (peak["rss_mib"] - first["rss_mib"]) / first["rss_mib"]
    # 143: the trainer checkpointed and stopped; -15: SIGTERM came before it installed its handler.
    expected_rc = rc in (143, -signal.SIGTERM) or (stopped_early and rc == 0)
    print(
        f"\nsoak: {wall:.0f} s, {epochs} epochs, exit {rc}{' (SIGTERM, expected)' if rc == 143 else ''}; "
        f"RSS end of epoch 1 {fmt_mib(first)}, max {fmt_mib(peak)}, last {fmt_mib(last)}; "
        f"growth {fmt_pct(growth)} (max {fmt_pct(growth_max)}) vs end of epoch 1, limit {args.max_growth}%",
        flush=True,
    )
    if first is None:
        print("no epoch finished during the soak: growth is unknown (soak longer)", flush=True)
    if args.json:
        result = {
            "mode": "soak",
            "recipe": str(args.recipe),
            "command": cmd,
            "minutes": args.soak,
            "interval_s": args.interval,
            "exit_code": rc,
            "wall_s": wall,
            "epochs": epochs,
            "samples": samples,
            "rss_first_epoch_mib": first["rss_mib"] if first else None,
            "rss_max_mib": peak["rss_mib"] if peak else None,
            "rss_last_mib": last["rss_mib"] if last else None,
            "growth_pct": growth,
            "growth_max_pct": growth_max,
            "max_growth_pct": args.max_growth,
        }
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not expected_rc:
        print(f"unexpected exit status {rc}, see {workdir / 'soak.log'}", flush=True)
        return 1
    return 1 if growth is not None and growth > args.max_growth else 0


def out_dir_run(out_dir: Path) -> Path:
    return find_run_dir(out_dir) if out_dir.is_dir() else out_dir / "<none>"


def fmt_mib(sample: dict[str, Any] | None) -> str:
    return f"{sample['rss_mib']:.1f} MiB" if sample else "n/a"


def fmt_pct(v: float | None) -> str:
    return f"{v:+.1f}%" if v is not None else "n/a"


# -- entry point ----------------------------------------------------------------------------


def prepare_workdir(given: Path | None, prefix: str) -> Path:
    if given is None:
        return Path(tempfile.mkdtemp(prefix=prefix)).resolve()
    given.mkdir(parents=True, exist_ok=True)
    if any(given.iterdir()):
        raise SystemExit(f"--workdir {given} is not empty; every trial needs fresh output directories")
    return given.resolve()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Kill training at random moments and check the resumed run is identical (trials), "
        "or watch resident memory over a long run (--soak).",
    )
    p.add_argument(
        "--recipe", type=Path, help="recipe YAML (trials: recipes/smoke.yaml, soak: recipes/quickstart.yaml)"
    )
    p.add_argument("--trials", type=int, default=20, help="number of kill/resume trials (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random kill times (default 0)")
    p.add_argument("--workdir", type=Path, help="empty folder for all runs and logs (default: a new temp dir, kept)")
    p.add_argument("--teacher-cache", type=Path, help="teacher cache shared by all runs (default: WORKDIR/teachers)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override (repeatable)")
    p.add_argument(
        "--hard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trials: switch on drop-path, mixup/cutmix, RandAugment, random erasing and 2 loader workers "
        "(default on; --no-hard for the plain recipe)",
    )
    p.add_argument(
        "--source",
        type=Path,
        default=REPO,
        help="source tree to run `python -m distill.train` in (default: this checkout); e.g. a "
        "`git archive HEAD` copy, to test one commit while the checkout is being edited",
    )
    p.add_argument(
        "--kill-at",
        choices=("random", "checkpoint-write"),
        default="random",
        help="random: SIGKILL after the random delay (default); checkpoint-write: after the delay, "
        "at the next moment a checkpoint is being written (a *.tmp folder exists) plus 0..--jitter-ms",
    )
    p.add_argument("--jitter-ms", type=float, default=30, help="checkpoint-write: extra random delay (default 30)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed for any one run (default 1800)")
    p.add_argument("--json", type=Path, help="write the results as JSON to this file")
    p.add_argument("--soak", type=float, metavar="MINUTES", help="soak mode: train this long, sampling RSS")
    p.add_argument("--interval", type=float, default=10, help="soak: seconds between RSS samples (default 10)")
    p.add_argument(
        "--max-growth", type=float, default=5.0, help="soak: RSS growth %% after epoch 1 that fails (default 5)"
    )
    args = p.parse_args(argv)
    args.source = args.source.resolve()
    if not (args.source / "distill" / "train.py").is_file():
        p.error(f"--source {args.source} holds no distill/train.py")
    if args.recipe is None:
        args.recipe = args.source / "recipes" / ("quickstart.yaml" if args.soak is not None else "smoke.yaml")
    args.recipe = args.recipe.resolve()
    if args.trials < 1:
        p.error("--trials must be at least 1")
    if args.soak is not None and args.soak <= 0:
        p.error("--soak must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return soak_mode(args) if args.soak is not None else trials_mode(args)


if __name__ == "__main__":
    sys.exit(main())
