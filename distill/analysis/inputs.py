"""What an analysis looks at besides the student: the validation images and the run's teacher
(as the run obtained it; an analysis never trains one)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from distill.analysis.record import AnalysisError
from distill.errors import DistillError

if TYPE_CHECKING:
    from distill.data.sources import SplitData
    from distill.exports.artifacts import LoadedModel
    from distill.models.teacher import Teacher
    from distill.recipe.schema import Recipe


@dataclass
class AnalysisData:
    """The validation images to look at."""

    split: SplitData  # its .val is analysed
    description: str
    own: bool  # the run's own data: its teacher's outputs are in these classes' order


def analysis_data(data: str | None, loaded: LoadedModel) -> AnalysisData:
    """The run's validation split, or that of ``data``: a recipe YAML, an image-folder root with
    ``train/`` (and ``val/`` or ``test/``), or one split folder of class folders (read as
    ``python -m distill.evaluate`` reads it). An export has no data of its own."""
    from distill.data.sources import folder_overrides, load_source
    from distill.recipe.schema import load_recipe

    if data is None:
        if loaded.recipe is None:
            raise AnalysisError("an export records no data: pass --data RECIPE.yaml or an image folder")
        cfg = loaded.recipe.data
    elif Path(data).is_dir():
        cfg = load_recipe(None, folder_overrides(Path(data))).data
    elif Path(data).is_file():
        cfg = load_recipe(data).data
    else:
        raise AnalysisError(f"--data {data} does not exist; give a recipe YAML or an image folder")
    split = load_source(cfg)
    where = f"{cfg.path}/{cfg.val_split}" if cfg.train_split == cfg.val_split else f"{cfg.path or ''} val"
    own = loaded.recipe is not None and cfg == loaded.recipe.data
    return AnalysisData(split, f"{cfg.source} {where}".replace("  ", " "), own)


def recorded_weights(teacher: dict[str, Any] | None) -> Path | None:
    """The teacher weights file a run's summary.json names, or None when it names none.
    summary.json's teacher entry comes from the teacher's ``describe()``, which writes
    ``str(weights)``: a teacher without a file reads as the string "None" there, where a typed
    teacher record writes null. Both mean "no file", so both are accepted, here and nowhere else."""
    weights = (teacher or {}).get("weights")
    if weights is None or weights in ("", "None"):
        return None
    return Path(weights)


def _recorded_teacher(loaded: LoadedModel) -> tuple[Path | None, str | None]:
    """The teacher folder a finished run's summary.json names, checked by its sha256: (folder,
    None), (None, why not), or (None, None) when the run recorded none (unfinished)."""
    from distill.models.student import file_sha256
    from distill.run.rundir import RunDir

    assert loaded.run_dir is not None
    summary = RunDir(loaded.run_dir).summary()
    recorded = (summary.teacher if summary is not None else None) or {}
    weights = recorded_weights(recorded)
    if weights is None:
        return None, None
    # A relative <run.output_dir>/teachers/... path is relative to where the run was started.
    moved = RunDir(Path(loaded.run_dir).resolve()).teachers / weights.parent.name / weights.name
    found = next((w for w in (weights, moved) if w.is_file()), None)
    if found is None:
        return None, f"the teacher the run recorded ({weights}) is gone"
    if file_sha256(found) != recorded.get("sha256"):
        return None, f"the teacher the run recorded ({found}) has changed since (its sha256 differs)"
    return found.parent, None


def _cached_teacher(loaded: LoadedModel, recipe: Recipe, data: AnalysisData) -> tuple[Path | None, str | None]:
    """The trained-teacher cache folder the run's recipe keys today (an unfinished run)."""
    from distill.run.records import TrainedTeacher
    from distill.run.rundir import RunDir
    from distill.training.teacher_stage import cache_dir, teacher_key

    if recipe.teacher.cache_dir is None and loaded.run_dir is not None:  # <run.output_dir>/teachers, any cwd
        teacher_cfg = recipe.teacher.model_copy(update={"cache_dir": RunDir(Path(loaded.run_dir).resolve()).teachers})
        recipe = recipe.model_copy(update={"teacher": teacher_cfg})
    world = None if loaded.run_dir is None else RunDir(Path(loaded.run_dir).resolve()).recorded_world_size()
    key = teacher_key(recipe, loaded.spec, data.split.num_classes, world or 1)
    folder = cache_dir(recipe) / f"{recipe.teacher.model}-{key}"
    if not TrainedTeacher.exists(folder):
        return None, f"the run's trained teacher is not in {folder} (an analysis does not train one)"
    return folder, None


def run_teacher(loaded: LoadedModel, data: AnalysisData, device: torch.device) -> tuple[Teacher | None, str | None]:
    """The run's teacher as the run obtained it, or (None, why not). ``teacher.checkpoint`` is
    loaded as the run loaded it; a teacher the pipeline trained is the one the run's summary.json
    names (same sha256), else (unfinished run) the cache folder its recipe keys. An analysis
    never trains a teacher."""
    from accelerate import Accelerator

    from distill.training.teacher_stage import obtain_teacher

    recipe = loaded.recipe
    if recipe is None:
        return None, "an export carries no teacher"
    if not data.own:
        return None, "--data is not the run's data: the teacher rows are only computed on the run's own classes"
    cfg = recipe.teacher
    if cfg.checkpoint is None and cfg.train is None:
        return None, "the run had no teacher (no teacher.checkpoint and no teacher.train)"
    if cfg.checkpoint is None:
        folder, why = _recorded_teacher(loaded)
        if folder is None and why is None:
            folder, why = _cached_teacher(loaded, recipe, data)
        if folder is None:
            return None, why
        recipe = recipe.model_copy(update={"teacher": cfg.model_copy(update={"checkpoint": folder, "train": None})})
    try:
        teacher = obtain_teacher(Accelerator(cpu=device.type == "cpu"), recipe, data.split, loaded.spec)
    except DistillError as exc:
        return None, f"the run's teacher cannot be loaded ({exc})"
    return teacher, None
