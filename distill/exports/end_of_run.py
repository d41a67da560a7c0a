"""The export at the end of a training run, and the timm folder every export starts with.

A finished run writes ``<run>/export/``: timm's Hub layout with its model card, reloaded through
timm alone on a few real validation images, so that a broken export fails the run there.
``python -m distill.export`` (exports.export) writes the same folder for any checkpoint and head,
with other formats next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.exports.card import card_info, model_card
from distill.exports.timm_format import load_timm, write_timm


def export_timm(
    model: nn.Module,
    out_dir: Path,
    model_args: dict[str, Any],
    class_names: list[str],
    info: dict[str, Any],
) -> Path:
    """The timm Hub folder with its model card, written atomically; its config.json also loads in
    transformers (timm_format.write_timm). The card's ``head`` (fused unless given) is recorded."""
    return write_timm(model, out_dir, model_args, class_names, model_card(info), info.get("head", "fused"))


def reload_max_diff(model: nn.Module, export_dir: Path, images: torch.Tensor) -> float:
    """Load the export through timm alone and compare its fused logits with ``model``'s."""
    reloaded = load_timm(export_dir)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        diff = (reloaded(images) - model(images)).abs().max().item()
    model.train(was_training)
    return diff


def export_run_student(
    student: nn.Module, out: Path, recipe: Any, split: Any, summary: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """A finished run's export: the timm folder with its card, reloaded through timm alone on a
    few real validation images (a broken export fails the run here)."""
    from distill.data.pipeline import eval_transform
    from distill.models.spec import InputSpec
    from distill.models.student import student_model_args

    card = card_info(
        recipe.run.name, student, recipe, split.num_classes, summary, summary["data"], summary["epochs"], "last"
    )
    why = timm_unloadable(student)
    args = student_model_args(recipe.student, split.num_classes)
    if why is not None:
        card["not_loadable_by_timm"] = why
        # config.json records the stem in words: its module cannot be written as a timm argument.
        args["embed_layer"] = f"HybridEmbed over {recipe.student.stem} ({recipe.student.stem_stages} stages): distill"
    export_timm(student, out, args, split.class_names, card)
    if why is not None:  # the weights and card are written; a timm reload would build another model
        return {"path": str(out), "reload_max_abs_diff": None, "timm_loadable": False, "why": why}
    eval_tf = eval_transform(InputSpec.from_timm(student.pretrained_cfg))
    probe = torch.stack([eval_tf(split.val[i]["image"].convert("RGB")) for i in range(min(8, len(split.val)))])
    diff = reload_max_diff(student.cpu(), out, probe)
    student.to(device)
    return {"path": str(out), "reload_max_abs_diff": diff, "timm_loadable": True}


def timm_unloadable(student: nn.Module) -> str | None:
    """Why ``timm.create_model("local-dir:...")`` cannot rebuild this student, or None when it can."""
    if hasattr(student.patch_embed, "backbone"):
        return (
            "a hybrid student (student.stem): timm's config.json names an architecture and keyword "
            "arguments, and cannot name the CNN backbone of its patch embedding, so timm alone would "
            "build a plain ViT; load it with distill (distill.exports.artifacts.load_artifact on the run)"
        )
    return None
