"""Evaluate a run, a checkpoint or an exported student.

    python -m distill.evaluate MODEL [--data RECIPE.yaml | IMAGE_FOLDER] [--split val|train]
                               [--checkpoint last|best|PATH] [--ema] [--batch-size N] [--json [PATH|-]]

MODEL is a run directory (its newest checkpoint, or --checkpoint), a checkpoint directory, or an
export in any format distill.export writes: the export folder (timm Hub layout), its
``transformers/`` folder, or its ``model.onnx``, ``model.int8.onnx`` or ``model.torchscript.pt``
(preprocessing and class names from the folder's config). IMAGE_FOLDER is ``<class>/<image>``
folders (all of them are scored, whatever --split says), a recipe-style root with ``train/`` (and
``val/`` or ``test/``), or a root holding only ``val/`` or ``test/``. The data's classes are
matched to the model's outputs by name, so a folder with some of the model's classes scores
correctly; a class the model does not know is an error. The same table for every kind of model:
top-1/top-5 per head it keeps (cls / dist / fused for a run, a timm folder and a transformers
DeiT; an ONNX or TorchScript file or a plain ViT has its fused output only; an export of one head,
``--head cls|dist``, that head only), over all of the model's outputs, throughput of the forward
pass and peak memory; a table for people and, with --json, the same figures for scripts (on
standard output with ``--json -``, the table then on standard error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.exports.artifacts import load_artifact, score
from distill.exports.evaluation import eval_dataset, format_table
from distill.exports.progress import ScoreProgress


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
    parser.add_argument(
        "--json", nargs="?", const="-", default=None, metavar="PATH",
        help="also write the figures as JSON to PATH; '-' or no PATH: to standard output (the table goes to stderr)",
    )  # fmt: skip
    parser.add_argument(
        "--progress-every", type=float, default=30.0, metavar="S",
        help="off a terminal, a progress line every S seconds (on stderr; default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def go() -> None:
        loaded = load_artifact(Path(args.model), args.checkpoint, args.ema)
        dataset, class_names, what = eval_dataset(args.data, args.split, loaded.recipe)
        progress = ScoreProgress("evaluate", args.progress_every)
        try:
            result = score(
                loaded, dataset, args.batch_size, num_workers=args.num_workers, class_names=class_names,
                progress=progress,
            )  # fmt: skip
        finally:
            progress.close()
        result.update({"model": loaded.description, "data": what})
        to_stdout = args.json == "-"
        print(format_table(result, f"{loaded.description}\n  on {what}"), file=sys.stderr if to_stdout else sys.stdout)
        if to_stdout:
            print(json.dumps(result, indent=1))
        elif args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
