"""One run, top to bottom: the launch check, the run directory, data, teacher, student, the epoch
loop (train, evaluate, log, checkpoint), then summary and export.

Science (the recipe) and infrastructure (processes, precision, checkpoints) meet here; each
concern has its owner elsewhere: ``rundir`` (the directory and resume policy), ``pipeline``
(input), ``teacher_stage`` (the teacher), ``step`` (the loss of one micro-step), ``engine`` (the
loops), ``checkpoint``, ``tracking`` and ``export``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from distill.data.pipeline import InputPipeline, build_pipeline, data_seed
from distill.data.sources import SplitData, load_source, seeded
from distill.errors import LaunchError, RecipeError
from distill.exports.end_of_run import export_run_student
from distill.models.spec import InputSpec
from distill.models.student import build_student, set_attention, student_input_spec
from distill.models.student_init import check_init, initialise
from distill.models.teacher import Teacher
from distill.recipe.checks import check_settings
from distill.recipe.schema import Recipe, flatten, recipe_to_dict
from distill.run import checkpoint as ckpt
from distill.run.checkpoint import TrainingState
from distill.run.processes import accelerator_options, apply_tf32, main_value
from distill.run.rundir import RunDir
from distill.run.tracking import RunLog, check_trackers
from distill.training.engine import STOP, evaluate_student, evaluate_teacher, train_one_epoch
from distill.training.optim import BatchPlan, batch_plan, build_optimizer, build_scheduler, effective_lr
from distill.training.progress import ProgressReport
from distill.training.step import Step
from distill.training.teacher_outputs import TeacherOutputCache, open_output_cache
from distill.training.teacher_stage import check_teacher, obtain_teacher

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(recipe: Recipe) -> Accelerator:
    """An Accelerator for the recipe, refusing launches that would silently go wrong."""
    precision = recipe.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise LaunchError(
            "train.precision=fp16 needs a GPU (Accelerate silently runs fp32 on CPU); use "
            "train.precision=bf16 or fp32 on this machine"
        )
    accelerator = Accelerator(
        mixed_precision=PRECISION[precision],
        gradient_accumulation_steps=recipe.train.grad_accum_steps,
        # prepare() compiles the student (and unwraps it for saving); the teacher is compiled
        # by FrozenTeacher since it is never prepared.
        dynamo_backend="inductor" if recipe.train.compile else "no",
        **accelerator_options(recipe),  # the process group's timeout, non-blocking batch copies
    )
    apply_tf32(recipe)  # after Accelerate, which turns TF32 on under dynamo in fp32
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes but this one sees a world of "
            f"{accelerator.num_processes} (every process thinks it is rank 0). On a machine "
            "without GPUs launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N ...; with GPUs check that CUDA is visible to every process"
        )
    return accelerator


@dataclass
class Student:
    """The prepared student and everything that trains it."""

    model: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    optimizer: Any
    scheduler: Any
    pipeline: InputPipeline  # over the prepared loaders
    ema: Any  # timm ModelEmaV3 on the student's device, or None
    steps_per_epoch: int
    plan: BatchPlan
    init: dict[str, Any] | None  # where its weights came from (student.init), for the summary


def setup_student(accelerator: Accelerator, recipe: Recipe, split: SplitData, spec: InputSpec) -> Student:
    """Build, initialise and prepare the student with its optimizer, loaders, schedule and EMA."""
    r, acc = recipe, accelerator
    plan = batch_plan(r.train, acc.num_processes, "train")
    # Seeded here, after the teacher stage, so the student's initial weights do not depend
    # on whether the teacher was trained now or found in the cache.
    with seeded(r.run.seed):
        student = build_student(r.student, split.num_classes, r.distillation.token)
    attention = r.train.attention_on(acc.device.type)
    set_attention(student, attention)  # the EMA, a copy, and evaluation keep it
    acc.print(f"student: attention {attention} (train.attention={r.train.attention}, {r.train.precision})")
    init = initialise(student, r.student)
    if init is not None:
        acc.print(init.line())
    student.pretrained_cfg = {**student.pretrained_cfg, **spec.timm_config()}
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(True)  # forward returns (cls, dist) while training
    optimizer = build_optimizer(student, r.train)
    pipeline = build_pipeline(
        r.data,
        split,
        spec,
        data_seed(r),
        per_process_batch=plan.per_process,
        global_batch=plan.global_batch,
        eval_batch=math.ceil(r.eval.batch_size / acc.num_processes),
        label_smoothing=r.train.label_smoothing,
    )
    model, optimizer, train_loader, val_loader = acc.prepare(
        student, optimizer, pipeline.train_loader, pipeline.val_loader
    )
    acc.gradient_accumulation_steps = r.train.grad_accum_steps
    steps = len(train_loader) // r.train.grad_accum_steps
    scheduler = build_scheduler(optimizer, r.train, steps)
    ema = None
    if r.train.ema_decay is not None:
        from timm.utils import ModelEmaV3

        # After prepare, a copy of the prepared student, so on its device: a copy made before
        # prepare stayed where the student was built (the CPU) while the student moved to the GPU.
        ema = ModelEmaV3(acc.unwrap_model(model, keep_torch_compile=False), decay=r.train.ema_decay)
    origin = None if init is None else init.describe()
    loaders = pipeline.with_loaders(train_loader, val_loader)
    return Student(model, optimizer, scheduler, loaders, ema, steps, plan, origin)


class DistillRun:
    """A run of the recipe: ``DistillRun(recipe, argv).run()`` returns the summary."""

    def __init__(self, recipe: Recipe, argv: list[str] | None = None, accelerator: Accelerator | None = None) -> None:
        self.recipe = recipe
        check_trackers(recipe.run.trackers)  # a tracker's missing package before anything runs
        self.warnings = check_settings(recipe)  # settings with no effect: refused, or warned about
        self.argv = list(argv or [])
        self.accelerator = accelerator or make_accelerator(recipe)  # a study shares one launch
        self.rundir = RunDir.of(recipe)

    def run(self) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        STOP.install()  # SIGTERM / Ctrl-C: checkpoint at the next log step, then exit
        acc.free_memory()  # nothing prepared by an earlier run of this launch may linger
        for line in self.warnings:
            acc.print(f"warning: {line}")
        wall_start = time.perf_counter()
        # The recipe's inputs first: a bad data.path or student is reported before the run
        # directory is looked at (a finished run's "already finished" hid them) or written to.
        with acc.main_process_first():
            split = load_source(r.data)
        spec = student_input_spec(r)
        # a student.init that cannot start the student, before a teacher is trained for nothing
        check_init(r.student, split.num_classes, r.distillation.token)
        resume_from = self.rundir.prepare(acc, r, self.argv)
        try:
            return self._run(split, spec, resume_from, wall_start)
        except BaseException:
            if resume_from is None:  # a fresh run that failed before its first checkpoint
                self.rundir.discard_unstarted(acc)
            raise

    def _run(self, split: SplitData, spec: InputSpec, resume_from: Any, wall_start: float) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        if split.skipped:
            acc.print(f"data: skipped {len(split.skipped)} undecodable images: {', '.join(split.skipped[:10])}")
        acc.print(
            f"data: {r.data.source} {split.num_classes} classes, {len(split.train)} train / "
            f"{len(split.val)} val images (val: {split.val_origin}), input {(3, *spec.size)}"
        )
        teacher = obtain_teacher(acc, r, split, spec)
        if r.run.teacher_only:
            return self._teacher_only(teacher, split, spec, wall_start)
        student = setup_student(acc, r, split, spec)
        outputs = open_output_cache(acc, r, teacher, split, student.pipeline, student.plan)
        teacher_val: torch.Tensor | None = None
        if teacher is not None:
            t_stats, teacher_val = evaluate_teacher(acc, teacher, student.pipeline.val_loader, outputs)
            check_teacher(teacher, t_stats["top1"], split.num_classes, r.teacher.min_top1, acc.is_main_process)
            acc.print(f"teacher: {teacher.describe()['architecture']} val top-1 {100 * t_stats['top1']:.2f}%")
        progress = TrainingState()
        if resume_from is not None:
            progress = ckpt.load_checkpoint(acc, resume_from, student.ema)
            acc.print(f"resuming from {resume_from} (epoch {progress.epoch + 1}, step {progress.global_step})")
        log = RunLog(
            self.rundir.path,
            acc.is_main_process,
            progress.epoch,
            progress.global_step if resume_from else 0,
            trackers=r.run.trackers,
            config=flatten(recipe_to_dict(r)),
        )
        step = Step(
            student.pipeline.prepare,
            label_smoothing=r.train.label_smoothing,
            distillation=r.distillation,
            teacher=teacher,
            outputs=outputs,
        )
        final = self._train(student, step, progress, log, teacher_val, outputs)
        summary = self._finish(student, teacher, split, progress, final, log, outputs, time.perf_counter() - wall_start)
        log.close()
        return summary

    def _train(
        self,
        student: Student,
        step: Step,
        progress: TrainingState,
        log: RunLog,
        teacher_val: torch.Tensor | None,
        outputs: TeacherOutputCache | None,
    ) -> dict[str, Any]:
        """The epoch loop; returns the last evaluation's record."""
        r, acc = self.recipe, self.accelerator
        report = ProgressReport(
            "student",
            student.steps_per_epoch * r.train.epochs,
            progress.global_step,
            r.train.epochs,
            acc.is_main_process,
            r.run.progress_every_s,
        )
        final: dict[str, Any] = {}
        try:
            for epoch in range(progress.epoch, r.train.epochs):
                if outputs is not None:
                    outputs.begin_epoch(epoch)
                report.begin_epoch(epoch)
                start, images = time.perf_counter(), progress.train_images
                self._train_epoch(student, step, progress, epoch, log, report)
                report.epoch_end(epoch + 1, time.perf_counter() - start, progress.train_images - images)
                progress.epoch, progress.step_in_epoch = epoch + 1, 0
                sums, progress.epoch_sums = progress.epoch_sums, {}
                if (epoch + 1) % r.eval.every_epochs == 0 or epoch + 1 == r.train.epochs:
                    final = self._epoch_record(student, teacher_val, progress, sums)
                    log.evaluation(final)
                    if final["val/top1_fused"] > progress.best_top1:
                        progress.best_top1, progress.best_epoch = final["val/top1_fused"], epoch + 1
                        ckpt.save_checkpoint(acc, self.rundir.checkpoints, ckpt.BEST, progress, student.ema)
                self._save_step(student, progress)
        finally:
            report.close()
        if not final:
            # Resumed after the last epoch's checkpoint (killed before summary.json): that epoch's
            # record is already in metrics.jsonl, training sums included; re-evaluating would lose
            # them (fault_trials found summary.json with NaN train losses).
            logged = main_value(acc, self.rundir.logged_record(progress.epoch))  # one decision for all
            final = logged or self._epoch_record(student, teacher_val, progress, {})
        return final

    def _teacher_only(
        self, teacher: Teacher | None, split: SplitData, spec: InputSpec, wall_start: float
    ) -> dict[str, Any]:
        """The teacher stage as a run of its own: evaluate, copy the teacher into the run."""
        from distill.data.pipeline import eval_loader

        acc, r = self.accelerator, self.recipe
        if teacher is None:
            raise RecipeError("run.teacher_only=true needs teacher.train or teacher.checkpoint")
        loader = eval_loader(split.val, spec, math.ceil(r.eval.batch_size / acc.num_processes), r.data.num_workers)
        stats, _ = evaluate_teacher(acc, teacher, acc.prepare(loader), None)
        check_teacher(teacher, stats["top1"], split.num_classes, r.teacher.min_top1, acc.is_main_process)
        summary = {
            "run": str(self.rundir.path),
            "teacher": teacher.describe(),
            "final": {"val/teacher_top1": stats["top1"]},
            "wall_time_s": time.perf_counter() - wall_start,
            "data": data_info(r, split, None),
        }
        if acc.is_main_process:
            teacher.copy_to(self.rundir.teacher_dir)
            summary["teacher"]["folder"] = str(self.rundir.teacher_dir)
            self.rundir.write_summary(summary)
            name = summary["teacher"]["architecture"]
            print(f"teacher {name}: val top-1 {100 * stats['top1']:.2f}%, saved to {self.rundir.teacher_dir}")
        acc.wait_for_everyone()
        return summary

    def _save_step(self, student: Student, progress: TrainingState) -> None:
        """Checkpoint ``step_<global step>`` atomically, keeping the newest run.keep_checkpoints."""
        root, name = self.rundir.checkpoints, ckpt.step_name(progress.global_step)
        ckpt.save_checkpoint(self.accelerator, root, name, progress, student.ema, keep=self.recipe.run.keep_checkpoints)

    def _train_epoch(
        self, student: Student, step: Step, progress: TrainingState, epoch: int, log: RunLog, report: ProgressReport
    ) -> None:
        r = self.recipe

        def on_log(values: dict[str, float]) -> None:
            log.scalars(values, progress.global_step)
            report.values(values)

        train_one_epoch(
            self.accelerator,
            student.model,
            student.pipeline.train_loader,
            student.optimizer,
            student.scheduler,
            step,
            progress,
            epoch=epoch,
            seed=r.run.seed,
            data_seed=data_seed(r),
            log_every=r.run.log_every_steps,
            clip_grad=r.train.clip_grad,
            on_log=on_log,
            checkpoint_every=r.run.checkpoint_every_steps,
            on_checkpoint=lambda: self._save_step(student, progress),
            ema=student.ema,
            report=report,
        )

    def _epoch_record(
        self,
        student: Student,
        teacher_val: torch.Tensor | None,
        progress: TrainingState,
        sums: dict[str, float],
    ) -> dict[str, Any]:
        acc = self.accelerator
        model = acc.unwrap_model(student.model, keep_torch_compile=False)
        stats = evaluate_student(acc, model, student.pipeline.val_loader, teacher_val)
        model.train()
        n = sums.get("n", 0.0)
        record: dict[str, Any] = {"epoch": progress.epoch, "step": progress.global_step}
        for k in ("loss", "loss_ce", "loss_kd"):
            record[f"train/{k}"] = sums[k] / n if n else math.nan
        record["lr"] = student.optimizer.param_groups[0]["lr"]
        record.update({f"val/{k}": v for k, v in stats.items()})
        if teacher_val is None:
            record.update({"val/teacher_top1": math.nan, "val/agreement": math.nan, "val/kl": math.nan})
        if student.ema is not None:
            ema_stats = evaluate_student(acc, student.ema.module, student.pipeline.val_loader, teacher_val)
            record.update({f"val_ema/{k}": v for k, v in ema_stats.items() if not k.startswith("teacher")})
        record["throughput/train_img_s"] = (
            progress.train_images / progress.train_time if progress.train_time else math.nan
        )
        acc.print(
            f"epoch {progress.epoch}: loss {record['train/loss']:.4f}  top-1 cls {100 * record['val/top1_cls']:.2f}  "
            f"dist {100 * record['val/top1_dist']:.2f}  fused {100 * record['val/top1_fused']:.2f}  "
            f"agreement {100 * record['val/agreement']:.2f}"
        )
        return record

    def _finish(
        self,
        student: Student,
        teacher: Teacher | None,
        split: SplitData,
        progress: TrainingState,
        final: dict[str, Any],
        log: RunLog,
        outputs: TeacherOutputCache | None,
        wall: float,
    ) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        summary: dict[str, Any] = {
            "run": str(self.rundir.path),
            "final": final,
            "best": {"val/top1_fused": progress.best_top1, "epoch": progress.best_epoch},
            "epochs": progress.epoch,
            "steps": progress.global_step,
            "wall_time_s": wall,
            "train_time_s": progress.train_time,
            "throughput_train_img_s": progress.train_images / progress.train_time if progress.train_time else None,
            "teacher": teacher.describe() if teacher is not None else None,
            "student_init": student.init,
            "distillation": r.distillation.model_dump(mode="json"),
            "world_size": acc.num_processes,
            "precision": r.train.precision,
            "effective_lr": effective_lr(r.train),
            "data": data_info(r, split, student.pipeline.store),
            "teacher_cache": outputs.summary() if outputs else {"enabled": False},
            "metric_notes": METRIC_NOTES,
            "export": None,
        }
        if outputs is not None:
            outputs.close()
        if acc.is_main_process:
            if r.run.export:
                model = acc.unwrap_model(student.model, keep_torch_compile=False)
                summary["export"] = export_run_student(model, self.rundir.export_dir, r, split, summary, acc.device)
            log.hparams(flatten(recipe_to_dict(r)), {k: v for k, v in final.items() if "/" in k})
            self.rundir.write_summary(summary)
            print_summary(summary)
        acc.wait_for_everyone()
        return summary


