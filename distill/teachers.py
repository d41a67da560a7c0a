"""Compare teacher candidates before choosing one: their validation top-1, NLL and calibration,
their agreement and speed, and optionally a short distillation pilot under each.

    python -m distill.teachers RECIPE.yaml --candidates SPEC[,SPEC...] [--ensemble]
        [--pilot EPOCHS --seeds 0,1] [--out DIR] [a.b=value ...]

SPEC: a teacher folder, a weights file ARCH@FILE, or a timm architecture the pipeline trains with
the recipe's teacher.train (trained once, cached by its key). --ensemble adds the equal-weight
ensemble of the candidates (teacher.combine). Writes report.md, results.csv and figures to
<run.output_dir>/<run.name>-teachers/report/ (or --out); the pilot's runs live beside it.
docs/teachers.md explains the measures and what the pilot can and cannot conclude.
"""

from __future__ import annotations

import argparse
import sys

from distill.study.teachers_report import TeachersOptions, run_teachers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill-teachers", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every teacher and run: a.b=value")
    p.add_argument(
        "--candidates",
        required=True,
        help="comma-separated: teacher folders, ARCH@FILE weights, or timm architectures to train",
    )
    p.add_argument("--ensemble", action="store_true", help="also the equal-weight ensemble of the candidates")
    p.add_argument(
        "--pilot",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="also distil the recipe's student for EPOCHS epochs under each teacher, over --seeds",
    )
    p.add_argument("--seeds", default="0,1", help="the pilot's seeds, comma-separated (default: %(default)s)")
    p.add_argument(
        "--out", default=None, help="report directory (default: <run.output_dir>/<run.name>-teachers/report)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    args = parser().parse_intermixed_args(argv)
    opts = TeachersOptions(
        recipe=args.recipe, candidates=args.candidates, overrides=args.overrides, ensemble=args.ensemble,
        pilot_epochs=args.pilot, seeds=args.seeds, out=args.out,
    )  # fmt: skip
    return run_guarded(lambda: run_teachers(opts))


if __name__ == "__main__":
    sys.exit(main())
