"""Teacher candidates side by side (python -m distill.teachers): what each is, how good and how
well calibrated it is on the validation split, how much it agrees with the others, and its speed.

A candidate (``--candidates SPEC[,SPEC...]``) is one of
- a teacher folder (a timm folder with config.json, as the pipeline stores and exports it),
- a weights file, ``ARCH@FILE`` (a bare file records no architecture; FILE alone takes teacher.model),
- a timm architecture the pipeline trains with the recipe's teacher.train (cached by its key).
Every candidate is one member of an equal-weight ensemble of them all, obtained by the teacher
stage of the ensembles (distill.training.teacher_ensemble): candidates given as weights are loaded
and checked before any candidate is trained.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.errors import RecipeError
from distill.recipe.schema import Recipe, load_recipe

ECE_BINS = 15  # Guo et al. 2017, "On calibration of modern neural networks": 15 equal-width bins


@dataclass(frozen=True)
class Candidate:
    """One teacher candidate: its label in the report and its teacher entry (a member's fields)."""

    label: str
    entry: dict[str, Any]  # model / checkpoint, as a teacher.ensemble member takes them

    def overrides(self) -> list[str]:
        """The recipe overrides that make it the run's one teacher."""
        out = ["teacher.ensemble=null", f"teacher.checkpoint={json.dumps(self.entry.get('checkpoint'))}"]
        if "model" in self.entry:
            out.append(f"teacher.model={self.entry['model']}")
        elif self.entry.get("checkpoint") is not None:
            out.append("teacher.model=null")  # the folder's recorded architecture
        return out


def parse_candidates(text: str, recipe: Recipe) -> list[Candidate]:
    """SPEC[,SPEC...] -> candidates; one that is neither a path nor a timm architecture is refused
    here, before anything is loaded or trained."""
    import timm

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise RecipeError("--candidates is empty; give teacher folders, ARCH@FILE weights or timm architectures")
    out: list[Candidate] = []
    for spec in specs:
        arch, _, file = spec.rpartition("@") if "@" in spec else ("", "", spec)
        path = Path(file).expanduser()
        if path.exists():
            if path.is_dir():
                out.append(Candidate(path.name, {"checkpoint": str(path)}))
            else:
                model = arch or recipe.teacher.model
                if not model:
                    raise RecipeError(f"candidate {spec} is a weights file: name its architecture as ARCH@{file}")
                out.append(Candidate(f"{model}@{path.name}", {"model": model, "checkpoint": str(path)}))
        elif arch or any(ch in spec for ch in "/\\") or spec.endswith((".safetensors", ".pt", ".pth", ".bin")):
            raise RecipeError(f"candidate {spec}: {path} does not exist; give an existing teacher folder or file")
        elif not timm.is_model(spec):
            raise RecipeError(
                f"candidate {spec} is neither an existing file or folder nor a timm architecture "
                "(timm.list_models() lists them); check the spelling"
            )
        else:
            if recipe.teacher.train is None:
                raise RecipeError(f"candidate {spec} is an architecture to train, but the recipe has no teacher.train")
            out.append(Candidate(spec, {"model": spec}))
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"--candidates names a teacher twice: {', '.join(labels)}")
    return out


def ensemble_overrides(candidates: list[Candidate]) -> list[str]:
    """The overrides that make the equal-weight ensemble of every candidate the run's teacher."""
    members = [{**c.entry, "weight": 1.0} for c in candidates]
    return ["teacher.checkpoint=null", f"teacher.ensemble={json.dumps(members)}"]


def ensemble_recipe(recipe_path: str, overrides: list[str], candidates: list[Candidate]) -> Recipe:
    return load_recipe(recipe_path, [*overrides, *ensemble_overrides(candidates)])


# Measures ---------------------------------------------------------------------------------------


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - mean
    confidence| weighted by the bin's share of images (Guo et al. 2017, Eq. 3)."""
    conf, pred = probs.max(-1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    which = torch.bucketize(conf, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b+1]]
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += float(inside.double().mean()) * abs(
                float(right[inside].mean()) - float(conf[inside].double().mean())
            )
    return ece


def measures(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1, NLL (nats per image) and ECE of one teacher's validation logits."""
    log_p = F.log_softmax(logits.double(), -1)
    return {
        "top1": float((logits.argmax(-1) == labels).double().mean()),
        "nll": float(F.nll_loss(log_p, labels)),
        "ece": calibration_error(log_p.exp(), labels),
    }


def agreement(predictions: list[torch.Tensor]) -> np.ndarray:
    """Share of validation images on which candidates i and j predict the same class."""
    n = len(predictions)
    out = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = float((predictions[i] == predictions[j]).double().mean())
    return out


@dataclass
class Measured:
    """Every candidate's validation logits and speed, and the ensemble's logits."""

    labels: torch.Tensor
    logits: list[torch.Tensor]  # per candidate (images, classes)
    ensemble: torch.Tensor
    images_per_s: list[float]  # per candidate, its forward on this machine
    described: list[dict[str, Any]]


def measure_teachers(recipe: Recipe) -> Measured:
    """Obtain the candidates (the ensemble recipe's members) and run each over the validation split."""
    from distill.data.pipeline import eval_loader
    from distill.data.sources import load_source
    from distill.models.ensemble import combine_logits
    from distill.models.student import student_input_spec
    from distill.training.teacher_stage import obtain_teacher
    from distill.training.trainer import make_accelerator

    acc = make_accelerator(recipe)
    split = load_source(recipe.data)
    spec = student_input_spec(recipe)
    ensemble = obtain_teacher(acc, recipe, split, spec)  # the recipe's teacher.ensemble: every candidate
    loader = eval_loader(split.val, spec, recipe.eval.batch_size, recipe.data.num_workers)
    per: list[list[torch.Tensor]] = [[] for _ in ensemble.members]
    seconds, labels = [0.0] * len(ensemble.members), []
    timed = 0  # images in the timed batches: the first batch warms each member up and is not timed
    for k, batch in enumerate(loader):
        images = batch["image"].to(acc.device)
        labels.append(batch["label"])
        for i, member in enumerate(ensemble.members):
            start = time.perf_counter()
            out = member(images)
            if images.is_cuda:
                torch.cuda.synchronize()
            seconds[i] += (time.perf_counter() - start) if k else 0.0
            per[i].append(out.cpu())
        timed += len(images) if k else 0
    logits = [torch.cat(p) for p in per]
    count = timed
    mixed = combine_logits(logits, ensemble.shares, ensemble.combine, ensemble.tau)
    described = [{**m.describe(), "val_top1": t} for m, t in zip(ensemble.members, ensemble.member_top1, strict=True)]
    return Measured(torch.cat(labels), logits, mixed, [count / s if s else math.nan for s in seconds], described)
