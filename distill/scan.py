"""List every image of a recipe's data that does not decode (corrupt or truncated files).

    python -m distill.scan RECIPE.yaml [a.b=value ...]

Exit status 0 when all images decode, 1 when some do not (they are listed), 2 on a bad recipe.
Training with data.on_bad_image=skip drops exactly these images.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-scan", description="List undecodable images of a recipe's data.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    found: list[int] = []

    def go() -> None:
        from distill.data.sources import bad_images, load_source
        from distill.recipe.schema import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)  # messages name only what the user gave
        # every image is decoded and listed here, so the source must not skip them silently
        split = load_source(recipe.data.model_copy(update={"on_bad_image": "error"}))
        for name, ds in (("train", split.train), ("val", split.val)):
            bad = bad_images(ds)
            for _, path, error in bad:
                print(f"{name}\t{path}\t{error}")
            print(f"{name}: {len(bad)} of {len(ds)} images do not decode", file=sys.stderr)
            found.append(len(bad))

    status = run_guarded(go)
    return status if status else int(any(found))


if __name__ == "__main__":
    sys.exit(main())
