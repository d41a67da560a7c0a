"""Evaluate a run, a checkpoint or an exported student.

    python -m distill.evaluate MODEL [--data RECIPE.yaml | IMAGE_FOLDER] [--split val|train]
                               [--checkpoint last|best|PATH] [--ema] [--batch-size N] [--json PATH]

MODEL is a run directory (its newest checkpoint, or --checkpoint), a checkpoint directory, or an
export in any format distill.export writes: the export folder (timm Hub layout), its
``transformers/`` folder, or its ``model.onnx``, ``model.int8.onnx`` or ``model.torchscript.pt``
(preprocessing and class names from the folder's config). IMAGE_FOLDER is either
``<class>/<image>`` folders (all of them are scored, whatever --split says) or a recipe-style root
with ``train/`` (and ``val/`` or ``test/``). The data's classes are matched to the model's outputs
by name, so a folder with some of the model's classes scores correctly; a class the model does not
know is an error. The same table for every kind of model: top-1/top-5 per head it keeps (cls /
dist / fused for a run, a timm folder and a transformers DeiT; an ONNX or TorchScript file or a
plain ViT has its fused output only), over all of the model's outputs, throughput of the forward
pass and peak memory; a table for people and, with --json, the same figures for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from distill.data.sources import folder_overrides
from distill.errors import DistillError
from distill.exports.artifacts import load_artifact, score


def eval_dataset(data: str | None, split: str, fallback: Any) -> tuple[Any, list[str], str]:
    """(HF dataset with image/label columns, its class names, description) from a recipe, a
    folder or the run."""
    from distill.data.sources import load_source
    from distill.recipe.schema import load_recipe

    if data is None:
        if fallback is None:
            raise DistillError("an export has no recipe: pass --data RECIPE.yaml or an image folder")
        cfg = fallback.data
    elif Path(data).is_dir():
        cfg = load_recipe(None, folder_overrides(Path(data))).data
    else:
        cfg = load_recipe(data).data
    source = load_source(cfg)
    ds = source.val if split == "val" else source.train
    where = f"{cfg.path}/{cfg.train_split}" if cfg.train_split == cfg.val_split else f"{cfg.path or ''} {split}"
    return ds, source.class_names, f"{cfg.source} {where} ({len(ds)} images)".replace("  ", " ")


def format_table(result: dict[str, Any], title: str) -> str:
    rows = [(k.replace("_", " "), f"{100 * v:.2f}%") for k, v in result.items() if k.startswith("top")]
    classes = f"{result['data_classes']} of the model's {result['model_classes']}"
    rows += [
        ("images", str(result["images"])),
        ("classes", f"{classes}, matched by {result['classes_matched_by']}"),
        ("throughput", f"{result['throughput_img_s'] or 0:.0f} img/s at batch {result['batch_size']}"),
        ("peak memory", f"{result['peak_memory_mb']:.0f} MB ({result['device']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return title + "\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="run directory, checkpoint directory, export folder or exported file")
    parser.add_argument("--data", default=None, help="recipe YAML or image folder (default: the run's data)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--checkpoint", default="last", help="for a run: last, best or a checkpoint path")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    def go() -> None:
        loaded = load_artifact(Path(args.model), args.checkpoint, args.ema)
        dataset, class_names, what = eval_dataset(args.data, args.split, loaded.recipe)
        result = score(loaded, dataset, args.batch_size, num_workers=args.num_workers, class_names=class_names)
        result.update({"model": loaded.description, "data": what})
        print(format_table(result, f"{loaded.description}\n  on {what}"))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
