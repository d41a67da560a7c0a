"""Where a training step's time goes, per precision: why bf16 stays far from its matmul peak.

The command: parse arguments, call distill.perf.step_profile, print. distill.perf.step_profile documents the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.perf.step_profile import ProfileOptions, format_report, run_profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-profile-step",
        description=__doc__.split("\n\n")[0],
        epilog="Dotted overrides may come anywhere on the line.",
    )
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
    parser.add_argument(
        "--num-classes", type=int, default=None, help="default: the recipe's (an image folder's class folders counted)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--peak-seconds", type=float, default=1.0)
    parser.add_argument("--peak-size", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    args = build_parser().parse_intermixed_args(argv)  # overrides may follow the options
    recipe_path, overrides = args.inputs[0], args.inputs[1:]
    opts = ProfileOptions(
        precisions=_names(args.precisions),
        compile=args.compile,
        backend=args.backend,
        attention=_names(args.attention),
        steps=args.steps,
        repeats=args.repeats,
        num_classes=args.num_classes,
        peak_seconds=args.peak_seconds,
        peak_size=args.peak_size,
        device=args.device,
    )

    def go() -> None:
        result = run_profile(recipe_path, overrides, opts)
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
