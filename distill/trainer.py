"""One run, top to bottom: launch checks, run directory, data, teacher, student, the epoch
loop (train, evaluate, log, checkpoint), export and summary.

Science (the recipe) and infrastructure (processes, precision, checkpoints) meet here and
nowhere else; ``engine`` has the loops, ``losses`` the maths.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from distill import __version__
from distill import checkpoint as ckpt
from distill.config import PROVENANCE_KEY, Recipe, flatten, recipe_to_dict
from distill.data import (
    AugmentedDataset,
    SplitData,
    build_mixup,
    build_transforms,
    load_source,
    make_loader,
    seeded,
    train_eval_loaders,
)
from distill.engine import STOP, Progress, evaluate, train_one_epoch
from distill.errors import STORAGE_ERRNOS, LaunchError, RecipeError, RunStateError, storage_error
from distill.export import card_info, export_timm, reload_max_diff
from distill.losses import LossParts, distillation_loss
from distill.metrics import student_sample_stats
from distill.models import (
    as_heads,
    build_student,
    init_student,
    student_data_config,
    student_heads,
    student_model_args,
)
from distill.optim import batch_plan, build_optimizer, build_scheduler, effective_lr
from distill.teacher_cache import TeacherOutputCache, labels_digest
from distill.teacher_stage import Teacher, check_teacher, obtain_teacher
from distill.tensor_store import BatchAugment, batch_pipeline
from distill.tracking import RunLog, provenance, read_metrics, write_atomic

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# Keys a resumed run may change without changing its result.
RESUME_FREE_KEYS = (
    "run.resume",
    "run.overwrite",
    "run.log_every_steps",
    "run.checkpoint_every_steps",
    "run.keep_checkpoints",
    "run.export",
    "data.num_workers",
    "teacher.cache_dir",
    "teacher.output_cache.dir",
    "teacher.output_cache.verify_every",
)


# Teacher settings that change its outputs beyond its weights (teacher_cache key).
TEACHER_OUTPUT_KEYS = {"model", "model_args", "mean", "std", "channels_last", "compile"}


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
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes but this one sees a world of "
            f"{accelerator.num_processes} (every process thinks it is rank 0). On a machine "
            "without GPUs launch with: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
            "--num_processes N ...; with GPUs check that CUDA is visible to every process"
        )
    return accelerator


def data_seed(recipe: Recipe) -> int:
    """The seed of the data stream (order, augmentation, mixup): data.seed, else run.seed."""
    return recipe.run.seed if recipe.data.seed is None else recipe.data.seed


def input_config(recipe: Recipe, num_classes: int) -> dict[str, Any]:
    """The student's input: size and normalisation from its timm config, eval crop and
    interpolation from the recipe where it sets them."""
    with seeded(recipe.run.seed):  # a probe student; it never trains
        probe = build_student(recipe.student, num_classes)
    data_config = student_data_config(probe)
    data_config["crop_pct"] = recipe.data.augment.crop_pct or data_config["crop_pct"]
    data_config["interpolation"] = recipe.data.augment.interpolation or data_config["interpolation"]
    return data_config


def _finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUME_FREE_KEYS)]


def prepare_run_dir(accelerator: Accelerator, recipe: Recipe, run_dir: Path, argv: list[str]) -> Path | None:
    """Decide fresh start / resume / refusal; return the checkpoint to resume from, if any."""
    root = run_dir / "checkpoints"
    if _finished(run_dir) and not recipe.run.overwrite:
        raise RunStateError(
            f"run {run_dir} already finished (summary.json exists); pick another run.name, or "
            "pass run.overwrite=true to train it again from scratch"
        )
    latest = ckpt.latest_checkpoint(root)
    if recipe.run.overwrite or recipe.run.resume == "never":
        if latest is not None and not recipe.run.overwrite:
            raise RunStateError(
                f"run {run_dir} has checkpoints and run.resume=never; pass run.overwrite=true to "
                "discard them, or run.resume=auto to continue"
            )
        latest = None
    if latest is not None:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        saved.pop(PROVENANCE_KEY, None)
        changed = _changed_keys(saved, recipe_to_dict(recipe))
        if changed:
            raise RunStateError(
                f"cannot resume {run_dir}: the recipe differs from the checkpoint's in "
                f"{', '.join(changed)}; restore those values, or pass run.overwrite=true to start again"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            _reset_run_dir(accelerator, recipe, run_dir, argv, latest)
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                raise
            raise storage_error(exc, f"the run directory {run_dir}", "choose a writable run.output_dir") from None
    accelerator.wait_for_everyone()
    return latest


def _reset_run_dir(
    accelerator: Accelerator, recipe: Recipe, run_dir: Path, argv: list[str], latest: Path | None
) -> None:
    """Main process: clear a run being started afresh, drop half-written checkpoints, record the recipe."""
    root = run_dir / "checkpoints"
    if latest is None and run_dir.exists():
        for name in ("checkpoints", "tb", "export", "metrics.jsonl", "summary.json", "recipe.yaml"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_partial(root)
    if latest is None:
        record = recipe_to_dict(recipe)
        record[PROVENANCE_KEY] = provenance(argv, accelerator.num_processes, str(accelerator.device))
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(record, sort_keys=False))


@dataclass
class StudentState:
    model: torch.nn.Module  # prepared (DDP-wrapped when distributed)
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    ema: Any
    steps_per_epoch: int
    per_process_batch: int


class DistillRun:
    """A run of the recipe: ``DistillRun(recipe, argv).run()`` returns the summary."""

    def __init__(self, recipe: Recipe, argv: list[str] | None = None, accelerator: Accelerator | None = None) -> None:
        self.recipe = recipe
        self.argv = list(argv or [])
        self._given_accelerator = accelerator  # a study runs many recipes in one launch
        self.run_dir = Path(recipe.run.output_dir) / recipe.run.name
        self.teacher_cache: TeacherOutputCache | None = None
        self.store = "decode"  # data.store as resolved for this run
        self.batch_augment: BatchAugment | None = None  # the tensor path's augmentation

    # -- set-up -----------------------------------------------------------------------------

    def _data(self) -> tuple[SplitData, dict[str, Any], tuple[Any, Any]]:
        r = self.recipe
        with self.accelerator.main_process_first():
            split = load_source(r.data)
        data_config = input_config(r, split.num_classes)
        return split, data_config, build_transforms(r.data.augment, data_config)

    def _student(self, split: SplitData, data_config: dict[str, Any], transforms: tuple[Any, Any]) -> StudentState:
        r, acc = self.recipe, self.accelerator
        plan = batch_plan(r.train, acc.num_processes, "train")
        # Seeded here, after the teacher stage, so the student's initial weights do not depend
        # on whether the teacher was trained now or found in the cache.
        with seeded(r.run.seed):
            student = build_student(r.student, split.num_classes, r.distillation.token)
        if r.student.init is not None:
            converted = init_student(student, r.student.init)
            acc.print(f"student: initialised from {r.student.init} {converted}")
        student.pretrained_cfg = {
            **student.pretrained_cfg,
            **{k: data_config[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")},
        }
        if hasattr(student, "set_distilled_training"):
            student.set_distilled_training(True)  # forward returns (cls, dist) while training
        ema = None
        if r.train.ema_decay is not None:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(student, decay=r.train.ema_decay)
        optimizer = build_optimizer(student, r.train)
        eval_batch = math.ceil(r.eval.batch_size / acc.num_processes)
        self.store, self.batch_augment = batch_pipeline(r.data, split.train, data_config, data_seed(r))
        train_loader, val_loader = train_eval_loaders(
            split,
            transforms,
            data_seed(r),
            plan.per_process,
            plan.global_batch,
            eval_batch,
            r.data.num_workers,
            self.store,
        )
        model, optimizer, train_loader, val_loader = acc.prepare(student, optimizer, train_loader, val_loader)
        acc.gradient_accumulation_steps = r.train.grad_accum_steps
        steps = len(train_loader) // r.train.grad_accum_steps
        scheduler = build_scheduler(optimizer, r.train, steps)
        return StudentState(model, optimizer, scheduler, train_loader, val_loader, ema, steps, plan.per_process)

    def _output_cache(
        self, teacher: Teacher | None, split: SplitData, data_config: dict[str, Any], st: StudentState
    ) -> TeacherOutputCache | None:
        """The teacher-output cache when enabled and the teacher is used (teacher_cache.py)."""
        r, acc = self.recipe, self.accelerator
        cfg = r.teacher.output_cache
        if not cfg.enabled or teacher is None:
            return None
        # Everything the teacher's input or output depends on; the folder is named by its hash.
        data = r.data.model_dump(mode="json", exclude={"num_workers", "on_bad_image", "seed"})
        key = {
            "teacher_sha256": teacher.sha256,
            "teacher": r.teacher.model_dump(
                mode="json", include={"model", "model_args", "mean", "std", "channels_last", "compile"}
            ),
            "data": data,
            "data_seed": data_seed(r),
            "input": {k: data_config[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation")},
            "train_split": [len(split.train), labels_digest(list(split.train["label"]))],
            "val_split": [len(split.val), labels_digest(list(split.val["label"]))],
            "precision": r.train.precision,
            "world_size": acc.num_processes,
            "per_process_batch": st.per_process_batch,
            "eval_per_process_batch": math.ceil(r.eval.batch_size / acc.num_processes),
            "torch": torch.__version__,
            "distill": __version__,  # how views are drawn and resampled may change between versions
            "store": self.store,  # the resolved data path: its views differ from the other's
            "device": acc.device.type,
        }
        cache = TeacherOutputCache(
            acc,
            cfg.dir or r.run.output_dir / "teacher_outputs",
            key,
            split.num_classes,
            rows_per_epoch=len(st.train_loader) * acc.num_processes * st.per_process_batch,
            per_process_batch=st.per_process_batch,
            val_rows=len(split.val),
            budget_mb=cfg.budget_mb,
            topk=cfg.topk,
            verify_every=cfg.verify_every,
        )
        acc.print(f"teacher outputs: cache {cache.dir} ({cache.mode if cache.mode == 'full' else f'top-{cache.k}'})")
        return cache

    # -- evaluation -------------------------------------------------------------------------

    def _teacher_val_logits(self, teacher: Teacher, loader: Any) -> dict[str, float]:
        """One teacher pass over the val split: its accuracy, and logits kept for every epoch's
        agreement/KL (the val transform is deterministic, so they never change)."""
        self.val_teacher: dict[int, torch.Tensor] = {}
        cache, first = self.teacher_cache, [True]
        if cache is not None:
            cache.open_val()

        def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if cache is not None:
                logits = cache.val_logits(batch["index"], batch["image"], teacher.module, first[0])
                first[0] = False
            else:
                logits = teacher.module(batch["image"])
            for i, row in zip(batch["index"].tolist(), logits, strict=True):
                self.val_teacher[i] = row
            return {"top1": (logits.argmax(-1) == batch["label"]).float()}

        return evaluate(self.accelerator, loader, forward)

    def _evaluate(self, model: torch.nn.Module, loader: Any, teacher: Teacher | None) -> dict[str, float]:
        model.eval()

        def forward(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            cls, dist = student_heads(model, batch["image"])
            t = None
            if teacher is not None:
                t = torch.stack([self.val_teacher[i] for i in batch["index"].tolist()])
            return student_sample_stats(cls.float(), dist.float(), batch["label"], t)

        stats = evaluate(self.accelerator, loader, forward)
        return stats

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        r = self.recipe
        self.accelerator = acc = self._given_accelerator or make_accelerator(r)
        STOP.install()  # SIGTERM / Ctrl-C: checkpoint at the next log step, then exit
        acc.free_memory()  # nothing prepared by an earlier run of this launch may linger
        wall_start = time.perf_counter()
        resume_from = prepare_run_dir(acc, r, self.run_dir, self.argv)
        split, data_config, transforms = self._data()
        self.transforms = transforms
        if split.skipped:
            acc.print(f"data: skipped {len(split.skipped)} undecodable images: {', '.join(split.skipped[:10])}")
        acc.print(
            f"data: {r.data.source} {split.num_classes} classes, {len(split.train)} train / "
            f"{len(split.val)} val images (val: {split.val_origin}), input {data_config['input_size']}"
        )
        teacher = obtain_teacher(acc, r, split, transforms, data_config)
        if r.run.teacher_only:
            return self._teacher_only(teacher, split, data_config, time.perf_counter() - wall_start)
        st = self._student(split, data_config, transforms)
        self.teacher_cache = self._output_cache(teacher, split, data_config, st)
        if teacher is not None:
            t_stats = self._teacher_val_logits(teacher, st.val_loader)
            check_teacher(teacher, t_stats["top1"], split.num_classes, r.teacher.min_top1)
            acc.print(
                f"teacher: {teacher.architecture} val top-1 {100 * teacher.val_top1:.2f}% sha256 {teacher.sha256[:12]}"
            )

        progress = Progress()
        if resume_from is not None:
            progress = ckpt.load_checkpoint(acc, resume_from, st.ema)
            acc.print(f"resuming from {resume_from} (epoch {progress.epoch + 1}, step {progress.global_step})")
        log = RunLog(self.run_dir, acc.is_main_process, progress.epoch, progress.global_step if resume_from else 0)
        step_loss = self._step_loss(st, teacher, split.num_classes, progress)
        pbar = self._progress_bar(st.steps_per_epoch * r.train.epochs, progress.global_step)
        final: dict[str, Any] = {}
        try:
            for epoch in range(progress.epoch, r.train.epochs):
                if self.teacher_cache is not None:
                    self.teacher_cache.begin_epoch(epoch)
                self._train_epoch(st, step_loss, progress, epoch, log, pbar)
                progress.epoch, progress.step_in_epoch = epoch + 1, 0
                sums, progress.epoch_sums = progress.epoch_sums, {}
                if (epoch + 1) % r.eval.every_epochs == 0 or epoch + 1 == r.train.epochs:
                    final = self._epoch_record(st, teacher, progress, sums)
                    log.evaluation(final)
                    if final["val/top1_fused"] > progress.best_top1:
                        progress.best_top1, progress.best_epoch = final["val/top1_fused"], epoch + 1
                        ckpt.save_checkpoint(acc, self.run_dir / "checkpoints", ckpt.BEST, progress, st.ema)
                self._save_step(st, progress)
        finally:
            if pbar is not None:
                pbar.close()
        if not final:
            # Resumed after the last epoch's checkpoint (killed before summary.json): that epoch's
            # record is already in metrics.jsonl, training sums included; re-evaluating would lose
            # them (fault_trials found summary.json with NaN train losses).
            final = self._logged_record(progress.epoch) or self._epoch_record(st, teacher, progress, {})
        summary = self._finish(st, teacher, split, progress, final, log, time.perf_counter() - wall_start)
        log.close()
        return summary

    def _teacher_only(
        self, teacher: Teacher | None, split: SplitData, data_config: dict[str, Any], wall: float
    ) -> dict[str, Any]:
        """The teacher stage as a run of its own: evaluate, copy the teacher into the run."""
        acc, r = self.accelerator, self.recipe
        if teacher is None:
            raise RecipeError("run.teacher_only=true needs teacher.train or teacher.checkpoint")
        eval_batch = math.ceil(r.eval.batch_size / acc.num_processes)
        val = make_loader(
            AugmentedDataset(split.val, self.transforms[1], r.run.seed, train=False),
            eval_batch,
            r.run.seed,
            train=False,
            num_workers=r.data.num_workers,
        )
        stats = self._teacher_val_logits(teacher, acc.prepare(val))
        check_teacher(teacher, stats["top1"], split.num_classes, r.teacher.min_top1)
        summary = {
            "run": str(self.run_dir),
            "teacher": self._teacher_info(teacher),
            "final": {"val/teacher_top1": stats["top1"]},
            "wall_time_s": wall,
            "data": self._data_info(split),
        }
        if acc.is_main_process:
            target = self.run_dir / "teacher"
            shutil.rmtree(target, ignore_errors=True)
            if teacher.weights.parent.joinpath("config.json").is_file():
                shutil.copytree(teacher.weights.parent, target)
            else:
                target.mkdir()
                shutil.copy2(teacher.weights, target / teacher.weights.name)
            summary["teacher"]["folder"] = str(target)
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
            print(f"teacher {teacher.architecture}: val top-1 {100 * stats['top1']:.2f}%, saved to {target}")
        acc.wait_for_everyone()
        return summary

    def _teacher_info(self, teacher: Teacher | None) -> dict[str, Any] | None:
        if teacher is None:
            return None
        return {
            "architecture": teacher.architecture,
            "weights": str(teacher.weights),
            "sha256": teacher.sha256,
            "val_top1": teacher.val_top1,
            "trained_here": teacher.trained_here,
        }

    def _data_info(self, split: SplitData) -> dict[str, Any]:
        r = self.recipe
        return {
            "source": r.data.source,
            "path": r.data.path,
            "num_classes": split.num_classes,
            "train_size": len(split.train),
            "val_size": len(split.val),
            "val_origin": split.val_origin,
            "skipped_images": split.skipped,
            "store": self.store,
        }

    def _step_loss(self, st: StudentState, teacher: Teacher | None, num_classes: int, progress: Progress) -> Any:
        r, acc = self.recipe, self.accelerator
        d = r.distillation
        mixup = build_mixup(r.data.augment, r.train.label_smoothing, num_classes, st.per_process_batch)
        needs_teacher = d.type != "none"
        cache = self.teacher_cache

        def teacher_logits(images: torch.Tensor) -> torch.Tensor:
            with acc.autocast():
                return teacher.module(images)

        augment = self.batch_augment

        def step_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossParts:
            images, targets = batch["image"], batch["label"]
            if augment is not None:  # data.store=tensor: uint8 in, the (seed, epoch, index) view out
                images = augment(images, batch["index_host"], progress.epoch)
            if mixup is not None:
                images, targets = mixup(images, targets)  # DeiT: the teacher sees the mixed image
            t_logits = None
            if needs_teacher and cache is not None:  # progress: where this micro-batch sits
                t_logits = cache.train_logits(progress.epoch, progress.step_in_epoch, images, teacher_logits)
            elif needs_teacher:
                t_logits = teacher_logits(images)
            cls, dist = as_heads(model(images))
            return distillation_loss(
                cls, dist, targets, t_logits, d.type, d.alpha, d.tau, d.kl_norm, r.train.label_smoothing
            )

        return step_loss

    def _progress_bar(self, total: int, done: int) -> Any:
        if not self.accelerator.is_main_process:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=done, desc="student", unit="step", dynamic_ncols=True, leave=False, disable=None
        )  # None: off when stderr is not a terminal (CI logs)

    def _save_step(self, st: StudentState, progress: Progress) -> None:
        """Checkpoint ``step_<global step>`` atomically, keeping the newest run.keep_checkpoints."""
        root, name = self.run_dir / "checkpoints", ckpt.step_name(progress.global_step)
        ckpt.save_checkpoint(self.accelerator, root, name, progress, st.ema, keep=self.recipe.run.keep_checkpoints)

    def _train_epoch(
        self, st: StudentState, step_loss: Any, progress: Progress, epoch: int, log: RunLog, pbar: Any
    ) -> None:
        r, acc = self.recipe, self.accelerator

        def on_log(values: dict[str, float]) -> None:
            log.scalars(values, progress.global_step)
            if pbar is not None:
                pbar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{values['train/loss']:.4f}",
                    lr=f"{values['lr']:.2e}",
                    img_s=f"{values['throughput/train_img_s']:.0f}",
                )

        def on_checkpoint() -> None:
            self._save_step(st, progress)

        train_one_epoch(
            acc,
            st.model,
            st.train_loader,
            st.optimizer,
            st.scheduler,
            step_loss,
            progress,
            epoch=epoch,
            seed=r.run.seed,
            data_seed=data_seed(r),
            log_every=r.run.log_every_steps,
            clip_grad=r.train.clip_grad,
            on_log=on_log,
            checkpoint_every=r.run.checkpoint_every_steps,
            on_checkpoint=on_checkpoint,
            ema=st.ema,
            pbar=pbar,
        )

    def _logged_record(self, epoch: int) -> dict[str, Any] | None:
        """The record metrics.jsonl holds for ``epoch``, if any (a shared run directory)."""
        if not (self.run_dir / "metrics.jsonl").is_file():
            return None
        return next((row for row in reversed(read_metrics(self.run_dir)) if row.get("epoch") == epoch), None)

    def _epoch_record(
        self, st: StudentState, teacher: Teacher | None, progress: Progress, sums: dict[str, float]
    ) -> dict[str, Any]:
        acc = self.accelerator
        student = acc.unwrap_model(st.model, keep_torch_compile=False)
        stats = self._evaluate(student, st.val_loader, teacher)
        student.train()
        n = sums.get("n", 0.0)
        record: dict[str, Any] = {"epoch": progress.epoch, "step": progress.global_step}
        for k in ("loss", "loss_ce", "loss_kd"):
            record[f"train/{k}"] = sums[k] / n if n else math.nan
        record["lr"] = st.optimizer.param_groups[0]["lr"]
        record.update({f"val/{k}": v for k, v in stats.items()})
        if teacher is None:
            record.update({"val/teacher_top1": math.nan, "val/agreement": math.nan, "val/kl": math.nan})
        if st.ema is not None:
            ema_stats = self._evaluate(st.ema.module, st.val_loader, teacher)
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
        st: StudentState,
        teacher: Teacher | None,
        split: SplitData,
        progress: Progress,
        final: dict[str, Any],
        log: RunLog,
        wall: float,
    ) -> dict[str, Any]:
        r, acc = self.recipe, self.accelerator
        student = acc.unwrap_model(st.model, keep_torch_compile=False)
        summary: dict[str, Any] = {
            "run": str(self.run_dir),
            "final": final,
            "best": {"val/top1_fused": progress.best_top1, "epoch": progress.best_epoch},
            "epochs": progress.epoch,
            "steps": progress.global_step,
            "wall_time_s": wall,
            "train_time_s": progress.train_time,
            "throughput_train_img_s": progress.train_images / progress.train_time if progress.train_time else None,
            "teacher": self._teacher_info(teacher),
            "distillation": r.distillation.model_dump(mode="json"),
            "world_size": acc.num_processes,
            "precision": r.train.precision,
            "effective_lr": effective_lr(r.train),
            "data": self._data_info(split),
            "teacher_cache": self.teacher_cache.summary() if self.teacher_cache else {"enabled": False},
            "export": None,
        }
        if self.teacher_cache is not None:
            self.teacher_cache.close()
        if acc.is_main_process:
            if r.run.export:
                summary["export"] = self._export(student, split, summary)
            log.hparams(flatten(recipe_to_dict(r)), {k: v for k, v in final.items() if "/" in k})
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
            print_summary(summary)
        acc.wait_for_everyone()
        return summary

    def _export(self, student: torch.nn.Module, split: SplitData, summary: dict[str, Any]) -> dict[str, Any]:
        r = self.recipe
        out = self.run_dir / "export"
        card = card_info(r.run.name, student, r, split.num_classes, summary, summary["data"], summary["epochs"], "last")
        export_timm(student, out, student_model_args(r.student, split.num_classes), split.class_names, card)
        # Reload through timm alone on a few real validation images: a broken export fails here.
        eval_tf = self.transforms[1]
        probe = torch.stack([eval_tf(split.val[i]["image"].convert("RGB")) for i in range(min(8, len(split.val)))])
        diff = reload_max_diff(student.cpu(), out, probe)
        student.to(self.accelerator.device)
        return {"path": str(out), "reload_max_abs_diff": diff}


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
