"""The teacher: one interface (``Teacher``) and its implementation, a frozen timm convnet.

Everything outside the teacher modules (this one and training/teacher_stage.py) talks to a
teacher through the interface: call it on a student-space batch, ask its fingerprint (what
caches key on) or its description (summary, model card, report). Later teachers (ensembles,
other resolutions) are new implementations, not new fields read across the code.

The teacher is never passed to ``accelerator.prepare``: prepared models are DDP-wrapped and
written into every ``save_state`` checkpoint (measured: model_1/model_2.safetensors appeared).
It is moved to the device, put in eval mode with gradients off, and called under autocast.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distill.errors import TeacherError
from distill.models.labels import name_list, read_label_names
from distill.models.spec import InputSpec
from distill.models.student import create_model, file_sha256, read_state_dict
from distill.recipe.schema import TeacherConfig


class Teacher(Protocol):
    """What the student's run needs from a teacher."""

    spec: InputSpec  # its own resolution and normalisation

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A student-space batch in (the student's size and normalisation), fp32 logits out."""
        ...

    def fingerprint(self) -> str:
        """Identity of its outputs: weights and every setting that changes them (caches key on it)."""
        ...

    def describe(self) -> dict[str, Any]:
        """For summary.json, the model card and the report."""
        ...

    def copy_to(self, folder: Path) -> None:
        """Write the teacher as a folder that ``teacher.checkpoint`` can point at."""
        ...


class ConvnetTeacher:
    """A frozen timm convnet (the one implementation today): the student's batch is
    re-normalised to the teacher's statistics inside, run under the run's autocast."""

    def __init__(
        self,
        module: FrozenTeacher,
        spec: InputSpec,
        architecture: str,
        weights: Path | None,
        trained_here: bool,
        autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.module, self.spec, self.architecture, self.weights = module, spec, architecture, weights
        self.sha256 = file_sha256(weights) if weights is not None else "unsaved"  # the bench's random weights
        self.trained_here = trained_here  # trained by this command (False: a file or the cache)
        self.train_time_s: float | None = None  # the teacher stage's training, when trained_here
        self.val_top1 = math.nan  # set by teacher_stage.check_teacher
        self._autocast = autocast

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.module(images)

    def fingerprint(self) -> str:
        m = self.module
        material = {
            "sha256": self.sha256,
            "architecture": self.architecture,
            "spec": self.spec.timm_config(),
            "inference_mode": m.inference_mode,
            "channels_last": m.channels_last,
            "compiled": m.forward_model is not m.model,
        }
        if m.class_order is not None:  # only when remapped: unremapped teachers keep their cache keys
            material["class_order"] = m.class_order.tolist()
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "weights": str(self.weights) if self.weights is not None else None,
            "sha256": self.sha256,
            "val_top1": self.val_top1,
            "trained_here": self.trained_here,
            **({"train_time_s": self.train_time_s} if self.train_time_s is not None else {}),
            "input": {"size": list(self.spec.size), "mean": list(self.spec.mean), "std": list(self.spec.std)},
            **({"class_order": self.module.class_order.tolist()} if self.module.class_order is not None else {}),
        }

    def copy_to(self, folder: Path) -> None:
        if self.weights is None:
            raise TeacherError("this teacher has random weights and no file to copy")
        shutil.rmtree(folder, ignore_errors=True)
        if self.weights.parent.joinpath("config.json").is_file():
            shutil.copytree(self.weights.parent, folder)
        else:
            folder.mkdir(parents=True)
            shutil.copy2(self.weights, folder / self.weights.name)


def _resolve_checkpoint(cfg: TeacherConfig) -> tuple[str, Path, dict[str, Any]]:
    """(architecture, weights file, extra model args); a timm Hub folder brings its own arch."""
    path = Path(str(cfg.checkpoint)).expanduser()
    if not path.exists():
        raise TeacherError(
            f"teacher.checkpoint {path} does not exist; give a weights file, or remove "
            "teacher.checkpoint and add a teacher.train section to train one"
        )
    if path.is_dir():
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise TeacherError(f"teacher folder {path} lacks config.json and model.safetensors")
        meta = json.loads(config_file.read_text())
        return meta["architecture"], weights, dict(meta.get("model_args", {}))
    if cfg.model is None:
        raise TeacherError(f"teacher.checkpoint {path} is a weights file: set teacher.model to its architecture")
    return cfg.model, path, {}


def checkpoint_architecture(checkpoint: Path | str) -> str | None:
    """The architecture a teacher folder's config.json records; None for a weights file (or a
    path that does not exist: loading it says so)."""
    config = Path(str(checkpoint)).expanduser() / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("architecture")


def folder_label_names(folder: Path) -> list[str] | None:
    """The class names a teacher folder's config.json records (timm's root-level label_names)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    meta = json.loads(config.read_text())
    return read_label_names(meta.get("label_names"), meta.get("num_classes"), f"teacher folder {folder}", TeacherError)


def match_teacher_classes(teacher_names: list[str] | None, data_names: list[str], where: str) -> list[int] | None:
    """For each data class, the teacher output of that name; None when the order is already the
    data's or the teacher records no names (then check_teacher's accuracy floor is the guard).
    A teacher trained on other classes is refused: its outputs would be read as the wrong classes."""
    if teacher_names is None or teacher_names == data_names:
        return None
    if set(teacher_names) != set(data_names):
        only_teacher = [n for n in teacher_names if n not in data_names]
        only_data = [n for n in data_names if n not in teacher_names]
        raise TeacherError(
            f"teacher {where} was trained on other classes than the data's. Teacher classes: "
            f"{name_list(teacher_names)}; data classes: {name_list(data_names)} (only the teacher has: "
            f"{name_list(only_teacher) or 'none'}; only the data has: {name_list(only_data) or 'none'}). "
            "Use a teacher trained on these classes, or add a teacher.train section to train one"
        )
    index = {n: i for i, n in enumerate(teacher_names)}
    return [index[n] for n in data_names]


def load_teacher_weights(model: nn.Module, path: Path, arch: str, num_classes: int) -> None:
    sd = read_state_dict(path)
    own = model.state_dict()
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    head_keys = [f"{prefix}.{name}" for name, _ in head.named_parameters()]  # weight first
    for key in head_keys:
        if key in sd and sd[key].shape != own[key].shape:
            raise TeacherError(
                f"teacher checkpoint {path} has a {sd[key].shape[0]}-class head ('{key}') but the "
                f"data has {num_classes} classes; use a teacher trained on these classes"
            )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        sample = (missing + unexpected + mismatched)[:4]
        raise TeacherError(
            f"teacher checkpoint {path} does not fit teacher.model '{arch}': {len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys (e.g. "
            f"{', '.join(sample)}); check teacher.model and teacher.model_args"
        )
    model.load_state_dict(sd, strict=True)


@dataclass(frozen=True)
class FrozenTeacherOptions:
    """How a frozen teacher runs beyond its normalisation: its own input size, its output order,
    and the speed switches of the teacher section (inference_mode, channels_last, compile)."""

    size: tuple[int, int] | None = None  # teacher.img_size; None: the student's size
    interpolation: str = "bicubic"  # for resizing the student's batch to ``size``
    # Output i is the teacher's output class_order[i] (match_teacher_classes); None: as is.
    class_order: Sequence[int] | None = None
    inference_mode: bool = True
    channels_last: bool = True
    compile: bool = False


class FrozenTeacher(nn.Module):
    """A frozen teacher fed the student's input, re-normalised to the teacher's statistics.

    DeiT feeds the teacher the very tensor the student gets (after mixup); timm's
    DistillationTeacher re-normalises when the two normalisations differ. We do the same.
    """

    def __init__(
        self,
        model: nn.Module,
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        teacher_mean: tuple[float, ...],
        teacher_std: tuple[float, ...],
        options: FrozenTeacherOptions = FrozenTeacherOptions(),
    ) -> None:
        super().__init__()
        o = options
        # Its own input size (teacher.img_size): the student's (already mixed) batch is resized
        # to it here, so the student's pipeline does not change. None: the student's size.
        self.size, self.interpolation = (tuple(o.size) if o.size is not None else None), o.interpolation
        self.model = model.eval().requires_grad_(False)
        # inference_mode + channels_last: resnet10t at 16 px, batch 64, on 2 CPU cores went
        # from 20.2 ms to 15.0 ms (measured); channels-last is also the fast conv layout on GPUs.
        self.inference_mode, self.channels_last = o.inference_mode, o.channels_last
        if o.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward_model: Any = torch.compile(self.model) if o.compile else self.model
        self.renormalise = tuple(student_mean) != tuple(teacher_mean) or tuple(student_std) != tuple(teacher_std)

        def col(v: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)

        self.register_buffer("s_mean", col(student_mean), persistent=False)
        self.register_buffer("s_std", col(student_std), persistent=False)
        self.register_buffer("t_mean", col(teacher_mean), persistent=False)
        self.register_buffer("t_std", col(teacher_std), persistent=False)
        # Output i is the teacher's output class_order[i]: its logits in the data's class order,
        # for a teacher folder that names the same classes in another order (match_teacher_classes()).
        order = None if o.class_order is None else torch.tensor(list(o.class_order), dtype=torch.long)
        self.register_buffer("class_order", order, persistent=False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # frozen: BatchNorm statistics never move

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            if self.size is not None and tuple(images.shape[-2:]) != self.size:
                # Resizing commutes with the per-channel re-normalisation below (the weights of
                # each output pixel sum to 1), so it may come first. antialias: a shrinking
                # resize averages like Pillow's instead of skipping pixels.
                mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bicubic"
                images = torch.nn.functional.interpolate(
                    images, size=self.size, mode=mode, align_corners=False, antialias=True
                )
            if self.renormalise:
                images = (images * self.s_std + self.s_mean - self.t_mean) / self.t_std
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = self.forward_model(images)
            if self.class_order is not None:
                logits = logits.index_select(-1, self.class_order)
        return logits.float().clone()  # a normal tensor again: losses may save it for backward


def build_teacher_model(arch: str, num_classes: int, model_args: dict[str, Any], drop_path: float = 0.0) -> nn.Module:
    kwargs = {**model_args, "num_classes": num_classes}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    return create_model(arch, "teacher.model", **kwargs)


def load_teacher(cfg: TeacherConfig, num_classes: int, path: Path | None = None) -> tuple[nn.Module, str, Path]:
    """A teacher with weights from ``path`` (or teacher.checkpoint): (model, arch, weights file)."""
    if path is None:
        arch, weights, extra = _resolve_checkpoint(cfg)
    else:
        assert cfg.model is not None, "a trained teacher's recipe names its model"
        arch, weights, extra = cfg.model, path, {}
    model = build_teacher_model(arch, num_classes, {**extra, **cfg.model_args})
    load_teacher_weights(model, weights, arch, num_classes)
    return model, arch, weights


def teacher_normalisation(
    cfg: TeacherConfig, model: nn.Module, fallback: dict[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The teacher's input mean/std: the recipe's, else what it was trained with, else timm's."""
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    if fallback is not None:
        return tuple(fallback["mean"]), tuple(fallback["std"])
    from timm.data import resolve_model_data_config

    dc = resolve_model_data_config(model)
    return tuple(dc["mean"]), tuple(dc["std"])
