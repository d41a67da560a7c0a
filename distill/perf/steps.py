"""The steps the bench and the step profile time, and the problem they share.

* ``OursStep``: the trainer's own ``distill.training.step.Step`` (the object ``DistillRun`` and
  the teacher stage train with: ``ConvnetTeacher`` forward under autocast, student forward,
  ``distillation_loss``), then backward + optimizer step + ``zero_grad`` as
  ``engine.train_one_epoch`` runs them (``build_optimizer``, the student's forward wrapped in
  autocast and cast back to fp32 exactly as ``Accelerator.prepare`` wraps it, the per-step
  ``set_step_seed`` and on-device ``LossMeter.add``). Accelerate itself is left out: its state is
  one mixed precision per process, which would make it impossible to alternate fp32 and bf16
  steps in one process; what it adds per step on one process is bookkeeping in microseconds;
* ``EvalStep``: the student's forward in eval mode under ``torch.no_grad`` (as engine.evaluate);
* ``ReferenceStep``: ``timm.task.TokenDistillationTask`` with copies of the same student and
  teacher, timm's optimizer factory ``create_optimizer_v2``, fp32, as timm's train.py runs it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from distill.errors import RecipeError
from distill.perf.measure import DTYPES, Precision, autocast, count_flops
from distill.recipe.schema import Recipe


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The switches that change how our step runs (not what it computes)."""

    precision: Precision = "fp32"
    fused: bool = False  # fused Adam(W) kernel (train.fused)
    compile: bool = False  # torch.compile the student (train.compile)
    teacher_inference_mode: bool = True
    teacher_channels_last: bool = True
    teacher_compile: bool = False
    attention: Literal["fused", "manual"] = "fused"  # train.attention resolved for the device

    @classmethod
    def of_recipe(cls, recipe: Recipe, device: torch.device) -> Settings:
        t = recipe.teacher
        return cls(
            precision=recipe.train.precision,
            fused=recipe.train.fused,
            compile=recipe.train.compile,
            teacher_inference_mode=t.inference_mode,
            teacher_channels_last=t.channels_last,
            teacher_compile=t.compile,
            attention=recipe.train.attention_on(device.type),
        )

    def teacher_text(self) -> str:
        """Short form for the table; TEACHER_LEGEND spells it out."""
        text = "IM" if self.teacher_inference_mode else "NG"
        return text + ("+CL" if self.teacher_channels_last else "") + ("+C" if self.teacher_compile else "")

    def text(self) -> str:
        """'bf16 manual compiled': the precision, the attention and whether compiled."""
        return f"{self.precision} {self.attention}" + (" compiled" if self.compile else "")


@dataclass
class Problem:
    """What every configuration computes: models (random weights), batch and loss settings."""

    recipe: Recipe
    student: nn.Module  # fp32, train mode, distilled training on; copied per configuration
    teacher: nn.Module  # the bare timm teacher; copied per configuration
    student_mean: tuple[float, ...]
    student_std: tuple[float, ...]
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    images: torch.Tensor
    labels: torch.Tensor
    kd: Literal["hard", "soft"]
    device: torch.device

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.student.head.out_features)

    def teacher_spec(self) -> Any:
        """The teacher's input: the student's size, its own normalisation (as the trainer's)."""
        from distill.models.spec import InputSpec

        size = (int(self.images.shape[-2]), int(self.images.shape[-1]))
        return InputSpec(size, self.teacher_mean, self.teacher_std, 1.0, "bicubic")  # type: ignore[arg-type]


def optimizer_text(opt: str, fused: bool, device: torch.device) -> str:
    if fused and opt in ("adam", "adamw"):
        return f"{opt} fused"
    if opt not in ("adam", "adamw", "sgd"):
        return opt
    return f"{opt} {'foreach' if device.type == 'cuda' else 'for-loop'}"  # torch's default implementation there


def make_teacher(problem: Problem, s: Settings) -> Any:
    """The trainer's teacher object (ConvnetTeacher) for ``s``, under its autocast."""
    from distill.models.teacher import ConvnetTeacher, FrozenTeacher

    module = FrozenTeacher(
        copy.deepcopy(problem.teacher), problem.student_mean, problem.student_std, problem.teacher_mean,
        problem.teacher_std, s.teacher_inference_mode, s.teacher_channels_last, s.teacher_compile,
    ).to(problem.device)  # fmt: skip
    return ConvnetTeacher(
        module, problem.teacher_spec(), problem.recipe.teacher.model, None, False,
        lambda: autocast(s.precision, problem.device),
    )  # fmt: skip


