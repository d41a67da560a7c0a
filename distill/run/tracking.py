"""Run records: metrics.jsonl, TensorBoard scalars and hyper-parameters, other trackers, provenance.

TensorBoard is written with torch's SummaryWriter rather than Accelerate's tracker because a
resumed run must purge the events logged after its checkpoint (``purge_step``) so the event
files read back exactly like an uninterrupted run's; Accelerate's tracker does not expose it.
The other trackers of ``run.trackers`` (wandb, mlflow, ...) are Accelerate's own tracker classes,
built and started here per run rather than through ``Accelerator(log_with=...)``: a study trains
many runs in one launch with one Accelerator, and each run needs a tracker run of its own that a
resume can find again. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from distill.errors import RecipeError

PACKAGES = ("distill", "torch", "torchvision", "timm", "accelerate", "datasets", "tensorboard", "numpy")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old
    file or the new one, never half of one (summary.json marks a run finished)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The commit of the code that ran (with '+dirty' for local changes), if it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def provenance(argv: list[str], world_size: int, device: str) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *argv]) if argv else " ".join(sys.argv),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "world_size": world_size,
        "device": device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


TENSORBOARD = "tensorboard"  # written here with SummaryWriter; a core dependency
TRACKERS_FILE = "trackers.json"  # <run>/trackers.json: each tracker's run id and last step sent


def missing_trackers(names: list[str] | tuple[str, ...]) -> list[str]:
    """The trackers of ``names`` whose package is not installed (Accelerate's own check)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    return [n for n in names if n != TENSORBOARD and n not in available]


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """Refuse, before anything runs, trackers whose package is missing. Accelerate's own
    ``log_with`` drops them with a debug message, so the run would log nowhere and say nothing."""
    missing = missing_trackers(names)
    if missing:
        extras = ",".join(m.replace("_", "-") for m in missing)
        raise RecipeError(
            f"run.trackers names {', '.join(missing)}, whose package is not installed; install it with "
            f"pip install 'distill[{extras}]', or leave it out of run.trackers"
        )


def _tracker_args(
    name: str, run_dir: Path, found: dict[str, Any] | None
) -> tuple[tuple[Any, ...], dict[str, Any], bool]:
    """Accelerate's tracker constructor arguments for one run, and whether they reattach it to
    the tracker run it logged into before a resume (``found``: what trackers.json recorded then).
    The project is the directory that holds the run (a study, or run.output_dir) and the run is
    named after its own directory, as TensorBoard's tb/ sits in it. Trackers not named here
    start a new run on resume."""
    project, run = run_dir.parent.name, run_dir.name
    rid = (found or {}).get("id")
    if name == "mlflow":  # experiment = project (MLFLOW_EXPERIMENT_NAME wins)
        return (project,), {"run_name": run, **({"run_id": rid} if rid else {})}, bool(rid)
    if name == "wandb":
        kwargs = {"name": run, "dir": str(run_dir), **({"id": rid, "resume": "allow"} if rid else {})}
        return (project,), kwargs, bool(rid)
    if name == "dvclive":  # its files in the run; resume=False would delete them
        return (run,), {"dir": str(run_dir / "dvclive"), "resume": found is not None}, found is not None
    if name == "aim":  # one Aim repository per study, named runs in it
        return (run, str(run_dir.parent)), {"run_hash": rid} if rid else {}, bool(rid)
    return (project,), {}, False


def _tracker_id(name: str, tracker: Any) -> str | None:
    """The id that finds this tracker run again (None: the tracker cannot reattach)."""
    run = tracker.tracker
    if name == "mlflow":
        return run.info.run_id
    if name == "wandb":
        return run.id
    if name == "aim":
        return run.hash
    return None


def repair_mlflow_file_store(run_id: str, sent: dict[str, Any]) -> None:
    """Drop from run ``run_id``'s metric files in MLflow's local file store the points a kill
    cut, and those trackers.json does not record as sent (``sent``: its step and that step's keys).

    The file store appends one line per point ("timestamp value step"); a SIGKILL between a
    metric file's creation and its first write leaves it empty, one during a write leaves a last
    line without its end, and MLflow then refuses to read the run ("Metric '...' is malformed. No
    data found."), so the resume could not reattach to it. trackers.json records a step as sent
    only after the tracker returned, so a kill between the two leaves whole points it does not
    know of; the resume sends those steps again, and each would be there twice. A tracking server
    or database writes each point whole; its duplicates are left to it.
    """
    import urllib.parse
    import urllib.request

    import mlflow

    uri = mlflow.get_tracking_uri()
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return
    root = Path(urllib.request.url2pathname(parsed.path)) if parsed.scheme else Path(uri)
    last, keys = int(sent.get("step", -1)), set(sent.get("keys", []))
    for metrics in root.glob(f"*/{run_id}/metrics"):
        for path in [p for p in metrics.rglob("*") if p.is_file()]:
            key = path.relative_to(metrics).as_posix()
            data = path.read_bytes()
            lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
            kept = [line for line in lines if (step := int(line.split()[2])) < last or (step == last and key in keys)]
            if not kept:
                path.unlink()
            elif kept != lines or len(b"".join(kept)) != len(data):
                path.write_bytes(b"".join(kept))


class RunLog:
    """metrics.jsonl (one object per evaluation), TensorBoard events under tb/, and the other
    trackers of ``run.trackers``.

    A resumed run replays the steps between its checkpoint and the kill. TensorBoard purges them
    and writes them again; the other trackers cannot delete what they were sent, so the steps they
    already have are not sent again (a resume reproduces them: the data contract). trackers.json
    records, per tracker, its run id and the last step it was sent with that step's keys.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        resume_epoch: int = 0,
        resume_step: int = 0,
        trackers: list[str] | tuple[str, ...] = (TENSORBOARD,),
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.state_path = run_dir / TRACKERS_FILE
        self.writer = None
        self.trackers: dict[str, Any] = {}  # name -> started Accelerate tracker
        self.state: dict[str, dict[str, Any]] = {}  # trackers.json
        if not enabled:
            return
        self._truncate(resume_epoch)
        if TENSORBOARD in trackers:
            from torch.utils.tensorboard import SummaryWriter

            # Events logged after the checkpoint we resume from are replayed, so drop them.
            purge = resume_step + 1 if resume_step else None
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        others = [t for t in trackers if t != TENSORBOARD]
        if others:
            self._start(others, run_dir, resume_step > 0, config or {})

    def _start(self, names: list[str], run_dir: Path, resumed: bool, config: dict[str, Any]) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_trackers(names)
        before = json.loads(self.state_path.read_text()) if resumed and self.state_path.is_file() else {}
        for name in names:
            args, kwargs, reattached = _tracker_args(name, run_dir, before.get(name))
            if name == "mlflow" and reattached:
                repair_mlflow_file_store(kwargs["run_id"], before[name])
            tracker = LOGGER_TYPE_TO_CLASS[name](*args, **kwargs)
            tracker.start()
            if not reattached:  # a resumed run keeps the configuration it started with
                tracker.store_init_configuration(config)
            self.trackers[name] = tracker
            sent = before[name] if reattached else {"step": -1, "keys": []}
            self.state[name] = {**sent, "id": _tracker_id(name, tracker)}
        write_atomic(self.state_path, json.dumps(self.state, indent=1))

    def _truncate(self, resume_epoch: int) -> None:
        """Keep the evaluations of epochs the resumed checkpoint had completed."""
        if not self.metrics_path.exists():
            return
        kept = [row for row in read_metrics(self.metrics_path.parent) if row.get("epoch", 0) <= resume_epoch]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def scalars(self, values: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.writer is not None:
            for k, v in finite.items():
                self.writer.add_scalar(k, v, global_step=step)
        if self.trackers:
            self._send(finite, step)

    def _send(self, values: dict[str, float], step: int) -> None:
        """``values`` at ``step`` to each other tracker, less what it was sent before a resume."""
        sent = False
        for name, tracker in self.trackers.items():
            seen = self.state[name]
            fresh = {k: v for k, v in values.items() if step > seen["step"] or k not in seen["keys"]}
            if step < seen["step"] or not fresh:
                continue
            tracker.log(fresh, step=step)
            keys = seen["keys"] if step == seen["step"] else []
            seen["step"], seen["keys"], sent = step, sorted({*keys, *fresh}), True
        if sent:
            write_atomic(self.state_path, json.dumps(self.state, indent=1))

    def evaluation(self, record: dict[str, Any]) -> None:
        """Append one evaluation to metrics.jsonl and the trackers."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        # train/*, lr and throughput are already in TensorBoard at every log interval; the
        # epoch averages would put a second point at the same step under the same tag.
        self.scalars({k: v for k, v in record.items() if k.startswith("val")}, step=int(record["step"]))
        if self.writer is not None:
            self.writer.flush()

    def hparams(self, flat_recipe: dict[str, Any], final: dict[str, float]) -> None:
        """The recipe and final metrics in TensorBoard's HPARAMS view (same run directory); the
        other trackers got the recipe as their run's configuration when it started."""
        if self.writer is None:
            return
        metrics = {f"hparam/{k}": v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)}
        self.writer.add_hparams(flat_recipe, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers.values():
            tracker.finish()
        self.trackers = {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per evaluation: the one reader of that file."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
