"""Evaluate a run, a checkpoint or an exported student.

    python -m distill.evaluate MODEL [--data RECIPE.yaml | IMAGE_FOLDER] [--split val|train]
                               [--checkpoint last|best|PATH] [--ema] [--batch-size N] [--json PATH]

MODEL is a run directory (its newest checkpoint, or --checkpoint), a checkpoint directory, or an
export folder (timm Hub layout). Top-1/top-5 per head (cls / dist / fused; an export or a plain
ViT has its fused head only), throughput of the forward pass and peak memory; a table for people
and, with --json, the same figures for scripts.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode
    data_config: dict[str, Any]  # input_size, mean, std, crop_pct, interpolation
    description: str
    recipe: Any = None  # the run's Recipe, when the model comes from a run
    run_dir: Path | None = None
    checkpoint: Path | None = None
    progress: dict[str, Any] | None = None  # the checkpoint's progress.json


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    from distill import checkpoint as ckpt

    root = run_dir / "checkpoints"
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

    from distill.checkpoint import EMA_FILE, MARKER
    from distill.config import load_recipe
    from distill.models import build_student
    from distill.trainer import input_config

    recipe = load_recipe(run_dir / "recipe.yaml")
    weights = checkpoint / (EMA_FILE if ema else "model.safetensors")
    if not weights.is_file():
        hint = " (the run had no EMA: train.ema_decay was null)" if ema else ""
        raise DistillError(f"{weights} does not exist{hint}")
    state = load_file(str(weights))
    if ema:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    num_classes = int(state["head.weight"].shape[0])
    model = build_student(recipe.student, num_classes, recipe.distillation.token)
    model.load_state_dict(state)
    data_config = input_config(recipe, num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, **data_config}
    progress = json.loads((checkpoint / MARKER).read_text())
    what = f"{checkpoint}{' (EMA)' if ema else ''}, epoch {progress['epoch']}, step {progress['global_step']}"
    return LoadedModel(model.eval(), data_config, what, recipe, run_dir, checkpoint, progress)


def load_export(folder: Path) -> LoadedModel:
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    data_config = resolve_model_data_config(model)
    return LoadedModel(model, data_config, f"export {folder} ({model.pretrained_cfg.get('architecture')})")


def load_model(path: Path, checkpoint: str = "last", ema: bool = False) -> LoadedModel:
    path = Path(path)
    if (path / "recipe.yaml").is_file():
        return load_checkpoint_student(path, resolve_checkpoint(path, checkpoint), ema)
    if (path / "progress.json").is_file() and (path.parent.parent / "recipe.yaml").is_file():
        return load_checkpoint_student(path.parent.parent, path, ema)
    if (path / "config.json").is_file():
        return load_export(path)
    raise DistillError(f"{path} is not a run directory, a checkpoint or an export folder (no recipe.yaml/config.json)")


def eval_dataset(data: str | None, split: str, fallback: Any) -> tuple[Any, str]:
    """(HF dataset with image/label columns, description) from a recipe, a folder or the run."""
    from distill.config import load_recipe
    from distill.data import load_source

    if data is None:
        if fallback is None:
            raise DistillError("an export has no recipe: pass --data RECIPE.yaml or an image folder")
        cfg = fallback.data
    elif Path(data).is_dir():
        cfg = load_recipe(None, ["data.source=imagefolder", f"data.path={data}"]).data
    else:
        cfg = load_recipe(data).data
    source = load_source(cfg)
    ds = source.val if split == "val" else source.train
    return ds, f"{cfg.source} {cfg.path or ''} {split} ({len(ds)} images)".replace("  ", " ")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate_model(
    loaded: LoadedModel, dataset: Any, batch_size: int, device: torch.device | None = None, num_workers: int = 0
) -> dict[str, Any]:
    """Top-1/top-5 per head over ``dataset`` with the model's own eval preprocessing."""
    from distill.data import AugmentedDataset, eval_transform, make_loader
    from distill.metrics import topk_correct
    from distill.models import student_heads

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device).eval()
    loader = make_loader(
        AugmentedDataset(dataset, eval_transform(loaded.data_config), 0, train=False),
        batch_size, 0, train=False, num_workers=num_workers,
    )  # fmt: skip
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


def format_table(result: dict[str, Any], title: str) -> str:
    rows = [(k.replace("_", " "), f"{100 * v:.2f}%") for k, v in result.items() if k.startswith("top")]
    rows += [
        ("images", str(result["images"])),
        ("throughput", f"{result['throughput_img_s'] or 0:.0f} img/s at batch {result['batch_size']}"),
        ("peak memory", f"{result['peak_memory_mb']:.0f} MB ({result['device']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return title + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    from distill.cli import run_guarded

    parser = argparse.ArgumentParser(prog="distill-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory, checkpoint directory or export folder")
    parser.add_argument("--data", default=None, help="recipe YAML or image folder (default: the run's data)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--checkpoint", default="last", help="for a run: last, best or a checkpoint path")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    def go() -> None:
        loaded = load_model(Path(args.model), args.checkpoint, args.ema)
        dataset, what = eval_dataset(args.data, args.split, loaded.recipe)
        result = evaluate_model(loaded, dataset, args.batch_size, num_workers=args.num_workers)
        result.update({"model": loaded.description, "data": what})
        print(format_table(result, f"{loaded.description}\n  on {what}"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
