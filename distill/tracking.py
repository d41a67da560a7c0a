"""Run records: metrics.jsonl, TensorBoard scalars and hyper-parameters, provenance.

TensorBoard is written with torch's SummaryWriter rather than Accelerate's tracker because a
resumed run must purge the events logged after its checkpoint (``purge_step``) so the event
files read back exactly like an uninterrupted run's; Accelerate's tracker does not expose it.
Only the main process writes.
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


class RunLog:
    """metrics.jsonl (one object per evaluation) and TensorBoard events under tb/."""

    def __init__(self, run_dir: Path, enabled: bool, resume_epoch: int = 0, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate(resume_epoch)
        from torch.utils.tensorboard import SummaryWriter

        # Events logged after the checkpoint we resume from are replayed, so drop them.
        purge = resume_step + 1 if resume_step else None
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def _truncate(self, resume_epoch: int) -> None:
        """Keep the evaluations of epochs the resumed checkpoint had completed."""
        if not self.metrics_path.exists():
            return
        kept = [row for row in read_metrics(self.metrics_path.parent) if row.get("epoch", 0) <= resume_epoch]
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, global_step=step)

    def evaluation(self, record: dict[str, Any]) -> None:
        """Append one evaluation to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        # train/*, lr and throughput are already in TensorBoard at every log interval; the
        # epoch averages would put a second point at the same step under the same tag.
        self.scalars({k: v for k, v in record.items() if k.startswith("val")}, step=int(record["step"]))
        self.writer.flush()

    def hparams(self, flat_recipe: dict[str, Any], final: dict[str, float]) -> None:
        """The recipe and final metrics in TensorBoard's HPARAMS view (same run directory)."""
        if self.writer is None:
            return
        metrics = {f"hparam/{k}": v for k, v in final.items() if isinstance(v, float) and math.isfinite(v)}
        self.writer.add_hparams(flat_recipe, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one dict per evaluation: the one reader of that file."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
