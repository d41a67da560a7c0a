"""Looking inside the student: the ViT and DeiT papers' analyses, measured on one model.

- Mean attention distance per layer and head (ViT, Dosovitskiy et al. 2021, fig. 7).
- Position-embedding similarity (ViT fig. 7, centre) and its 2D structure in one number.
- Class/distillation token similarity per layer (DeiT, Touvron et al. 2021, sec. 4: the learned
  tokens have cosine 0.06, the last layer's 0.93) and between the two heads' outputs.
- Disagreement between ground truth, the teacher and each head (DeiT table 4).
- The class and distillation tokens' attention maps, last layer and rollout (Abnar & Zuidema
  2020), over validation images.

``maths`` has the pure tensor functions, ``collect`` reads timm's attention in one pass,
``sections`` turns the pass into analysis.json's typed sections (``record``), ``figures`` and
``markdown`` draw and write them. Here: ``analyze`` (one model, every analysis, every file) and
``analyze_run`` (what a study calls per finished run).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distill.analysis.collect import Collected, attention_modules, collect
from distill.analysis.figures import draw_figures
from distill.analysis.inputs import AnalysisData, analysis_data, run_teacher
from distill.analysis.markdown import write_markdown
from distill.analysis.record import (
    ANALYSIS_FILE,
    AnalysisError,
    AnalysisRecord,
    DataInfo,
    ModelInfo,
    Seconds,
    Skipped,
    write_analysis,
)
from distill.analysis.sections import (
    attention_results,
    disagreement_results,
    maps_results,
    pos_embed_results,
    token_results,
)
from distill.run.rundir import RunDir

if TYPE_CHECKING:
    from distill.exports.artifacts import LoadedModel
    from distill.models.teacher import Teacher


@dataclass(frozen=True)
class AnalysisOptions:
    """How much to look at, and where."""

    images: int | None = 512  # validation images, drawn seeded (None: all of them)
    maps: int = 6  # images whose attention maps are drawn
    batch_size: int = 64
    device: torch.device | None = None  # None: cuda when torch sees a GPU, else cpu


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def select_images(total: int, n: int | None, seed: int = 0) -> list[int]:
    """``n`` validation indices drawn without replacement (seeded, sorted), or all of them: a
    folder's validation split is ordered by class, so its first n would be one class."""
    if n is None or n >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:n].tolist())


def _zeroed_dist_head(model: nn.Module) -> bool:
    """An export made with --head cls zeroes head_dist (its output is then the class head alone)."""
    head = getattr(model, "head_dist", None)
    return isinstance(head, nn.Linear) and not head.weight.any() and (head.bias is None or not head.bias.any())


def _model_info(loaded: LoadedModel, model: nn.Module, source: Path | None) -> ModelInfo:
    return ModelInfo(
        description=loaded.description,
        path=str(source) if source is not None else None,
        run_dir=str(loaded.run_dir) if loaded.run_dir is not None else None,
        checkpoint=str(loaded.checkpoint) if loaded.checkpoint is not None else None,
        progress=loaded.progress,
        architecture=type(model).__name__,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        embed_dim=int(model.embed_dim),
        input={k: list(v) if isinstance(v, tuple) else v for k, v in loaded.spec.timm_config().items()},
    )


def _one_pass(
    loaded: LoadedModel, data: AnalysisData, indices: list[int], teacher: Teacher | None, options: AnalysisOptions
) -> Collected:
    """``collect`` over ``indices`` of the validation split, labels and the teacher's predictions
    mapped to the model's output indices (the data's classes are matched by name)."""
    from tqdm import tqdm

    from distill.data.pipeline import eval_loader
    from distill.exports.artifacts import match_classes

    targets = match_classes(data.split.class_names, loaded.class_names, loaded.model.num_classes, loaded.description)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in eval_loader(data.split.val.select(indices), loaded.spec, options.batch_size):
            yield batch["image"], batch["label"] if targets is None else targets[batch["label"]]

    # disable=None: a bar on a terminal only; in log files (compare runs many analyses) bars run together
    with tqdm(total=len(indices), unit="img", desc="analyze", dynamic_ncols=True, disable=None) as bar:
        col = collect(loaded.model, batches(), teacher, options.maps, options.device, bar.update)
    if targets is not None and "teacher" in col.predictions:  # teacher outputs follow the data's classes
        col.predictions["teacher"] = [targets[p] for p in col.predictions["teacher"]]
    return col


