"""The teacher stage for ``teacher.ensemble``: every member obtained as a one-teacher run would
obtain it (trained once and cached by its own key, or loaded), then evaluated and checked.

Members given as weights are loaded first, so that a member that cannot be loaded, or whose
classes are not the data's, stops the run before any member is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from distill.data.pipeline import eval_loader
from distill.data.sources import SplitData
from distill.errors import TeacherError
from distill.models.ensemble import EnsembleTeacher, member_recipe
from distill.models.metrics import classifier_sample_stats
from distill.models.spec import InputSpec
from distill.recipe.schema import Recipe
from distill.training.engine import evaluate


def obtain_ensemble(
    accelerator: Accelerator,
    recipe: Recipe,
    split: SplitData,
    spec: InputSpec,
    obtain_teacher: Callable[..., Any],
    check_teacher: Callable[..., None],
) -> EnsembleTeacher:
    """The members on the device, each with its validation top-1 (each checked against the
    accuracy floor), combined as teacher.combine says at the distillation temperature.
    ``obtain_teacher`` and ``check_teacher`` are the teacher stage's for one teacher (it calls
    this module, so they are passed in rather than imported)."""
    entries = recipe.teacher.ensemble
    if not entries:
        raise TeacherError("teacher.ensemble is empty; list at least one member")
    recipes = [member_recipe(recipe, i) for i in range(len(entries))]
    loaded_first = sorted(range(len(entries)), key=lambda i: recipes[i].teacher.checkpoint is None)
    members: dict[int, Any] = {}
    for i in loaded_first:
        try:
            members[i] = obtain_teacher(accelerator, recipes[i], split, spec)
        except TeacherError as err:
            raise TeacherError(f"teacher.ensemble member {i}: {err}") from None
    ordered = [members[i] for i in range(len(entries))]
    ensemble = EnsembleTeacher(ordered, [e.weight for e in entries], recipe.teacher.combine, recipe.distillation.tau)
    top1 = member_top1(accelerator, ensemble, split, spec, recipe)
    for i, (member, acc1) in enumerate(zip(ordered, top1, strict=True)):
        try:
            check_teacher(member, acc1, split.num_classes, recipe.teacher.min_top1, accelerator.is_main_process)
        except TeacherError as err:
            raise TeacherError(f"teacher.ensemble member {i}: {err}") from None
        accelerator.print(f"teacher: member {i} {member.architecture} val top-1 {100 * acc1:.2f}%")
    ensemble.member_top1 = top1
    return ensemble


def member_top1(
    accelerator: Accelerator, ensemble: EnsembleTeacher, split: SplitData, spec: InputSpec, recipe: Recipe
) -> list[float]:
    """Each member's validation top-1, from one pass over the split."""
    batch = math.ceil(recipe.eval.batch_size / accelerator.num_processes)
    loader = accelerator.prepare(eval_loader(split.val, spec, batch, recipe.data.num_workers))

    def forward(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, logits in enumerate(ensemble.member_logits(b["image"])):
            out[f"top1_{i}"] = classifier_sample_stats(logits, b["label"])["top1"]
        return out

    stats = evaluate(accelerator, loader, forward)
    accelerator.free_memory()
    return [stats[f"top1_{i}"] for i in range(len(ensemble.members))]
