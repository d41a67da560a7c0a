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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from distill import __version__
from distill.data.pipeline import build_pipeline, eval_loader
from distill.data.sources import SplitData, seeded
from distill.errors import RecipeError, TeacherError
from distill.models.spec import InputSpec
from distill.models.teacher import (
    ConvnetTeacher,
    FrozenTeacher,
    FrozenTeacherOptions,
    build_teacher_model,
    checkpoint_architecture,
    folder_label_names,
    load_teacher,
    match_teacher_classes,
    teacher_normalisation,
)
from distill.recipe.keys import TEACHER, fields, stream_layout
from distill.recipe.schema import Recipe
from distill.run.checkpoint import TrainingState
from distill.run.processes import main_value, unique_suffix
from distill.run.records import TEACHER_RECORD_FILE, TrainedTeacher
from distill.run.rundir import teachers_dir
from distill.training.engine import EpochHooks, EpochOptions, Trainee, evaluate_teacher, train_one_epoch
from distill.training.optim import batch_plan, build_optimizer, build_scheduler
from distill.training.progress import ProgressReport
from distill.training.step import Step
from distill.training.teacher_ensemble import obtain_ensemble

TEACHER_INFO = TEACHER_RECORD_FILE  # beside a teacher the pipeline trained (records.TrainedTeacher)


def teacher_key(recipe: Recipe, spec: InputSpec, num_classes: int, processes: int) -> str:
    """The trained-teacher cache key: every field that changes a trained teacher (keys.py), its
    input, the package version (how data is split and augmented may change between them) and,
    in stream mode, the processes and workers that shaped its stream (``processes``: the world
    it is trained in)."""
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
    if (layout := stream_layout(recipe.data, processes)) is not None:  # random mode: no such entry
        material["stream"] = layout
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=list).encode()).hexdigest()[:16]


def cache_dir(recipe: Recipe) -> Path:
    return Path(recipe.teacher.cache_dir or teachers_dir(recipe.run.output_dir))


def train_teacher(accelerator: Accelerator, recipe: Recipe, split: SplitData, spec: InputSpec, out: Path) -> None:
    """Train the teacher with cross-entropy on the student's input pipeline; save it to ``out``.
    Its evaluation is the teacher stage's, on the saved weights (prepare_teacher)."""
    cfg, acc = recipe.teacher.train, accelerator
    assert cfg is not None and recipe.teacher.model is not None
    start = time.perf_counter()
    plan = batch_plan(cfg, acc.num_processes, "teacher.train")
    with seeded(cfg.seed):
        model = build_teacher_model(recipe.teacher.model, split.num_classes, recipe.teacher.model_args, cfg.drop_path)
    pipeline = build_pipeline(
        recipe.data,
        split,
        spec,
        cfg.seed,  # its own data stream: one teacher serves every seed of a study
        per_process_batch=plan.per_process,
        global_batch=plan.global_batch,
        eval_batch=math.ceil(recipe.eval.batch_size / acc.num_processes),
        label_smoothing=cfg.label_smoothing,
    )
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_loader = acc.prepare(model, optimizer, pipeline.train_loader)
    acc.gradient_accumulation_steps = cfg.grad_accum_steps
    steps_per_epoch = len(train_loader) // cfg.grad_accum_steps
    trainee = Trainee(model, train_loader, optimizer, build_scheduler(optimizer, cfg, steps_per_epoch))
    step = Step(pipeline.prepare, label_smoothing=cfg.label_smoothing)
    acc.print(f"teacher: training {recipe.teacher.model} for {cfg.epochs} epochs ({steps_per_epoch} steps each)")
    report = ProgressReport(
        "teacher", cfg.epochs * steps_per_epoch, 0, cfg.epochs, acc.is_main_process, recipe.run.progress_every_s
    )
    # Loss and speed for the progress lines every run.log_every_steps (a flush only reads the
    # sums: the teacher trains the same whatever the interval).
    options = EpochOptions(cfg.seed, max(min(recipe.run.log_every_steps, steps_per_epoch), 1), cfg.clip_grad)
    state = TrainingState()
    for epoch in range(cfg.epochs):
        report.begin_epoch(epoch)
        epoch_start, images = time.perf_counter(), state.train_images
        sums = train_one_epoch(acc, trainee, step, state, epoch, options, EpochHooks(report.values, report=report))
        loss = sums["loss"] / sums["n"] if sums.get("n") else math.nan
        seconds = time.perf_counter() - epoch_start
        report.epoch_end(epoch + 1, seconds, state.train_images - images, f"loss {loss:.4f}")
    report.close()
    # keep_torch_compile=False: under train.compile the prepared teacher is compiled, and timm's
    # save_for_hf cannot read a compiled module's config.
    unwrapped = acc.unwrap_model(model, keep_torch_compile=False).eval()
    acc.print(f"teacher: trained in {time.perf_counter() - start:.0f}s")
    if acc.is_main_process:
        _save_teacher(unwrapped, out, recipe, split, spec, time.perf_counter() - start)
    acc.wait_for_everyone()
    acc.free_memory()  # the next stage prepares the student; nothing of this may linger