# What the logged metrics that are easy to misread measure (summary.json carries it).
METRIC_NOTES = {
    "val/kl": "KL(teacher || fused student) at temperature 1, mean over validation images, in nats",
    "val/agreement": "share of validation images where the fused student's argmax equals the teacher's",
    "train/loss_kd": "soft: tau^2 KL(teacher || dist head) at the training tau; hard: CE(dist head, teacher argmax)",
}


def data_info(recipe: Recipe, split: SplitData, store: str | None) -> dict[str, Any]:
    """The data a run used, for summary.json and the model card."""
    return {
        "source": recipe.data.source,
        "path": recipe.data.path,
        "num_classes": split.num_classes,
        "class_names": split.class_names,  # in output order: evaluate matches data to them by name
        "train_size": len(split.train),
        "val_size": len(split.val),
        "val_origin": split.val_origin,
        "skipped_images": split.skipped,
        "store": store,
    }


def print_summary(summary: dict[str, Any]) -> None:
    final = summary["final"]

    def pct(key: str) -> str:
        v = final.get(key)
        return f"{100 * v:6.2f}%" if isinstance(v, float) and math.isfinite(v) else "    n/a"

    rows = [
        ("val top-1 cls head", pct("val/top1_cls")),
        ("val top-1 dist head", pct("val/top1_dist")),
        ("val top-1 fused", pct("val/top1_fused")),
        ("val top-5 fused", pct("val/top5_fused")),
        ("teacher val top-1", pct("val/teacher_top1")),
        ("agreement with teacher", pct("val/agreement")),
        ("best fused top-1", f"{100 * summary['best']['val/top1_fused']:6.2f}% (epoch {summary['best']['epoch']})"),
        ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("train throughput", f"{summary['throughput_train_img_s'] or 0:.0f} img/s"),
        ("run directory", summary["run"]),
        ("export", summary["export"]["path"] if summary["export"] else "(off)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))
