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
runs and resumes the unfinished one.

``--vary KEY=v1,v2`` (repeatable) makes a grid: types x every combination of the varied values x
seeds, each cell a run named by its settings (``soft-tau3-alpha0.1-seed0``; the report says
``soft tau=3 alpha=0.1``). Values are parsed as YAML, like overrides, and every cell's recipe is
validated before anything runs. Cells that share a seed share the data stream unless a varied key
changes it (data.augment.*, train.batch_size: distill/keys.py), and the report pairs them over
their shared seeds.

A type may carry distillation settings of its own, ``soft:tau=3:alpha=0.1`` (tau, alpha,
kl_norm, where they act): a variant beside plain ``soft``, run over the same seeds and data, named
``soft-tau3-alpha0.1-seed0`` on disk and ``soft tau=3 alpha=0.1`` in the report, which compares it
with every other variant (one study for the code's and the paper's soft settings).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file by accelerate launch: see distill/train.py
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from distill.errors import RecipeError

TYPES = ("none", "soft", "hard")


# Settings a named variant may carry (``soft:tau=3:alpha=0.1``): the distillation method's own,
# the types each acts in (report.VARIANT_KEYS names variants by the same keys).
VARIANT_SETTINGS = {"tau": ("soft",), "alpha": ("soft", "hard"), "kl_norm": ("soft",)}


@dataclass(frozen=True)
class Variant:
    """A row of DeiT's Table 3: a distillation type, with or without the distillation token, and
    optionally its own distillation settings (``soft:tau=3:alpha=0.1``, the paper's soft setting
    beside the code's tau 1 / alpha 0.5: DeiT issues #56, #61)."""

    type: str
    token: bool = True
    settings: tuple[tuple[str, str], ...] = ()  # (short key, value as typed), e.g. (("tau", "3"),)

    @property
    def name(self) -> str:
        from distill.study.report import value_text

        base = self.type if self.token else f"{self.type}-notoken"
        return base + "".join(f"-{k}{safe_name(value_text(yaml_value(v)))}" for k, v in self.settings)

    @property
    def overrides(self) -> list[str]:
        return [f"distillation.{k}={v}" for k, v in self.settings]

    @classmethod
    def parse(cls, text: str) -> Variant:
        head, *parts = text.strip().split(":")
        kind, _, suffix = head.partition("-")
        if kind not in TYPES or suffix not in ("", "notoken"):
            raise RecipeError(
                f"unknown study type '{text}'; use {', '.join(TYPES)} or their '-notoken' forms "
                "(e.g. soft-notoken: plain ViT, both terms on the class head), optionally with settings "
                "of their own: soft:tau=3:alpha=0.1"
            )
        settings = []
        for part in parts:
            key, sep, value = part.partition("=")
            key, value = key.strip().removeprefix("distillation."), value.strip()
            if not sep or not value or key not in VARIANT_SETTINGS:
                raise RecipeError(
                    f"bad study type '{text}': after the type come KEY=VALUE settings separated by ':', "
                    f"KEY one of {', '.join(VARIANT_SETTINGS)} (e.g. soft:tau=3:alpha=0.1); vary other keys "
                    "with --vary"
                )
            if kind not in VARIANT_SETTINGS[key]:
                raise RecipeError(
                    f"study type '{text}': distillation.{key} acts only in {' and '.join(VARIANT_SETTINGS[key])} "
                    f"distillation, so '{kind}' runs would not change with it"
                )
            if key in dict(settings):
                raise RecipeError(f"study type '{text}' sets {key} twice")
            settings.append((key, value))
        # One order whatever the typing (soft:alpha=0.1:tau=3 is soft:tau=3:alpha=0.1): a
        # restarted study finds its runs, and names read as the report's (report.VARIANT_KEYS).
        settings.sort(key=lambda kv: list(VARIANT_SETTINGS).index(kv[0]))
        return cls(kind, token=not suffix, settings=tuple(settings))

    @property
    def shown(self) -> list[str]:
        """The recipe keys this variant sets (the report names its type's variants by them)."""
        return [f"distillation.{k}" for k, _ in self.settings]


