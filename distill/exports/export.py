"""``python -m distill.export``: export one checkpoint of a run, in the formats asked for, with
the head asked for, and prove the export (checks: parity and re-validation; int8: the drop gate).

The export folder starts as timm's Hub folder with its model card (end_of_run.export_timm); each
other format is written next to it by its writer (onnx_format, torchscript_format,
transformers_format), and export_check.json (check_record.ExportCheck) holds what was measured.
Every refusal that needs no export (an unknown format, a missing package, a student transformers
cannot hold, a calibration sample larger than the training split) comes before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.exports.check_record import ExportCheck, write_check
from distill.exports.formats import FORMATS, TRANSFORMERS_DIR, ExportError, require
from distill.exports.int8 import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_TOP1_DROP, raise_on_drop


@dataclass(frozen=True)
class ExportOptions:
    """What ``run_export`` writes and how it checks it."""

    run_dir: Path
    out: Path
    formats: tuple[str, ...] = ("timm",)  # --format values (resolve_formats adds timm and onnx)
    checkpoint: str = "last"  # last, best or a checkpoint folder
    ema: bool = False
    head: str = "fused"  # fused, cls or dist
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES  # onnx-int8
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP  # onnx-int8: points below fp32 that fail the export
    latency: bool = True  # onnx-int8: time fp32 against int8 on the CPU


def parse_formats(text: str) -> list[str]:
    """--format's comma-separated list, in any letter case."""
    return [f.strip().lower() for f in text.split(",") if f.strip()]


def resolve_formats(formats: list[str] | tuple[str, ...]) -> list[str]:
    """timm first (always written), then the others in the order given; onnx-int8 brings the fp32
    ONNX it is quantized from and compared with."""
    formats = [f.lower() for f in formats]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise DistillError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    wanted = ["timm", *formats]
    if "onnx-int8" in wanted and "onnx" not in wanted:
        wanted.insert(wanted.index("onnx-int8"), "onnx")
    return list(dict.fromkeys(wanted))


def select_head(model: nn.Module, head: str) -> nn.Module:
    """A classifier whose output is exactly one head's logits, in timm's own architecture.

    The distilled model returns (head(cls token) + head_dist(dist token)) / 2 and the tokens
    differ, so neither head can be copied onto the other. Instead the chosen head is doubled and
    the other zeroed: (2 * h(t) + 0) / 2 = h(t), bit for bit in floating point (scaling by 2 is
    exact). timm loads the result as the same architecture; the distillation token still takes
    part in attention, as it did in training. The zeroed head is no head of the export: its
    config.json names the kept one, and every reloader reports that one only.
    """
    if head == "fused":
        return model
    keep, drop = (model.head, model.head_dist) if head == "cls" else (model.head_dist, model.head)
    with torch.no_grad():
        for p in keep.parameters():
            p.mul_(2.0)
        for p in drop.parameters():
            p.zero_()
    return model


def check_run_dir(run_dir: Path) -> None:
    """An export folder given where a run directory belongs gets its own message."""
    from distill.exports.timm_format import timm_folder_config
    from distill.run.rundir import RunDir

    if RunDir(run_dir).recipe_file.is_file():
        return
    if not run_dir.exists():
        raise DistillError(f"run directory {run_dir} does not exist")
    if timm_folder_config(run_dir) is not None or (run_dir / "model.safetensors").is_file():
        parent = f" ({run_dir.parent})" if RunDir(run_dir.parent).recipe_file.is_file() else ""
        raise DistillError(f"{run_dir} is an export; give the run directory{parent}")
    raise DistillError(f"{run_dir} is not a run directory (no recipe.yaml); give the directory a training run wrote")


def _card_results(loaded: Any, summary: dict[str, Any], ema: bool) -> dict[str, Any]:
    """The validation results of the exported weights: the row logged at their checkpoint (the
    EMA's under val/* names for an EMA export), else the run's final ones."""
    row = loaded.logged_row()
    if row is None:
        return summary.get("final", {})
    prefix = "val_ema/" if ema else "val/"
    return {f"val/{k[len(prefix) :]}": v for k, v in row.items() if k.startswith(prefix)}


