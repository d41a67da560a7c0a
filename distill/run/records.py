"""Typed records of what a run and the teacher stage leave behind: one writer and one reader each,
with a schema version.

``RunSummary`` is a run's ``summary.json``; ``TrainedTeacher`` is the ``teacher.json`` that the
teacher stage writes beside a teacher it trained. A file without a version field is version 0,
read as version 1 (its fields are the same); a newer version than this code knows is refused
with its number named, rather than read wrongly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distill.errors import RunStateError
from distill.run.tracking import write_atomic

SUMMARY_VERSION = 1
TEACHER_RECORD_VERSION = 1
TEACHER_RECORD_FILE = "teacher.json"


def _check_version(found: Any, known: int, what: str) -> int:
    version = 0 if found is None else found
    if not isinstance(version, int) or version < 0:
        raise RunStateError(f"{what} has an unreadable schema version {found!r}; it was not written by distill")
    if version > known:
        raise RunStateError(
            f"{what} has schema version {version}, newer than this distill reads (up to {known}); "
            "read it with the distill version that wrote it, or upgrade distill"
        )
    return version


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _json(record: Any) -> str:
    # default=str for paths: every field is JSON already or a path.
    return json.dumps(asdict(record), indent=1, default=str)


@dataclass(frozen=True)
class RunSummary:
    """summary.json: the final and best metrics, how long and how fast, the teacher, the
    distillation settings and the data. A teacher-only run fills run, teacher, final, wall time
    and data; a student run fills everything; a field a file lacks reads as its default."""

    run: str | None = None  # the run directory
    final: dict[str, Any] = field(default_factory=dict)  # the last evaluation's record (metrics.jsonl keys)
    wall_time_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)  # trainer.data_info: sizes, class names in output order
    teacher: dict[str, Any] | None = None  # Teacher.describe(); None: no teacher
    best: dict[str, Any] | None = None  # {"val/top1_fused": ..., "epoch": ...}
    epochs: int | None = None  # epochs completed
    steps: int | None = None  # optimizer steps completed
    train_time_s: float | None = None
    throughput_train_img_s: float | None = None
    student_init: dict[str, Any] | None = None  # where the student's weights came from
    distillation: dict[str, Any] | None = None  # the recipe's distillation section
    world_size: int | None = None
    precision: str | None = None
    effective_lr: float | None = None
    teacher_cache: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    metric_notes: dict[str, str] = field(default_factory=dict)
    export: dict[str, Any] | None = None  # export_run_student's report; None: not exported
    version: int = SUMMARY_VERSION

    def to_json(self) -> str:
        return _json(self)

    def as_dict(self) -> dict[str, Any]:
        """The summary as summary.json holds it (the model card reads it so)."""
        return json.loads(self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "summary.json") -> RunSummary:
        _check_version(data.get("version"), SUMMARY_VERSION, where)
        return cls(**{**_known(cls, data), "version": SUMMARY_VERSION})

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls.from_dict(json.loads(Path(path).read_text()), str(path))


@dataclass(frozen=True)
class TrainedTeacher:
    """teacher.json beside a teacher the pipeline trained: what trained it and how it scored.
    Its presence marks the folder complete (the teacher stage writes it last)."""

    architecture: str
    train: dict[str, Any] | None  # the recipe's teacher.train section
    data: dict[str, Any]  # the recipe's data section
    train_time_s: float | None = None
    val_top1: float | None = None  # measured by the teacher stage after saving; None until then
    val_top5: float | None = None
    version: int = TEACHER_RECORD_VERSION

    def write(self, folder: Path) -> None:
        write_atomic(Path(folder) / TEACHER_RECORD_FILE, _json(self))

    @classmethod
    def read(cls, folder: Path) -> TrainedTeacher:
        path = Path(folder) / TEACHER_RECORD_FILE
        data = json.loads(path.read_text())
        _check_version(data.get("version"), TEACHER_RECORD_VERSION, str(path))
        return cls(**{**_known(cls, data), "version": TEACHER_RECORD_VERSION})

    @staticmethod
    def exists(folder: Path) -> bool:
        return (Path(folder) / TEACHER_RECORD_FILE).is_file()
