"""Teachers at their own input size (teacher.img_size): the resize inside the teacher and the
choice of size (distill/teacher.py, distill/teacher_stage.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.spec import InputSpec
from distill.models.teacher import FrozenTeacher, FrozenTeacherOptions
from distill.recipe.schema import load_recipe
from distill.training.teacher_stage import teacher_size

HALF = (0.5, 0.5, 0.5)


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.mean(dim=(2, 3))


def test_a_teacher_at_twice_the_students_size_sees_exactly_the_interpolated_batch() -> None:
    recorder = Recorder()
    teacher = FrozenTeacher(recorder, HALF, HALF, HALF, HALF, FrozenTeacherOptions(channels_last=False, size=(32, 32)))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    teacher(x)
    expected = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(recorder.seen[0], expected)
    same = Recorder()
    FrozenTeacher(same, HALF, HALF, HALF, HALF, FrozenTeacherOptions(channels_last=False, size=(16, 16)))(x)
    assert torch.equal(same.seen[0], x)  # at the student's size: untouched


def test_a_non_square_teacher_input_is_resized_then_renormalised() -> None:
    recorder = Recorder()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    FrozenTeacher(recorder, HALF, HALF, mean, std, FrozenTeacherOptions(channels_last=False, size=(24, 20)))(x)
    resized = F.interpolate(x, size=(24, 20), mode="bicubic", align_corners=False, antialias=True)
    expected = (resized * 0.5 + 0.5 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(recorder.seen[0], expected, atol=1e-6)


class Printer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, *args: Any) -> None:
        self.lines.append(" ".join(map(str, args)))


def folder_at(tmp_path: Path, size: int) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"input_size": [3, size, size]}}))
    return tmp_path


def test_teacher_size_asked_recorded_or_the_students(tmp_path: Path) -> None:
    spec = InputSpec((16, 16), HALF, HALF, 1.0, "bicubic")
    printer = Printer()
    folder = folder_at(tmp_path, 32)
    plain = load_recipe(None)
    assert teacher_size(printer, plain, spec, None) == (16, 16)  # a bare file: the student's
    assert teacher_size(printer, plain, spec, folder) == (32, 32)  # a folder: its recorded size
    assert printer.lines == []
    asked = load_recipe(None, ["teacher.img_size=[24, 48]"])
    assert teacher_size(printer, asked, spec, folder) == (24, 48)
    assert printer.lines == [f"warning: teacher {folder} was recorded at 32x32 and runs at 24x48 (teacher.img_size)"]
