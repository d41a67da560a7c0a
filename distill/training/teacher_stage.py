"""The teacher stage: load the teacher, or train it once and reuse it, then check it.

A teacher trained here is stored as a timm Hub folder under
``<teacher.cache_dir>/<arch>-<key>/`` where the key hashes everything that shapes it (model,
its training section, data, preprocessing, precision). Later runs with the same settings find
it and skip training, so the seeds and types of a study share one teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill import __version__
from distill.data.pipeline import build_pipeline
from distill.data.sources import SplitData, seeded
from distill.errors import RecipeError, TeacherError
from distill.models.metrics import classifier_sample_stats
from distill.models.spec import InputSpec
from distill.models.teacher import (
    ConvnetTeacher,
    FrozenTeacher,
    build_teacher_model,
    folder_label_names,
    load_teacher,
    match_teacher_classes,
    teacher_normalisation,
)
from distill.recipe.keys import TEACHER, fields
from distill.recipe.schema import Recipe
from distill.run.checkpoint import TrainingState
from distill.run.processes import main_value, unique_suffix
from distill.training.engine import evaluate, train_one_epoch
from distill.training.optim import batch_plan, build_optimizer, build_scheduler
from distill.training.progress import ProgressReport
from distill.training.step import Step
from distill.training.teacher_ensemble import obtain_ensemble

TEACHER_INFO = "teacher.json"


def teacher_key(recipe: Recipe, spec: InputSpec, num_classes: int) -> str:
    """The trained-teacher cache key: every field that changes a trained teacher (keys.py), its
    input and the package version (how data is split and augmented may change between them)."""
    # The student's fields and teacher.img_size act on the teacher only through its input spec,
    # hashed itself: a fine-tune at another student size reuses the teacher kept at its own size.
    teacher_fields = {
        k: v for k, v in fields(recipe, TEACHER).items() if not k.startswith("student.") and k != "teacher.img_size"
    }
    material = {
        "fields": teacher_fields,
        "input": spec.timm_config(),
        "num_classes": num_classes,
        "distill": __version__,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=list).encode()).hexdigest()[:16]


def cache_dir(recipe: Recipe) -> Path:
    return Path(recipe.teacher.cache_dir or Path(recipe.run.output_dir) / "teachers")


def train_teacher(accelerator: Accelerator, recipe: Recipe, split: SplitData, spec: InputSpec, out: Path) -> None:
    """Train the teacher with cross-entropy on the student's input pipeline; save it to ``out``."""
    cfg = recipe.teacher.train
    assert cfg is not None
    arch = recipe.teacher.model
    plan = batch_plan(cfg, accelerator.num_processes, "teacher.train")
    with seeded(cfg.seed):
        model = build_teacher_model(arch, split.num_classes, recipe.teacher.model_args, cfg.drop_path)
    pipeline = build_pipeline(
        recipe.data,
        split,
        spec,
        cfg.seed,  # its own data stream: one teacher serves every seed of a study
        per_process_batch=plan.per_process,
        global_batch=plan.global_batch,
        eval_batch=math.ceil(recipe.eval.batch_size / accelerator.num_processes),
        label_smoothing=cfg.label_smoothing,
    )
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, pipeline.train_loader, pipeline.val_loader
    )
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    step = Step(pipeline.prepare, label_smoothing=cfg.label_smoothing)
    progress = TrainingState()
    start = time.perf_counter()
    accelerator.print(f"teacher: training {arch} for {cfg.epochs} epochs ({steps_per_epoch} steps each)")
    report = ProgressReport(
        "teacher", cfg.epochs * steps_per_epoch, 0, cfg.epochs, accelerator.is_main_process, recipe.run.progress_every_s
    )

    for epoch in range(cfg.epochs):
        report.begin_epoch(epoch)
        epoch_start, images = time.perf_counter(), progress.train_images
        train_one_epoch(
            accelerator,
            model,
            train_loader,
            optimizer,
            scheduler,
            step,
            progress,
            epoch=epoch,
            seed=cfg.seed,
            # Loss and speed for the progress lines every run.log_every_steps (a flush only reads
            # the sums: the teacher trains the same whatever the interval).
            log_every=max(min(recipe.run.log_every_steps, steps_per_epoch), 1),
            clip_grad=cfg.clip_grad,
            on_log=report.values,
            report=report,
        )
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        loss = progress.epoch_sums["loss"] / progress.epoch_sums["n"] if progress.epoch_sums.get("n") else math.nan
        progress.epoch_sums = {}
        report.epoch_end(
            epoch + 1, time.perf_counter() - epoch_start, progress.train_images - images, f"loss {loss:.4f}"
        )
    report.close()
    # keep_torch_compile=False: under train.compile the prepared teacher is compiled, and timm's
    # save_for_hf cannot read a compiled module's config.
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False).eval()
    stats = evaluate(accelerator, val_loader, lambda b: classifier_sample_stats(unwrapped(b["image"]), b["label"]))
    accelerator.print(f"teacher: val top-1 {100 * stats['top1']:.2f}% after {time.perf_counter() - start:.0f}s")
    if accelerator.is_main_process:
        _save_teacher(unwrapped, out, recipe, split, spec, stats)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next stage prepares the student; nothing of this may linger