def yaml_value(text: str) -> object:
    """A value as typed on the command line, read as YAML (as overrides are): '3' -> 3, and a
    number PyYAML leaves as text as the schema reads it: '1e-1' -> 0.1."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads 1e-1 as a string; the schema reads it as 0.1
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise RecipeError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise RecipeError(f"--{what} repeats an entry: {text}")
    return items


# Keys every run of a study gets from the study itself: the option that sets them.
STUDY_KEYS = {
    "distillation.type": "--types",
    "distillation.token": "--types (soft-notoken, hard-notoken, none-notoken)",
    "run.seed": "--seeds",
    "run.name": "the study (each run is named by its cell and seed)",
    "run.output_dir": "the study (its runs live in <run.output_dir>/<run.name>-study)",
}
NAME_MAX = 200  # characters of a run directory's name (file systems allow 255 bytes)


@dataclass(frozen=True)
class Axis:
    """One ``--vary KEY=v1,v2``: a dotted recipe key and its values as typed (YAML text)."""

    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Axis:
        key, sep, rest = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"bad --vary '{text}': expected KEY=v1,v2,..., e.g. --vary distillation.tau=1,3")
        if key in STUDY_KEYS:
            raise RecipeError(f"--vary {key}: {STUDY_KEYS[key]} sets it; vary it there")
        values = split_values(rest)
        if not values:
            raise RecipeError(f"bad --vary '{text}': no values after '='")
        return cls(key, tuple(values))


def split_values(text: str) -> list[str]:
    """``1,3`` -> ['1', '3']; commas inside brackets or quotes stay (``[0.5,1],[0.08,1]``)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [t.strip() for t in items if t.strip()]


def safe_name(text: str) -> str:
    """A value's text as part of a directory name: [0.5, 1.0] -> 0.5_1.0, a/b -> a_b."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


@dataclass(frozen=True)
class Cell:
    """One combination of the varied values: its overrides and its part of the run names."""

    overrides: tuple[str, ...]  # KEY=value, one per axis
    dirname: str  # '-tau3-alpha0.1' (the report names it 'soft tau=3 alpha=0.1' from the recipe)


def cells(recipe_path: str, overrides: list[str], axes: list[Axis], data_seed: int | None = None) -> list[Cell]:
    """Every combination of the axes' values, validated by the recipe schema (a bad key or value
    is the schema's message) and named by the values the recipe resolves them to, so that 3 and
    3.0 are one value (refused as a repeat) and names match the report's (report.value_text)."""
    from distill.recipe.keys import NO_EFFECT, effects
    from distill.recipe.schema import load_recipe, recipe_to_dict
    from distill.study.report import setting_names, setting_value, value_text

    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise RecipeError(f"--vary names a key twice: {', '.join(keys)}")
    if data_seed is not None and "data.seed" in keys:
        raise RecipeError("--vary data.seed: --data-seed sets it; give one or the other")
    texts: list[list[str]] = []
    for axis in axes:
        resolved = []
        for value in axis.values:
            recipe = load_recipe(recipe_path, [*overrides, f"{axis.key}={value}"])
            resolved.append(value_text(setting_value(recipe_to_dict(recipe), axis.key)))
        if effects(axis.key) == NO_EFFECT:
            raise RecipeError(
                f"--vary {axis.key}: it does not change a run's result (distill/keys.py), so its cells "
                "would be the same run; pass it as an override instead"
            )
        repeats = sorted({t for t in resolved if resolved.count(t) > 1})
        if repeats:
            raise RecipeError(f"--vary {axis.key} gives the same value twice: {', '.join(repeats)}")
        texts.append(resolved)
    short = setting_names(keys)
    out = []
    for combo in itertools.product(*[range(len(a.values)) for a in axes]):
        chosen = [(axis, axis.values[i], texts[k][i]) for k, (axis, i) in enumerate(zip(axes, combo, strict=True))]
        cell_overrides = tuple(f"{a.key}={raw}" for a, raw, _ in chosen)
        load_recipe(recipe_path, [*overrides, *cell_overrides])  # the combination, validated as a whole
        dirname = "".join(f"-{short[a.key]}{safe_name(text)}" for a, _, text in chosen)
        out.append(Cell(cell_overrides, dirname))
    return out


