"""``python -m distill``: the commands, one line each. Each runs as ``python -m distill.<command>``
(``--help`` for its options); training runs under ``accelerate launch distill/train.py``."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train a distilled student from a recipe: RECIPE.yaml [a.b=value ...]",
    "launch": "accelerate launch that keeps the run's exit status: [launch options] distill/train.py RECIPE.yaml",
    "compare": "the soft-vs-hard study: every distillation type x seed as a run, then the report",
    "report": "a comparison report (report.md, results.csv, plots) from finished runs",
    "evaluate": "evaluate a run, a checkpoint or an exported student on a recipe's data or an image folder",
    "export": "export a run's student (timm folder and other formats) with its checks and model card",
    "analyze": "look inside a student: the ViT and DeiT papers' analyses",
    "scan": "list every image of a recipe's data that does not decode",
    "shard": "write a recipe's data as shards that data.source=shards reads on any number of nodes",
    "teachers": "rank candidate teachers (and their ensemble) by accuracy, calibration and the student they give",
    "bench": "benchmark the distillation training step against timm's TokenDistillationTask",
    "profile_step": "where a training step's time goes, per precision",
    "recipe_doc": "print the recipe reference (docs/recipe-reference.md) generated from the schema",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(["usage: python -m distill.<command> [options]   (--help on any command)", "", *lines])


def main() -> int:
    print(usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
