"""Path -> loaded model with its input spec: a run directory, a checkpoint folder or a timm Hub
export. ``evaluate`` and ``export`` (and later analyses) load models here and nowhere else, and
``score`` measures a loaded model on a split with its own eval preprocessing.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import checkpoint as ckpt
from distill.config import Recipe, load_recipe
from distill.errors import DistillError
from distill.pipeline import InputSpec, eval_loader, student_input_spec
from distill.rundir import RunDir


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on the CPU
    spec: InputSpec  # what it expects: size, normalisation, eval crop, interpolation
    description: str
    recipe: Recipe | None = None  # the run's recipe, when the model comes from a run
    run_dir: Path | None = None
    checkpoint: Path | None = None
    progress: dict[str, Any] | None = None  # the checkpoint's progress.json

    def logged_row(self) -> dict[str, Any] | None:
        """The evaluation the run logged at this checkpoint's step, if it evaluated there."""
        if self.run_dir is None or self.progress is None:
            return None
        return RunDir(self.run_dir).logged_at(self.progress["epoch"], self.progress["global_step"])


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    """``last``, ``best`` or a checkpoint folder of ``run_dir``; a complete one or an error."""
    root = RunDir(run_dir).checkpoints
    if which == "last":
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise DistillError(f"{run_dir} has no complete checkpoint in {root}")
        return found
    if which == "best":
        if not (root / ckpt.BEST / ckpt.MARKER).is_file():
            raise DistillError(f"{run_dir} has no complete best checkpoint ({root / ckpt.BEST})")
        return root / ckpt.BEST
    path = Path(which)
    if not (path / ckpt.MARKER).is_file():
        raise DistillError(f"{path} is not a complete checkpoint (no {ckpt.MARKER}); use last, best or a step_* folder")
    return path


def load_checkpoint_student(run_dir: Path, checkpoint: Path, ema: bool = False) -> LoadedModel:
    """The student of ``checkpoint`` (or its EMA), rebuilt from the run's recorded recipe."""
    from safetensors.torch import load_file

    from distill.models import build_student

    recipe = load_recipe(RunDir(run_dir).recipe_file)
    weights = checkpoint / (ckpt.EMA_FILE if ema else "model.safetensors")
    if not weights.is_file():
        hint = " (the run had no EMA: train.ema_decay was null)" if ema else ""
        raise DistillError(f"{weights} does not exist{hint}")
    state = load_file(str(weights))
    if ema:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = int(state["head.weight"].shape[0])
    model = build_student(recipe.student, num_classes, recipe.distillation.token)
    model.load_state_dict(state)
    spec = student_input_spec(recipe)
    model.pretrained_cfg = {**model.pretrained_cfg, **spec.timm_config()}
    progress = json.loads((checkpoint / ckpt.MARKER).read_text())
    what = f"{checkpoint}{' (EMA)' if ema else ''}, epoch {progress['epoch']}, step {progress['global_step']}"
    return LoadedModel(model.eval(), spec, what, recipe, run_dir, checkpoint, progress)


def load_export(folder: Path) -> LoadedModel:
    """A timm Hub folder (our export), through timm alone."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    spec = InputSpec.from_timm(resolve_model_data_config(model))
    return LoadedModel(model, spec, f"export {folder} ({model.pretrained_cfg.get('architecture')})")


def load_artifact(path: Path, checkpoint: str = "last", ema: bool = False) -> LoadedModel:
    """A run directory (its ``checkpoint``: last, best or a folder), a checkpoint folder or an export."""
    path = Path(path)
    if RunDir(path).recipe_file.is_file():
        return load_checkpoint_student(path, resolve_checkpoint(path, checkpoint), ema)
    if (path / ckpt.MARKER).is_file() and RunDir(path.parent.parent).recipe_file.is_file():
        return load_checkpoint_student(path.parent.parent, path, ema)
    if (path / "config.json").is_file():
        return load_export(path)
    raise DistillError(f"{path} is not a run directory, a checkpoint or an export folder (no recipe.yaml/config.json)")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def score(
    loaded: LoadedModel, dataset: Any, batch_size: int, device: torch.device | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Top-1/top-5 per head over ``dataset`` with the model's own eval preprocessing."""
    from distill.metrics import topk_correct
    from distill.models import student_heads

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device).eval()
    loader = eval_loader(dataset, loaded.spec, batch_size, num_workers)
    heads = ("cls", "dist", "fused") if hasattr(model, "head_dist") else ("fused",)
    sums = {f"top{k}_{h}": 0.0 for h in heads for k in (1, 5)}
    n, compute = 0, 0.0
    for i, batch in enumerate(loader):
        images, labels = batch["image"].to(device), batch["label"].to(device)
        start = time.perf_counter()
        if len(heads) == 3:
            cls, dist = student_heads(model, images)
            logits = {"cls": cls, "dist": dist, "fused": (cls + dist) / 2}
        else:
            logits = {"fused": model(images)}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0 or len(loader) == 1:  # the first batch warms up (allocations, kernels)
            compute += time.perf_counter() - start
        for h, out in logits.items():
            for k in (1, 5):
                sums[f"top{k}_{h}"] += float(topk_correct(out.float(), labels, k).sum())
        n += labels.shape[0]
    timed = n - (0 if len(loader) == 1 else min(batch_size, n))
    return {
        **{k: v / n for k, v in sums.items()},
        "images": n,
        "throughput_img_s": timed / compute if compute else None,
        "batch_size": batch_size,
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
    }