def _refuse_early(opts: ExportOptions, formats: list[str], model: nn.Module, split: Any) -> None:
    """The refusals that need the student and the data but no export."""
    from distill.exports.int8 import check_calibration_count
    from distill.exports.transformers_format import transformers_problem

    if "onnx-int8" in formats:
        check_calibration_count(opts.calibration_images, split)
    if opts.head != "fused" and not hasattr(model, "head_dist"):
        raise ExportError(f"--head {opts.head}: this student has one head (no distillation token); use --head fused")
    if TRANSFORMERS_DIR in formats and (problem := transformers_problem(model)):
        raise ExportError(f"--format transformers cannot represent this student exactly: {problem}")


def _write_card_folder(opts: ExportOptions, loaded: Any, split: Any, model: nn.Module) -> dict[str, Any]:
    """The timm folder with its card (before any check); returns the card's facts."""
    from distill.exports.card import card_info
    from distill.exports.end_of_run import export_timm
    from distill.models.student import student_model_args
    from distill.run.rundir import RunDir

    recipe = loaded.recipe
    summary = RunDir(opts.run_dir).summary()
    data = summary.get("data") or {
        "source": recipe.data.source, "path": recipe.data.path, "train_size": len(split.train),
        "val_size": len(split.val), "val_origin": split.val_origin,
    }  # fmt: skip
    weights = f"{Path(loaded.checkpoint).name}{' EMA' if opts.ema else ''}, head {opts.head}"
    # The card shows what these weights scored (for --checkpoint best, not the final epoch's).
    shown = {**summary, "final": _card_results(loaded, summary, opts.ema)}
    epoch = loaded.progress["epoch"]
    card = card_info(opts.out.name, model, recipe, split.num_classes, shown, data, epoch, weights)
    card["head"] = opts.head
    export_timm(model, opts.out, student_model_args(recipe.student, split.num_classes), split.class_names, card)
    return card


def run_export(opts: ExportOptions) -> ExportCheck:
    """Export one checkpoint of a run and prove the export: parity, re-validation, int8 figures."""
    from distill.data.sources import load_source
    from distill.exports.artifacts import load_checkpoint_student, resolve_checkpoint
    from distill.exports.card import model_card
    from distill.exports.checks import PROBE_IMAGES, raise_on_failures, revalidate, val_images, write_formats

    formats = resolve_formats(opts.formats)
    for name in dict.fromkeys([*(f.lower() for f in opts.formats), *formats]):  # what was asked for first
        require(FORMATS[name], f"--format {name}")
    check_run_dir(opts.run_dir)
    loaded = load_checkpoint_student(opts.run_dir, resolve_checkpoint(opts.run_dir, opts.checkpoint), opts.ema)
    split = load_source(loaded.recipe.data)
    _refuse_early(opts, formats, loaded.model, split)
    model = select_head(loaded.model, opts.head)
    card = _write_card_folder(opts, loaded, split, model)
    images = val_images(split, loaded.spec, PROBE_IMAGES)
    written = write_formats(model, opts.out, formats, split.class_names, loaded.spec, images, opts.head)
    reval, ours = revalidate(loaded, opts.head, opts.ema, opts.out, formats, split)
    check = ExportCheck(
        checkpoint=str(loaded.checkpoint), ema=opts.ema, head=opts.head, formats=written, revalidation=reval
    )
    if "onnx-int8" in formats:
        check.int8["onnx-int8"] = _int8(opts, loaded, split, ours)
    write_check(opts.out, check)
    (opts.out / "README.md").write_text(model_card(card, check))
    raise_on_failures(check, opts.out)
    for name, q in check.int8.items():
        raise_on_drop(name, q, opts.out)
    return check


def _int8(opts: ExportOptions, loaded: Any, split: Any, ours: dict[str, Any]) -> Any:
    from distill.data.pipeline import data_seed
    from distill.exports.checks import val_images
    from distill.exports.int8 import LATENCY_REPEATS, Int8Inputs, calibration_sample, check_onnx_int8

    seed = data_seed(loaded.recipe)
    given = Int8Inputs(
        split=split, spec=loaded.spec, ours=ours, head=opts.head,
        calibration=calibration_sample(split.train, loaded.spec, opts.calibration_images, seed),
        calibration_seed=seed, batch_size=loaded.recipe.eval.batch_size, max_top1_drop=opts.max_top1_drop,
        latency_probe=val_images(split, loaded.spec, max(LATENCY_REPEATS)) if opts.latency else None,
    )  # fmt: skip
    return check_onnx_int8(opts.out / FORMATS["onnx"].path, opts.out / FORMATS["onnx-int8"].path, given)
