"""The training step's loss: one object that the student's run, the teacher stage and the bench
all call, so that what the bench times is what training runs.

``Step(model, batch, epoch, micro_step)``: the batch through the input pipeline (the tensor
path's view, mixup/cutmix), the teacher's logits on the mixed images (DeiT feeds the teacher the
very tensor the student gets; replayed from the teacher-output cache when there is one), the
student's two heads, and the loss's named parts. The update around it (backward, clipping, the
optimizer, accumulation) is the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from distill.models.student import as_heads
from distill.models.teacher import Teacher
from distill.recipe.schema import DistillationConfig
from distill.training.losses import DistillSettings, LossParts, classification_loss, distillation_loss
from distill.training.teacher_outputs import TeacherOutputCache

Prepare = Callable[[dict[str, Any], int], tuple[torch.Tensor, torch.Tensor]]


def as_prepared(batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``prepare`` for batches that are already model input (the bench's fixed batch)."""
    return batch["image"], batch["label"]


class Step:
    """One micro-step's loss. Without ``distillation`` it is the teacher stage's: plain
    cross-entropy of a one-head classifier on the labels."""

    def __init__(
        self,
        prepare: Prepare,
        *,
        label_smoothing: float,
        distillation: DistillationConfig | None = None,
        teacher: Teacher | None = None,
        output_cache: TeacherOutputCache | None = None,
    ) -> None:
        self.needs_teacher = distillation is not None and distillation.type != "none"
        if self.needs_teacher and teacher is None:
            raise ValueError(f"distillation type '{distillation.type}' needs a teacher")  # type: ignore[union-attr]
        self.prepare, self.label_smoothing = prepare, label_smoothing
        self.teacher, self.output_cache = teacher, output_cache
        self.settings = None
        if distillation is not None:
            d = distillation
            self.settings = DistillSettings(d.type, d.alpha, d.tau, d.kl_norm, label_smoothing)

    def teacher_logits(self, images: torch.Tensor, epoch: int, micro_step: int) -> torch.Tensor:
        assert self.teacher is not None
        if self.output_cache is not None:  # the micro-step fixes the rows: where this batch sits in the stream
            return self.output_cache.train_logits(epoch, micro_step, images, self.teacher)
        return self.teacher(images)

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], epoch: int, micro_step: int) -> LossParts:
        images, targets = self.prepare(batch, epoch)
        if self.settings is None:
            return classification_loss(model(images), targets, self.label_smoothing)
        t_logits = self.teacher_logits(images, epoch, micro_step) if self.needs_teacher else None
        cls, dist = as_heads(model(images))
        return distillation_loss(cls, dist, targets, t_logits, self.settings)
