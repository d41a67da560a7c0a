"""export_check.json: what ``python -m distill.export`` proved about an export, as a typed record.

One writer (``write_check``) and one reader (``read_check``); a file without a ``version`` is
from the first layout, which has the same fields less the ones with defaults here, and reads as
it is. Top-1 figures are shares of images (0.6325 is 63.25%); drops are in points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.exports.formats import ExportError

CHECK_FILE = "export_check.json"
CHECK_VERSION = 2


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FormatCheck(_Record):
    """One fp32 format against the PyTorch student on real validation images."""

    file: str
    bytes: int | None = None
    max_abs_diff: float
    ok: bool
    checked_images: int
    max_abs_diff_cls: float | None = None  # transformers' DeiT with teacher: each head too
    max_abs_diff_dist: float | None = None
    architecture: str | None = None  # transformers: the class written


class RunAgreement(_Record):
    """The re-validated student's top-1 against what the run logged for the same weights.

    Equal when both were measured the same way (precision, device, attention kernel). When they
    differ, argmax flips move the top-1 by whole images: it may differ by at most
    ``tolerance_images``, the larger of one image and the flips measured on this machine between
    the re-validation and the run's precision and attention."""

    rule: Literal["exact", "tolerance"] = "exact"
    run_setting: str | None = None  # e.g. "bf16 on cuda, manual attention"
    revalidation_setting: str | None = None
    tolerance_images: int = 0
    difference_images: int | None = None  # |student - run logged| in images; None: nothing logged
    measured_flips: int | None = None  # argmax flips between the two settings, on this machine
    ok: bool = True


class Revalidation(_Record):
    """Every fp32 format, loaded as distill.evaluate loads it, scored on the validation split."""

    split: str
    images: int | None = None
    student_top1: float
    export_top1: float
    run_logged_top1: float | None
    formats: dict[str, float]
    run: RunAgreement = RunAgreement()


class Int8Top1(_Record):
    fp32: float
    int8: float
    drop_points: float


class Latency(_Record):
    """Median CPU milliseconds per batch; ratio is int8 / fp32 (above 1: int8 is slower)."""

    fp32: float
    int8: float
    ratio: float
    repeats: int


class Int8Check(_Record):
    file: str
    bytes: int
    calibration_images: int
    calibration_seed: int
    heads_note: str = ""
    top1: dict[str, Int8Top1]  # one entry: the head the ONNX graph gives
    agreement_with_fp32: float
    fp32_bytes: int
    size_ratio: float
    latency_ms: dict[str, Latency] = {}  # batch size -> figures; empty when not measured
    max_top1_drop_points: float
    ok: bool

    @property
    def head(self) -> str:
        return next(iter(self.top1))

    @property
    def kept(self) -> Int8Top1:
        """The figures of the head the graph gives (fused, or the --head kept)."""
        return self.top1[self.head]


class ExportCheck(_Record):
    version: int = CHECK_VERSION
    checkpoint: str
    ema: bool
    head: str
    formats: dict[str, FormatCheck]
    revalidation: Revalidation
    int8: dict[str, Int8Check] = {}


def write_check(folder: Path, check: ExportCheck) -> Path:
    path = Path(folder) / CHECK_FILE
    path.write_text(check.model_dump_json(indent=1))
    return path


def read_check(folder: Path) -> ExportCheck:
    """The export check of an export folder (or the file itself)."""
    path = Path(folder)
    path = path / CHECK_FILE if path.is_dir() else path
    if not path.is_file():
        raise ExportError(f"{path} does not exist: the folder was not written by python -m distill.export")
    try:
        data = json.loads(path.read_text())
        version = int(data.get("version", 1))
        if version > CHECK_VERSION:
            raise ExportError(f"{path} has version {version}; this distill reads up to {CHECK_VERSION}: upgrade it")
        return ExportCheck.model_validate({**data, "version": version})
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ExportError(f"{path} is not an export check distill can read ({exc})".split("\n")[0]) from None
