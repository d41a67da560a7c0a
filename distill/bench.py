"""Benchmark the distillation training step against timm's TokenDistillationTask.

The command: parse arguments, call distill.perf.bench, print. distill.perf.bench documents the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.perf.bench import Options, run_benchmark
from distill.perf.bench_report import format_report
from distill.recipe.schema import load_recipe

MODEL_FLAGS = (
    ("student", "student.model"),
    ("teacher", "teacher.model"),
    ("img_size", "student.img_size"),
    ("patch_size", "student.patch_size"),
    ("embed_dim", "student.embed_dim"),
    ("depth", "student.depth"),
    ("num_heads", "student.num_heads"),
    ("batch_size", "train.batch_size"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-bench",
        description=__doc__.split("\n\n")[0],
        epilog="Give a recipe (with dotted overrides, anywhere on the line), or --student and --teacher.",
    )
    parser.add_argument("inputs", nargs="*", help="RECIPE.yaml and/or dotted overrides such as train.batch_size=32")
    g = parser.add_argument_group("models (without a recipe, or overriding it)")
    g.add_argument("--student", help="timm distilled ViT, e.g. deit_tiny_distilled_patch16_224")
    g.add_argument("--teacher", help="timm model, e.g. resnet50")
    for flag in ("img-size", "patch-size", "embed-dim", "depth", "num-heads", "batch-size"):
        g.add_argument(f"--{flag}", type=int)
    g.add_argument("--num-classes", type=int, help="default: the recipe's (an image folder's class folders counted)")
    m = parser.add_argument_group("measurement")
    m.add_argument("--warmup", type=int, default=2, help="untimed steps before each timed run")
    m.add_argument("--steps", type=int, default=6, help="timed steps per run")
    m.add_argument("--repeats", type=int, default=3, help="alternating repetitions of every configuration")
    m.add_argument("--kd", choices=("hard", "soft"), default=None, help="default: the recipe's type, else hard")
    m.add_argument(
        "--compile",
        choices=("no", "auto", "yes"),
        nargs="?",
        const="yes",
        default="auto",
        help="fast path: torch.compile student and teacher (--compile alone: yes); auto: when its measured "
        "compile time pays back within the recipe's steps (never without a recipe)",
    )
    m.add_argument(
        "--fast-precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: the faster of fp32 and bf16 (where it runs) on the recipe's step",
    )
    m.add_argument(
        "--fast-attention",
        choices=("auto", "fused", "manual"),
        default="auto",
        help="auto: the faster of fused (scaled_dot_product_attention) and manual (timm's matrix products)",
    )
    m.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    m.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    m.add_argument("--peak-seconds", type=float, default=1.0, help="time spent on each matmul peak")
    m.add_argument("--peak-size", type=int, default=None, help="matmul peak matrix side (default 2048 CPU, 8192 GPU)")
    m.add_argument(
        "--loader-batches",
        type=int,
        default=20,
        help="with a recipe: time this many batches of its input pipeline against the step (0: skip)",
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, str | None, list[str]]:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    recipe_paths = [a for a in args.inputs if "=" not in a]
    overrides = [a for a in args.inputs if "=" in a]
    if len(recipe_paths) > 1:
        parser.error(f"one recipe at most, got {recipe_paths}")
    recipe_path = recipe_paths[0] if recipe_paths else None
    if recipe_path is None and not (args.student and args.teacher):
        parser.error("give a recipe, or --student and --teacher")
    overrides += [f"{key}={getattr(args, name)}" for name, key in MODEL_FLAGS if getattr(args, name) is not None]
    if args.batch_size is not None:
        overrides.append("train.grad_accum_steps=1")
    return args, recipe_path, overrides


def options(args: argparse.Namespace, recipe_path: str | None, overrides: list[str], argv: list[str]) -> Options:
    return Options(
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        kd=args.kd,
        compile=args.compile,
        fast_precision=args.fast_precision,
        fast_attention=args.fast_attention,
        threads=args.threads,
        device=args.device,
        num_classes=args.num_classes,
        peak_seconds=args.peak_seconds,
        peak_size=args.peak_size,
        mode="recipe" if recipe_path else "models",
        loader_batches=args.loader_batches,
        source=" ".join([recipe_path or "(models)", *overrides]),
        argv=argv,
    )


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    args, recipe_path, overrides = parse_args(argv)

    def go() -> None:
        recipe = load_recipe(recipe_path, overrides)
        opts = options(args, recipe_path, overrides, list(sys.argv[1:] if argv is None else argv))
        result = run_benchmark(recipe, opts)
        print(format_report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