def study_layout(variants: list[Variant], axes: list[Axis]) -> dict[str, Any]:
    """What the report needs beyond the runs' recipes: the grid's axes in --vary order, and per
    type the keys its named variants set (report.name_variants)."""
    shown: dict[str, list[str]] = {}
    for v in variants:
        shown.setdefault(v.type, [])
        shown[v.type] += [k for k in v.shown if k not in shown[v.type]]
    return {
        "types": [v.name for v in variants],
        "axes": [a.key for a in axes],
        "variant_settings": {t: keys for t, keys in shown.items() if keys},
    }


def study_plan(
    recipe_path: str,
    variants: list[Variant],
    seeds: list[int],
    overrides: list[str],
    teacher_outputs: bool = True,
    data_seed: int | None = None,
    axes: list[Axis] | tuple[Axis, ...] = (),
) -> tuple[Path, list[tuple[str, list[str]]]]:
    """(study directory, [(run name, overrides)]) for every variant x cell x seed, seed-major.

    ``teacher_outputs``: share the teacher's outputs between runs through the cache in
    ``<study>/teacher_outputs`` (unless the recipe names another directory); the user's own
    overrides come after ours, so they win. ``data_seed``: one data stream for every seed.
    ``axes``: the ``--vary`` grid; without it, one cell per variant named as before."""
    from distill.recipe.schema import load_recipe

    base = load_recipe(recipe_path, overrides)  # validate once, before any run starts
    named = [v.name for v in variants]
    if len(set(named)) != len(named):
        raise RecipeError(
            f"--types names a variant twice: {', '.join(sorted({n for n in named if named.count(n) > 1}))}"
        )
    methods: dict[tuple[object, ...], str] = {}
    for v in variants:
        both = sorted(set(v.shown) & {a.key for a in axes})
        if both:
            raise RecipeError(f"--types {v.name} sets {both[0]}, which --vary varies too; give it in one place")
        # the variant's settings, validated by the schema before anything runs
        d = load_recipe(recipe_path, [*overrides, f"distillation.type={v.type}", *v.overrides]).distillation
        method = (v.type, v.token, *(getattr(d, k) if v.type in acts else None for k, acts in VARIANT_SETTINGS.items()))
        if method in methods:
            raise RecipeError(f"--types {methods[method]} and {v.name} are the same runs (same distillation settings)")
        methods[method] = v.name
    grid = cells(recipe_path, overrides, list(axes), data_seed) if axes else [Cell((), "")]
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
            for cell in grid:
                name = f"{v.name}{cell.dirname}-seed{seed}"
                if len(name) > NAME_MAX:
                    raise RecipeError(
                        f"run directory name '{name}' is {len(name)} characters long (at most {NAME_MAX}); "
                        "vary fewer keys or use shorter values"
                    )
                runs.append(
                    (
                        name,
                        [
                            *shared,
                            *overrides,
                            *cell.overrides,
                            *v.overrides,
                            f"run.output_dir={study}",
                            f"run.name={name}",
                            f"run.seed={seed}",
                            f"distillation.type={v.type}",
                            f"distillation.token={str(v.token).lower()}",
                            f"teacher.cache_dir={cache}",
                        ],
                    )
                )
    names = [name for name, _ in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:  # values that differ only in characters a directory name cannot hold
        raise RecipeError(
            f"two cells would share the run directory {clashes[0]} (values that differ only in characters "
            "outside A-Z a-z 0-9 . + -); give values that differ in those"
        )
    return study, runs


def main(argv: list[str] | None = None) -> int:
    from distill.entrypoint import run_guarded

    parser = argparse.ArgumentParser(
        prog="distill-compare",
        description="Soft vs hard (vs none) distillation over seeds, then a report with confidence intervals.",
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every run: a.b=value")
    parser.add_argument(
        "--types",
        default="none,soft,hard",
        help="none, soft, hard, soft-notoken, hard-notoken, ...; a type may carry its own distillation "
        "settings: soft:tau=3:alpha=0.1 (a variant of its own, beside plain soft)",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a recipe key and its values (YAML), repeatable: the study runs every combination "
        "(e.g. --vary distillation.tau=1,3 --vary distillation.alpha=0.1,0.5)",
    )
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
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also quantize each finished run's student to int8 (ONNX Runtime, as --format onnx-int8) and "
        "report its top-1 and drop per variant (needs distill[export])",
    )
    args = parser.parse_intermixed_args(argv)  # overrides may follow --types/--seeds

    def go() -> None:
        from distill.recipe.schema import load_recipe
        from distill.run.rundir import RunDir
        from distill.run.tracking import check_trackers
        from distill.study.report import STUDY_FILE, build_report
        from distill.training.progress import StudyProgress
        from distill.training.trainer import DistillRun, make_accelerator

        variants = [Variant.parse(t) for t in parse_list(args.types, "types")]
        try:
            seeds = [int(s) for s in parse_list(args.seeds, "seeds")]
        except ValueError:
            raise RecipeError(f"--seeds must be integers, got '{args.seeds}'") from None
        axes = [Axis.parse(text) for text in args.vary]
        study, runs = study_plan(
            args.recipe, variants, seeds, args.overrides, not args.no_teacher_cache, args.data_seed, axes
        )
        recipes = [load_recipe(args.recipe, overrides) for _, overrides in runs]  # every cell, before any run
        layout = study_layout(variants, axes)
        for recipe in recipes:
            check_trackers(recipe.run.trackers)
        accelerator = make_accelerator(load_recipe(args.recipe, args.overrides))
        if accelerator.is_main_process:  # for python -m distill.report on the folder later
            study.mkdir(parents=True, exist_ok=True)
            (study / STUDY_FILE).write_text(json.dumps(layout | {"recipe": args.recipe, "seeds": seeds}, indent=1))
        progress = StudyProgress([r.train.epochs for r in recipes])
        for i, ((name, overrides), recipe) in enumerate(zip(runs, recipes, strict=True)):
            if RunDir(study / name).finished():
                progress.skipped(i)
                accelerator.print(f"study: [{i + 1}/{len(runs)}] {name} finished earlier, skipped")
                continue
            accelerator.print(f"study: [{i + 1}/{len(runs)}] {name}")
            start = time.perf_counter()
            summary = DistillRun(recipe, [args.recipe, *overrides], accelerator=accelerator).run()
            seconds = time.perf_counter() - start
            one_off = (summary.get("teacher") or {}).get("train_time_s") or 0.0  # later runs reuse the teacher
            progress.finished(i, seconds, one_off)
            accelerator.print(progress.line(i, name, seconds, one_off))
        if accelerator.is_main_process and not args.no_analysis:
            from distill.analysis.runner import analyze_run

            for name, _ in runs:  # once per finished run: a restarted study keeps what is current
                done = study / name / "analysis" / "analysis.json"
                if not done.is_file() or done.stat().st_mtime < RunDir(study / name).summary_file.stat().st_mtime:
                    print(f"study: analysing {name}")
                    analyze_run(study / name, args.analysis_images)
        if accelerator.is_main_process and args.int8:
            from distill.exports.export import int8_top1
            from distill.study.report import INT8_FILE

            for name, _ in runs:  # once per finished run, as the analyses
                done = study / name / INT8_FILE
                if not done.is_file() or done.stat().st_mtime < RunDir(study / name).summary_file.stat().st_mtime:
                    print(f"study: int8 top-1 of {name}")
                    done.write_text(json.dumps(int8_top1(study / name), indent=1))
        if accelerator.is_main_process:
            out = Path(args.out) if args.out else study / "report"
            build_report([study / name for name, _ in runs], out, layout["axes"], layout["variant_settings"])
            print(f"study: report in {out / 'report.md'}")
        accelerator.wait_for_everyone()

    return run_guarded(go)


if __name__ == "__main__":
    sys.exit(main())