def _save_teacher(
    model: torch.nn.Module,
    out: Path,
    recipe: Recipe,
    split: SplitData,
    spec: InputSpec,
    stats: dict[str, float],
) -> None:
    from timm.models import save_for_hf

    tmp = out.with_name(f"{out.name}.tmp.{unique_suffix()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # The teacher learnt on the student's preprocessing; record it so a later load re-normalises
    # correctly (pretrained_cfg mean/std are what FrozenTeacher compares).
    dc = spec.timm_config()
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: dc[k] for k in ("input_size", "mean", "std")}}
    save_for_hf(
        model,
        str(tmp),
        model_config={"label_names": split.class_names},  # output order; obtain_teacher matches by them
        model_args=dict(recipe.teacher.model_args),
        safe_serialization=True,
    )
    info = {
        "architecture": recipe.teacher.model,
        "val_top1": stats["top1"],
        "val_top5": stats["top5"],
        "train": recipe.teacher.train.model_dump(mode="json") if recipe.teacher.train else None,
        "data": recipe.data.model_dump(mode="json"),
    }
    (tmp / TEACHER_INFO).write_text(json.dumps(info, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another run stored the same teacher first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _folder_normalisation(folder: Path) -> dict[str, Any] | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text()).get("pretrained_cfg", {})
    return {"mean": cfg["mean"], "std": cfg["std"]} if "mean" in cfg and "std" in cfg else None


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    return None if size is None else (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _folder_input_size(folder: Path) -> tuple[int, int] | None:
    config = folder / "config.json"
    if not folder.is_dir() or not config.is_file():
        return None
    size = json.loads(config.read_text()).get("pretrained_cfg", {}).get("input_size")
    return (int(size[-2]), int(size[-1])) if size else None


def teacher_size(accelerator: Accelerator, recipe: Recipe, spec: InputSpec, folder: Path | None) -> tuple[int, int]:
    """The teacher's input size: teacher.img_size, else what its folder records, else the
    student's. Asking a recorded teacher for another size is allowed, with one warning line."""
    asked, recorded = _pair(recipe.teacher.img_size), _folder_input_size(folder) if folder else None
    if asked is not None and recorded is not None and asked != recorded:
        accelerator.print(
            f"warning: teacher {folder} was recorded at {recorded[0]}x{recorded[1]} and runs at "
            f"{asked[0]}x{asked[1]} (teacher.img_size)"
        )
    return asked or recorded or spec.size


def obtain_teacher(
    accelerator: Accelerator, recipe: Recipe, split: SplitData, spec: InputSpec
) -> ConvnetTeacher | None:
    """The frozen teacher on the device, fed student-space batches of ``spec`` (resized to its own
    input size inside), or None when the recipe has none and needs none."""
    cfg = recipe.teacher
    if cfg.ensemble is not None:  # several teachers as one, each obtained as below
        return obtain_ensemble(accelerator, recipe, split, spec, obtain_teacher, check_teacher)  # type: ignore[return-value]
    trained_here, train_time_s = False, None
    if cfg.checkpoint is not None:
        folder = Path(str(cfg.checkpoint)).expanduser()
        size = teacher_size(accelerator, recipe, spec, folder)
        # Before the weights: a folder naming other classes gets both lists, not a head-size error.
        names = folder_label_names(folder) if folder.is_dir() else None
        order = match_teacher_classes(names, split.class_names, str(folder))
        model, arch, weights = load_teacher(cfg, split.num_classes)
        stored = _folder_normalisation(folder) if folder.is_dir() else None
    elif cfg.train is not None:
        # Trained (and keyed) at its own size, on the student's normalisation and crop.
        size = _pair(cfg.img_size) or spec.size
        train_spec = InputSpec(size, spec.mean, spec.std, spec.crop_pct, spec.interpolation)
        folder = cache_dir(recipe) / f"{cfg.model}-{teacher_key(recipe, train_spec, split.num_classes)}"
        if not main_value(accelerator, (folder / TEACHER_INFO).is_file()):  # one decision for all
            start = time.perf_counter()
            train_teacher(accelerator, recipe, split, train_spec, folder)
            trained_here, train_time_s = True, time.perf_counter() - start
        else:
            accelerator.print(f"teacher: reusing {folder} (same teacher settings)")
        # Saved with this split's class names (_save_teacher): a check that they still agree.
        order = match_teacher_classes(folder_label_names(folder), split.class_names, str(folder))
        model, arch, weights = load_teacher(cfg, split.num_classes, folder / "model.safetensors")
        stored = _folder_normalisation(folder)
    elif recipe.distillation.type != "none":
        raise RecipeError(
            f"distillation.type={recipe.distillation.type} needs a teacher: set teacher.checkpoint "
            "to a weights file, or add a teacher.train section so the pipeline trains one"
        )
    else:
        return None
    mean, std = teacher_normalisation(cfg, model, stored)
    module = FrozenTeacher(
        model, spec.mean, spec.std, mean, std, cfg.inference_mode, cfg.channels_last, cfg.compile, order,
        size, spec.interpolation,
    )  # fmt: skip
    module.to(accelerator.device)
    own = InputSpec(size, mean, std, spec.crop_pct, spec.interpolation)  # type: ignore[arg-type]
    teacher = ConvnetTeacher(module, own, arch, weights, trained_here, accelerator.autocast)
    teacher.train_time_s = train_time_s
    return teacher


def check_teacher(
    teacher: ConvnetTeacher, top1: float, num_classes: int, min_top1: float | None, main_process: bool = True
) -> None:
    """Refuse a teacher at (near) chance accuracy: distilling from it only adds noise.

    A teacher the pipeline trained (its cached folder holds teacher.json) needs more training,
    not another checkpoint: say so, and drop it from the cache so that the next run, with more
    epochs or another lr, trains it again instead of reusing it (issue 12)."""
    teacher.val_top1 = top1
    threshold = min_top1 if min_top1 is not None else 1.5 / num_classes
    if top1 < threshold and teacher.weights is not None and (teacher.weights.parent / TEACHER_INFO).is_file():
        folder = teacher.weights.parent
        if main_process:
            shutil.rmtree(folder, ignore_errors=True)
        raise TeacherError(
            f"the teacher the pipeline trained ({teacher.architecture}) scores {100 * top1:.1f}% top-1 "
            f"on the validation split, below the {100 * threshold:.1f}% floor (chance is "
            f"{100 / num_classes:.1f}%): it needs more training. Raise teacher.train.epochs (or tune "
            f"teacher.train.lr), or lower teacher.min_top1; it was removed from the cache ({folder}) "
            "so the next run trains it again"
        )
    if top1 < threshold:
        raise TeacherError(
            f"teacher {teacher.architecture} ({teacher.weights}) scores {100 * top1:.1f}% top-1 on "
            f"the validation split, below the {100 * threshold:.1f}% floor (chance is "
            f"{100 / num_classes:.1f}%); it was likely trained on other data or another class "
            "order. Use the right checkpoint, or lower teacher.min_top1 if this is intended"
        )