def _save_teacher(
    model: torch.nn.Module, out: Path, recipe: Recipe, split: SplitData, spec: InputSpec, train_time_s: float
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
    assert recipe.teacher.model is not None and recipe.teacher.train is not None
    TrainedTeacher(
        architecture=recipe.teacher.model,
        train=recipe.teacher.train.model_dump(mode="json"),
        data=recipe.data.model_dump(mode="json"),
        train_time_s=train_time_s,
    ).write(tmp)
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
        key = teacher_key(recipe, train_spec, split.num_classes, accelerator.num_processes)
        folder = cache_dir(recipe) / f"{cfg.model}-{key}"
        if not main_value(accelerator, TrainedTeacher.exists(folder)):  # one decision for all
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
    options = FrozenTeacherOptions(size, spec.interpolation, order, cfg.inference_mode, cfg.channels_last, cfg.compile)
    module = FrozenTeacher(model, spec.mean, spec.std, mean, std, options)
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
    epochs or another lr, trains it again instead of reusing it."""
    teacher.val_top1 = top1
    threshold = min_top1 if min_top1 is not None else 1.5 / num_classes
    if top1 < threshold and teacher.weights is not None and TrainedTeacher.exists(teacher.weights.parent):
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


@dataclass(frozen=True)
class ReadyTeacher:
    """A loaded teacher that passed its accuracy check, with its validation logits by image index
    (the student's agreement and KL are measured against them at every evaluation)."""

    teacher: ConvnetTeacher
    val_logits: torch.Tensor  # [val images, classes], rows by image index (this process's share filled)
    val_top1: float


def prepare_teacher(accelerator: Accelerator, recipe: Recipe, split: SplitData, spec: InputSpec) -> ReadyTeacher | None:
    """The teacher stage in one call: load the teacher (training it first when the recipe asks
    and none is cached), evaluate it once on the validation split, refuse it below the accuracy
    floor. None when the recipe has no teacher and needs none. Nothing of the student exists yet,
    so a useless teacher costs no student setup."""
    acc = accelerator
    teacher = obtain_teacher(acc, recipe, split, spec)
    if teacher is None:
        return None
    batch = math.ceil(recipe.eval.batch_size / acc.num_processes)
    loader = acc.prepare(eval_loader(split.val, spec, batch, recipe.data.num_workers))
    stats, logits = evaluate_teacher(acc, teacher, loader)
    acc.free_memory()  # the eval loader: the student's run prepares its own
    check_teacher(teacher, stats["top1"], split.num_classes, recipe.teacher.min_top1, acc.is_main_process)
    if teacher.trained_here and acc.is_main_process and teacher.weights is not None:
        folder = teacher.weights.parent
        replace(TrainedTeacher.read(folder), val_top1=stats["top1"], val_top5=stats["top5"]).write(folder)
    acc.print(f"teacher: {teacher.architecture} val top-1 {100 * stats['top1']:.2f}%")
    return ReadyTeacher(teacher, logits, stats["top1"])


def resolve_teacher_model(recipe: Recipe) -> Recipe:
    """The recipe as it will run: teacher.model null takes the architecture a teacher.checkpoint
    folder records; a folder recording another architecture than teacher.model is refused (the
    run would load the folder's, and recipe.yaml and the model card would name the other)."""
    cfg = recipe.teacher
    if cfg.ensemble:  # each member names its own architecture (or its folder does)
        return recipe
    recorded = checkpoint_architecture(cfg.checkpoint) if cfg.checkpoint is not None else None
    if cfg.model is None:
        if recorded is None and (cfg.checkpoint is not None or cfg.train is not None):
            where = f"teacher.checkpoint {cfg.checkpoint} is a weights file" if cfg.checkpoint else "teacher.train"
            raise RecipeError(
                f"teacher.model is null, which takes the architecture from a teacher folder, but {where}; "
                "set teacher.model to the timm architecture"
            )
    elif recorded is not None and recorded != cfg.model:
        raise RecipeError(
            f"teacher.model is {cfg.model} but the teacher.checkpoint folder {cfg.checkpoint} holds a "
            f"{recorded}; set teacher.model={recorded}, or teacher.model=null to take the folder's"
        )
    if recorded is None or cfg.model == recorded:
        return recipe
    return recipe.model_copy(update={"teacher": cfg.model_copy(update={"model": recorded})})
