"""Where a training step's time goes, per precision: why bf16 stays far from its matmul peak.

The command: parse arguments, call distill.perf.step_profile, print. distill.perf.step_profile documents the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.errors import RecipeError
from distill.perf.step_profile import format_report, run_profile


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(prog="distill-profile-step", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="RECIPE.yaml then dotted overrides such as train.batch_size=32")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (fp16 on a GPU)")
    parser.add_argument("--compile", action="store_true", help="also time each precision with the student compiled")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--attention",
        default="fused,manual",
        help="comma-separated: fused, manual (train.attention's choices), or one SDPA kernel forced: math, "
        "flash, efficient",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3, help="alternated repetitions per variant")
    parser.add_argument("--num-classes", type=int, default=None, help="needed unless the source is digits/synthetic")
    parser.add_argument("--peak-seconds", type=float, default=1.0)
    parser.add_argument("--peak-size", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    recipe_path, overrides = args.inputs[0], args.inputs[1:]

    def go() -> None:
        if args.steps < 1 or args.repeats < 1:
            raise RecipeError("--steps and --repeats must be >= 1")
        result = run_profile(
            recipe_path,
            overrides,
            [p.strip() for p in args.precisions.split(",") if p.strip()],
            args.compile,
            args.backend,
            [a.strip() for a in args.attention.split(",") if a.strip()],
            args.steps,
            args.repeats,
            args.num_classes,
            args.peak_seconds,
            args.peak_size,
        )
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
