"""The recipe reference (docs/recipe-reference.md), generated from the schema so it cannot drift.

The command: parse arguments, call distill.recipe.reference, print. distill.recipe.reference documents the method.
"""

from __future__ import annotations

import argparse
import sys

from distill.recipe.reference import COMMAND, reference_markdown


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m distill.recipe_doc",
        description=f"Print the recipe reference (Markdown). Regenerate the committed one with: {COMMAND}",
    ).parse_args(argv)
    sys.stdout.write(reference_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