class OursStep:
    """The trainer's own step object (``distill.training.step.Step``) with the engine's update.

    ``pipeline`` and ``batch``: by default the fixed float batch as it is (``as_prepared``); with
    the recipe's input pipeline, a real training batch through ``InputPipeline.prepare`` every
    step: the tensor path's crop and flip and mixup/cutmix, as training runs them."""

    def __init__(
        self,
        problem: Problem,
        settings: Settings,
        distillation: str,
        teacher: Any,
        pipeline: Any = None,
        batch: dict[str, Any] | None = None,
    ) -> None:
        from accelerate.utils import convert_outputs_to_fp32

        from distill.models.student import set_attention
        from distill.training.engine import LossMeter
        from distill.training.optim import build_optimizer
        from distill.training.step import Step, as_prepared

        p, r = problem, problem.recipe
        self.problem, self.settings, self.distillation, self.teacher = p, settings, distillation, teacher
        self.model = copy.deepcopy(p.student).to(p.device).train()
        set_attention(self.model, settings.attention)  # as the trainer sets train.attention
        if settings.precision != "fp32":
            # Accelerator.prepare_model: forward under autocast, outputs cast back to fp32, so the
            # loss runs in fp32 (accelerate/accelerator.py, native_amp branch).
            wrapped = torch.autocast(device_type=p.device.type, dtype=DTYPES[settings.precision])(self.model.forward)
            self.model.forward = convert_outputs_to_fp32(wrapped)
        # Accelerate compiles the prepared (already autocast-wrapped) module; so do we.
        self.forward: Any = torch.compile(self.model) if settings.compile else self.model
        self.optimizer = build_optimizer(self.model, r.train.model_copy(update={"fused": settings.fused}))
        # fp16 needs loss scaling; Accelerate uses a GradScaler for it too.
        self.scaler = torch.amp.GradScaler(p.device.type) if settings.precision == "fp16" else None
        self.meter = LossMeter(p.device)
        self.step_index = 0
        self.batch = batch if batch is not None else {"image": p.images, "label": p.labels}
        self.step = Step(
            pipeline.prepare if pipeline is not None else as_prepared,
            label_smoothing=r.train.label_smoothing,
            distillation=r.distillation.model_copy(update={"type": distillation}),
            teacher=teacher,
        )

    def loss(self, forward: Any = None) -> Any:
        return self.step(forward or self.forward, self.batch, 0, self.step_index)

    def __call__(self) -> torch.Tensor:
        from distill.training.engine import set_step_seed

        p = self.problem
        set_step_seed(p.recipe.run.seed, 0, self.step_index, 0)  # engine: re-seeded every micro-step
        self.step_index += 1
        parts = self.loss()
        if self.scaler is not None:
            self.scaler.scale(parts.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            parts.total.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.add(parts, p.batch_size)  # on-device sums, no host sync (engine.LossMeter)
        return parts.total.detach()

    def flops(self) -> int:
        """Forward + backward (+ the teacher's forward) of one step, on the eager model."""

        def once() -> None:
            self.loss(self.model).total.backward()
            self.optimizer.zero_grad(set_to_none=True)

        # The counter cannot see into compiled code: count a compiled teacher's eager module.
        module = getattr(self.teacher, "module", None)
        compiled = getattr(module, "forward_model", None)
        if compiled is not None:
            module.forward_model = module.model  # type: ignore[union-attr]
        try:
            return count_flops(once)
        finally:
            if compiled is not None:
                module.forward_model = compiled  # type: ignore[union-attr]


def ours_step(problem: Problem, settings: Settings) -> OursStep:
    """Our step with its own teacher, at ``settings``, distilling as the problem does."""
    return OursStep(problem, settings, problem.kd, make_teacher(problem, settings))


class EvalStep:
    """The student's evaluation forward, as DistillRun._evaluate runs it (no_grad + autocast)."""

    def __init__(self, problem: Problem, precision: str, attention: str = "fused") -> None:
        from distill.models.student import set_attention

        self.problem, self.precision = problem, precision
        self.model = copy.deepcopy(problem.student).to(problem.device).eval()
        set_attention(self.model, attention)  # the trainer evaluates the student it trained

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        from distill.models.student import student_heads

        with autocast(self.precision, self.problem.device):
            cls, dist = student_heads(self.model, self.problem.images)
        return (cls.float() + dist.float()).mean()

    def flops(self) -> int:
        return count_flops(self)


class ReferenceStep:
    """timm's TokenDistillationTask step: task(input, target) -> backward -> step -> zero_grad,
    with the same student and teacher weights, loss type, alpha, tau and label smoothing, and timm's
    optimizer factory (same type, lr and weight decay; timm's default, non-fused implementation)."""

    def __init__(self, problem: Problem) -> None:
        from timm.optim import create_optimizer_v2
        from timm.task import TokenDistillationTask

        from distill.training.optim import effective_lr

        p, t, d = problem, problem.recipe.train, problem.recipe.distillation
        self.problem = p
        student = copy.deepcopy(p.student).to(p.device)
        self.task = TokenDistillationTask(
            student,
            copy.deepcopy(p.teacher).to(p.device),  # wrapped in timm's DistillationTeacher
            criterion_kwargs={"smoothing": t.label_smoothing},  # timm's label-smoothing CE
            distill_type=p.kd,
            task_loss_weight=1.0 - d.alpha,  # complementary mode: distill weight = alpha
            temperature=d.tau,
            device=p.device,
            verbose=False,
        ).to(p.device)
        self.task.train()
        extra = {"momentum": t.momentum} if t.opt == "sgd" else {}
        self.optimizer = create_optimizer_v2(
            student, opt=t.opt, lr=effective_lr(t), weight_decay=t.weight_decay, **extra
        )

    def loss(self) -> torch.Tensor:
        return self.task(self.problem.images, self.problem.labels)["loss"]

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def flops(self) -> int:
        def once() -> None:
            self.loss().backward()
            self.optimizer.zero_grad(set_to_none=True)

        return count_flops(once)


# ---------------------------------------------------------------------------------------------
# Set-up


def count_class_folders(recipe: Recipe) -> int:
    """Classes of an image-folder source without loading it: the non-hidden folders of
    ``<data.path>/<data.train_split>/`` (each a class, as the trainer reads them)."""
    train_dir = Path(str(recipe.data.path)).expanduser() / recipe.data.train_split
    if not train_dir.is_dir():
        raise RecipeError(
            f"data.path: no folder {train_dir} to count classes in; give data.path=<folder holding "
            f"{recipe.data.train_split}/<class>/<image>> or --num-classes N"
        )
    count = sum(1 for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if count == 0:
        raise RecipeError(f"{train_dir} holds no class folders; give --num-classes N or fix data.path")
    return count


def num_classes_of(recipe: Recipe, given: int | None) -> int:
    """Classes without loading the data: --num-classes, else what the recipe's source implies."""
    if given is not None:
        return given
    if recipe.data.source == "digits":
        return 10
    if recipe.data.source == "synthetic":
        return recipe.data.synthetic.num_classes
    if recipe.data.source == "imagefolder":
        return count_class_folders(recipe)
    raise RecipeError(
        f"data.source={recipe.data.source}: pass --num-classes N (the bench does not load the data to count them)"
    )


def check_recipe(recipe: Recipe) -> None:
    if not recipe.distillation.token:
        raise RecipeError(
            "the bench compares against timm's TokenDistillationTask, which needs a distillation token; "
            "set distillation.token=true"
        )


def build_problem(recipe: Recipe, num_classes: int, kd: str, device: torch.device) -> Problem:
    """Random weights (speed does not depend on them) and one seeded random batch on ``device``."""
    from distill.data.sources import seeded
    from distill.models.student import build_student, student_input_spec
    from distill.models.teacher import build_teacher_model, teacher_normalisation
    from distill.training.optim import batch_plan

    check_recipe(recipe)
    with seeded(recipe.run.seed):
        student = build_student(recipe.student, num_classes)
        teacher = build_teacher_model(recipe.teacher.model, num_classes, dict(recipe.teacher.model_args))
    student.set_distilled_training(True)  # forward returns (cls, dist) while training
    student.train()
    spec = student_input_spec(recipe)
    t_mean, t_std = teacher_normalisation(recipe.teacher, teacher)
    # One process: the micro-batch of one optimizer step (accumulation is not benchmarked).
    batch = batch_plan(recipe.train, 1, "train").per_process
    h, w = spec.size
    gen = torch.Generator().manual_seed(recipe.run.seed)
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return Problem(
        recipe, student, teacher, spec.mean, spec.std, t_mean, t_std, images, labels,
        kd,  # type: ignore[arg-type]
        device,
    )  # fmt: skip


def recipe_pipeline(recipe: Recipe) -> Any:
    """The recipe's training input pipeline, as the trainer builds it on one process."""
    from distill.data.pipeline import build_pipeline, data_seed
    from distill.data.sources import load_source
    from distill.models.student import student_input_spec
    from distill.training.optim import batch_plan

    split = load_source(recipe.data)
    plan = batch_plan(recipe.train, 1, "train")
    return build_pipeline(
        recipe.data,
        split,
        student_input_spec(recipe),
        data_seed(recipe),
        per_process_batch=plan.per_process,
        global_batch=plan.global_batch,
        eval_batch=plan.per_process,
        label_smoothing=recipe.train.label_smoothing,
    )


def device_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A loader's batch on ``device`` as Accelerate's prepared loader hands it over (tensors moved,
    the tensor path's host-side index left where it is)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def student_arch(model: nn.Module) -> dict[str, Any]:
    """The built student's actual size (the recipe leaves unset keys at the registry's values)."""
    blocks: Any = model.blocks
    return {
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "embed_dim": int(model.embed_dim),
        "depth": len(blocks),
        "num_heads": int(blocks[0].attn.num_heads),
        "params": sum(p.numel() for p in model.parameters()),
    }
