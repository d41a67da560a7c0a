"""Entry point: ``accelerate launch distill/train.py RECIPE.yaml [a.b=value ...]``.

Also ``python -m distill.train`` and the ``distill-train`` console script (one process). A user's
error prints ``error: ...`` and exits 2 (143 once stopped by SIGTERM / Ctrl-C); ``accelerate
launch`` reports every failure as status 1 with a traceback of its own, ``python -m distill.launch
[accelerate launch options] distill/train.py ...`` keeps the status (distill/launch.py, README).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (accelerate launch distill/train.py): Python put distill/ first on sys.path.
    # Replace it with the project root so 'distill' is a package and nothing in distill/ can
    # shadow a library module.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="distill-train",
        description="Train a DeiT-style distilled ViT student from a CNN teacher.",
        epilog="Example: accelerate launch distill/train.py recipes/quickstart.yaml train.epochs=3 "
        "(python -m distill.launch in place of accelerate launch keeps the exit status: 2 for an error, "
        "143 when stopped by SIGTERM or Ctrl-C)",
    )
    parser.add_argument("recipe", help="YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides parsed as YAML: a.b=value")
    parser.add_argument(
        "--print-recipe",
        action="store_true",
        help="print the resolved recipe (every default filled in, overrides applied) and exit; "
        "docs/recipe-reference.md explains every key",
    )
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    args = parse_args(argv)

    def go() -> None:
        from distill.recipe.schema import load_recipe
        from distill.training.trainer import DistillRun

        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_recipe:
            from distill.recipe.schema import resolved_recipe_yaml

            sys.stdout.write(resolved_recipe_yaml(recipe))
            return
        DistillRun(recipe, [args.recipe, *args.overrides]).run()

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
