"""The soft-vs-hard study: every type x seed as a run of its own, then the report.

    python -m distill.compare RECIPE.yaml --types none,soft,hard --seeds 0,1,2 [a.b=value ...]
    accelerate launch distill/compare.py RECIPE.yaml --types ... --seeds ... [a.b=value ...]
    python -m distill.launch [accelerate launch options] distill/compare.py RECIPE.yaml ...
        (the same launch; exits 2 on an error, 143 when stopped, where accelerate launch exits 1)

Runs go one after the other inside one launch, on any number of processes, each in
``<run.output_dir>/<run.name>-study/<variant>-seed<k>/``. Runs that share a seed see the same
images in the same order with the same augmentation (the data contract), so differences come
from the loss alone. The teacher is trained or loaded once: the teacher cache key does not
depend on the seed or the distillation type. Its outputs are computed once per data stream and
replayed by the other runs (teacher.output_cache; ``--data-seed N`` gives every seed the same
stream, so the teacher runs once for the whole study). A study started again skips finished
runs and resumes the unfinished one.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file by accelerate launch: see distill/train.py
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from distill.errors import RecipeError

TYPES = ("none", "soft", "hard")


@dataclass(frozen=True)
class Variant:
    """A row of DeiT's Table 3: a distillation type, with or without the distillation token."""

    type: str
    token: bool = True

    @property
    def name(self) -> str:
        return self.type if self.token else f"{self.type}-notoken"

    @classmethod
    def parse(cls, text: str) -> Variant:
        kind, _, suffix = text.strip().partition("-")
        if kind not in TYPES or suffix not in ("", "notoken"):
            raise RecipeError(
                f"unknown study type '{text}'; use {', '.join(TYPES)} or their '-notoken' forms "
                "(e.g. soft-notoken: plain ViT, both terms on the class head)"
            )
        return cls(kind, token=not suffix)


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise RecipeError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise RecipeError(f"--{what} repeats an entry: {text}")
    return items


def study_plan(
    recipe_path: str,
    variants: list[Variant],
    seeds: list[int],
    overrides: list[str],
    teacher_outputs: bool = True,
    data_seed: int | None = None,
) -> tuple[Path, list[tuple[str, list[str]]]]:
    """(study directory, [(run name, overrides)]) for every variant x seed, seed-major.

    ``teacher_outputs``: share the teacher's outputs between runs through the cache in
    ``<study>/teacher_outputs`` (unless the recipe names another directory); the user's own
    overrides come after ours, so they win. ``data_seed``: one data stream for every seed."""
    from distill.config import load_recipe

    base = load_recipe(recipe_path, overrides)  # validate once, before any run starts
    study = Path(base.run.output_dir) / f"{base.run.name}-study"
    cache = base.teacher.cache_dir or Path(base.run.output_dir) / "teachers"
    shared: list[str] = []
    if teacher_outputs:
        outputs_dir = base.teacher.output_cache.dir or study / "teacher_outputs"
        shared += ["teacher.output_cache.enabled=true", f"teacher.output_cache.dir={outputs_dir}"]
    if data_seed is not None:
        shared.append(f"data.seed={data_seed}")
    runs = []
    for seed in seeds:
        for v in variants:
            name = f"{v.name}-seed{seed}"
            runs.append(
                (
                    name,
                    [
                        *shared,
                        *overrides,
                        f"run.output_dir={study}",
                        f"run.name={name}",
                        f"run.seed={seed}",
                        f"distillation.type={v.type}",
                        f"distillation.token={str(v.token).lower()}",
                        f"teacher.cache_dir={cache}",
                    ],
                )
            )
    return study, runs


def main(argv: list[str] | None = None) -> int:
    from distill.cli import run_guarded

    parser = argparse.ArgumentParser(
        prog="distill-compare",
        description="Soft vs hard (vs none) distillation over seeds, then a report with confidence intervals.",
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run: a.b=value")
    parser.add_argument("--types", default="none,soft,hard", help="none, soft, hard, soft-notoken, hard-notoken, ...")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None, help="report directory (default: <study>/report)")
    parser.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="recompute the teacher in every run instead of replaying its outputs (teacher.output_cache)",
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="one data stream (order, augmentation, mixup) for every seed: seeds then vary only the "
        "model's randomness, and the teacher runs once for the whole study",
    )
    parser.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip python -m distill.analyze on each finished run (the report's 'Inside the students')",
    )
    parser.add_argument("--analysis-images", type=int, default=512, help="validation images each analysis uses")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --types/--seeds

    def go() -> None:
        from distill.config import load_recipe
        from distill.progress import StudyProgress
        from distill.report import build_report
        from distill.rundir import RunDir
        from distill.trainer import DistillRun, make_accelerator

        variants = [Variant.parse(t) for t in parse_list(args.types, "types")]
        try:
            seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
        except ValueError:
            raise RecipeError(f"--seeds must be integers, got '{args.seeds}'") from None
        study, runs = study_plan(
            args.recipe, variants, seeds, args.overrides, not args.no_teacher_cache, args.data_seed
        )
        accelerator = make_accelerator(load_recipe(args.recipe, args.overrides))
        recipes = [load_recipe(args.recipe, overrides) for _, overrides in runs]
        progress = StudyProgress([r.train.epochs for r in recipes])
        for i, ((name, overrides), recipe) in enumerate(zip(runs, recipes, strict=True)):
            if RunDir(study / name).finished():
                progress.skipped(i)
                accelerator.print(f"study: [{i + 1}/{len(runs)}] {name} finished earlier, skipped")
                continue
            accelerator.print(f"study: [{i + 1}/{len(runs)}] {name}")
            start = time.perf_counter()
            DistillRun(recipe, [args.recipe, *overrides], accelerator=accelerator).run()
            progress.finished(i, time.perf_counter() - start)
            accelerator.print(progress.line(i, name, time.perf_counter() - start))
        if accelerator.is_main_process and not args.no_analysis:
            from distill.analysis import analyze_run

            for name, _ in runs:  # once per finished run: a restarted study keeps what is current
                done = study / name / "analysis" / "analysis.json"
                if not done.is_file() or done.stat().st_mtime < RunDir(study / name).summary_file.stat().st_mtime:
                    print(f"study: analysing {name}")
                    analyze_run(study / name, args.analysis_images)
        if accelerator.is_main_process:
            out = Path(args.out) if args.out else study / "report"
            build_report([study / name for name, _ in runs], out)
            print(f"study: report in {out / 'report.md'}")
        accelerator.wait_for_everyone()

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
