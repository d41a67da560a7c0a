"""The soft-vs-hard study: every type x seed as a run of its own, then the report.

    python -m distill.compare RECIPE.yaml --types none,soft,hard --seeds 0,1,2 [a.b=value ...]
    python -m distill.compare RECIPE.yaml --types soft,hard --seeds 0,1,2 \\
        --vary distillation.tau=1,3 --vary distillation.alpha=0.1,0.5
    python -m distill.compare RECIPE.yaml --types none,soft,soft:tau=3:alpha=0.1,hard --seeds 0,1,2
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
runs and resumes the unfinished one; it refuses, before anything trains, runs that finished with
other result-changing settings (run.overwrite=true trains them again, run.output_dir=... starts
the study in another folder).

``--vary KEY=v1,v2`` (repeatable) makes a grid: types x every combination of the varied values x
seeds, each cell a run named by its settings (``soft-tau3-alpha0.1-seed0``; the report says
``soft tau=3 alpha=0.1``). Values are parsed as YAML, like overrides, and every cell's recipe is
validated before anything runs. Cells that share a seed share the data stream unless a varied key
changes it (data.augment.*, train.batch_size: distill.recipe.keys), and the report pairs them over
their shared seeds.

A type may carry distillation settings of its own, ``soft:tau=3:alpha=0.1`` (tau, alpha,
kl_norm, where they act): a variant beside plain ``soft``, run over the same seeds and data, named
``soft-tau3-alpha0.1-seed0`` on disk and ``soft tau=3 alpha=0.1`` in the report, which compares it
with every other variant (one study for the code's and the paper's soft settings).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by accelerate launch: see distill/train.py
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from distill.study.runner import StudyOptions, run_study


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-compare",
        description="Soft vs hard (vs none) distillation over seeds, then a report with confidence intervals. "
        "By default 3 types (none, soft, hard) x 3 seeds (0, 1, 2) = 9 runs.",
    )
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run: a.b=value")
    p.add_argument(
        "--types",
        default="none,soft,hard",
        help="comma-separated: none, soft, hard, soft-notoken, hard-notoken, ...; a type may carry its own "
        "distillation settings: soft:tau=3:alpha=0.1 (a variant of its own, beside plain soft) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated integers, each a run of every type (and cell); the seeds are the replicates the "
        "report's intervals are computed over, at least 2 for an interval (default: %(default)s)",
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a recipe key and its values (YAML), repeatable: the study runs every combination "
        "(e.g. --vary distillation.tau=1,3 --vary distillation.alpha=0.1,0.5)",
    )
    p.add_argument("--out", default=None, help="report directory (default: <study>/report)")
    p.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="recompute the teacher in every run instead of replaying its outputs (teacher.output_cache)",
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="one data stream (order, augmentation, mixup) for every seed: seeds then vary only the "
        "model's randomness, and the teacher runs once for the whole study",
    )
    p.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip python -m distill.analyze on each finished run (the report's 'Inside the students')",
    )
    p.add_argument("--analysis-images", type=int, default=512, help="validation images each analysis uses")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also quantize each finished run's student to int8 (ONNX Runtime, as --format onnx-int8) and "
        "report its top-1 and drop per variant (needs distill[export])",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    args = parser().parse_intermixed_args(argv)  # overrides may follow --types/--seeds
    opts = StudyOptions(
        recipe=args.recipe, overrides=args.overrides, types=args.types, seeds=args.seeds, vary=args.vary,
        out=args.out, teacher_outputs=not args.no_teacher_cache, data_seed=args.data_seed,
        analysis=not args.no_analysis, analysis_images=args.analysis_images, int8=args.int8,
    )  # fmt: skip
    return run_guarded(lambda: run_study(opts))


if __name__ == "__main__":
    sys.exit(main())