def _notes(record: AnalysisRecord, model: nn.Module, teacher_note: str | None) -> list[str]:
    notes = [teacher_note] if teacher_note else []
    if _zeroed_dist_head(model):
        notes.append("the distillation head is zeroed (an export made with --head cls): its rows show class 0")
    for what, section in (("pos embed", record.pos_embed), ("token similarity", record.token_similarity)):
        if isinstance(section, Skipped):
            notes.append(f"{what} skipped: {section.skipped}")
    return notes


def analyze(
    loaded: LoadedModel,
    data: AnalysisData,
    out: Path,
    options: AnalysisOptions | None = None,
    teacher: Teacher | None = None,
    teacher_note: str | None = None,
    source: Path | None = None,
) -> AnalysisRecord:
    """Every analysis of ``loaded`` (a run's checkpoint or an export) on ``options.images`` of
    ``data``'s validation split (default options: AnalysisOptions()): writes
    analysis.json, the figures and analysis.md to ``out`` and returns the record."""
    import timm

    from distill import __version__

    start = time.perf_counter()
    options = options or AnalysisOptions()
    attention_modules(loaded.model)  # a convnet stops here, before any work
    if options.images is not None and options.images < 1:
        raise AnalysisError(f"--images must be at least 1 (or 'all'), got {options.images}")
    device = options.device or default_device()
    options = AnalysisOptions(options.images, options.maps, options.batch_size, device)
    indices = select_images(len(data.split.val), options.images)
    model = loaded.model.to(device).eval()
    col = _one_pass(loaded, data, indices, teacher, options)
    pass_s = time.perf_counter() - start
    record = AnalysisRecord(
        model=_model_info(loaded, model, source),
        data=DataInfo(
            description=data.description,
            images=col.images,
            indices=indices,
            classes=loaded.class_names or data.split.class_names,
        ),
        device=str(device),
        attention_distance=attention_results(col),
        pos_embed=pos_embed_results(model, col.geometry),
        token_similarity=token_results(model, col),
        disagreement=disagreement_results(col, loaded.class_names or data.split.class_names, teacher_note),
        attention_maps=maps_results(col, indices),
        figures={},
        notes=[],
        seconds=Seconds(pass_=pass_s, figures=0.0, total=pass_s),
        versions={"distill": __version__, "torch": torch.__version__, "timm": timm.__version__},
    )
    out.mkdir(parents=True, exist_ok=True)
    figures_start = time.perf_counter()
    figures = draw_figures(record, col.maps, col.map_images, loaded.spec, out)
    now = time.perf_counter()
    seconds = Seconds(pass_=pass_s, figures=now - figures_start, total=now - start)
    record = record.model_copy(
        update={"figures": figures, "notes": _notes(record, model, teacher_note), "seconds": seconds}
    )
    write_markdown(record, out / "analysis.md")
    write_analysis(record, out / ANALYSIS_FILE)
    return record


def analyze_run(run_dir: Path, images: int | None = 512, device: torch.device | None = None) -> Path:
    """The analysis of a finished run's last checkpoint into ``<run>/analysis`` (a study calls
    it for every run); returns the analysis.json path."""
    from distill.exports.artifacts import load_artifact

    device = device or default_device()
    loaded = load_artifact(Path(run_dir), "last", False)
    attention_modules(loaded.model)
    data = analysis_data(None, loaded)
    teacher, note = run_teacher(loaded, data, device)
    out = RunDir(Path(run_dir)).analysis_dir
    analyze(loaded, data, out, AnalysisOptions(images, device=device), teacher, note, source=Path(run_dir))
    return out / ANALYSIS_FILE
