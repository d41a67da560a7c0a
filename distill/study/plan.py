"""A study's plan: its variants (``--types``), its grid (``--vary``), and every run as a name and
the overrides that make it, validated by the recipe schema before anything runs.

Runs are seed-major: every variant x cell of seed 0, then seed 1, ... Runs that share a seed see
the same images in the same order with the same augmentation (the data contract), so differences
come from the loss alone, unless a varied key changes the data stream (distill.recipe.keys).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import RecipeError, RunStateError
from distill.study.naming import VARIANT_SETTINGS, setting_names, setting_value, value_text
from distill.study.record import StudyRecord

TYPES = ("none", "soft", "hard")


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
        # restarted study finds its runs, and names read as the report's (naming.VARIANT_KEYS).
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
    3.0 are one value (refused as a repeat) and names match the report's (naming.value_text)."""
    from distill.recipe.keys import NO_EFFECT, effects
    from distill.recipe.schema import load_recipe, recipe_to_dict

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
                f"--vary {axis.key}: it does not change a run's result (distill.recipe.keys), so its cells "
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


def variant_settings(variants: list[Variant]) -> dict[str, list[str]]:
    """Per type, the keys its named variants set (naming.name_variants names variants by them)."""
    shown: dict[str, list[str]] = {}
    for v in variants:
        shown.setdefault(v.type, [])
        shown[v.type] += [k for k in v.shown if k not in shown[v.type]]
    return {t: keys for t, keys in shown.items() if keys}


def _check_variants(recipe_path: str, variants: list[Variant], overrides: list[str], axes: list[Axis]) -> None:
    """Refuse variants named twice, set twice (in --types and --vary), or the same runs twice."""
    from distill.recipe.schema import load_recipe

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


def _run_name(variant: Variant, cell: Cell, seed: int) -> str:
    name = f"{variant.name}{cell.dirname}-seed{seed}"
    if len(name) > NAME_MAX:
        raise RecipeError(
            f"run directory name '{name}' is {len(name)} characters long (at most {NAME_MAX}); "
            "vary fewer keys or use shorter values"
        )
    return name


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
    ``axes``: the ``--vary`` grid; without it, one cell per variant."""
    from distill.recipe.schema import load_recipe

    base = load_recipe(recipe_path, overrides)  # validate once, before any run starts
    _check_variants(recipe_path, variants, overrides, list(axes))
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
    for seed, v, cell in itertools.product(seeds, variants, grid):
        name = _run_name(v, cell, seed)
        own = [f"run.output_dir={study}", f"run.name={name}", f"run.seed={seed}", f"distillation.type={v.type}"]
        own += [f"distillation.token={str(v.token).lower()}", f"teacher.cache_dir={cache}"]
        runs.append((name, [*shared, *overrides, *cell.overrides, *v.overrides, *own]))
    names = [name for name, _ in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:  # values that differ only in characters a directory name cannot hold
        raise RecipeError(
            f"two cells would share the run directory {clashes[0]} (values that differ only in characters "
            "outside A-Z a-z 0-9 . + -); give values that differ in those"
        )
    return study, runs


def study_record(
    recipe_path: str, variants: list[Variant], seeds: list[int], axes: list[Axis], overrides: list[str],
    recipes: list[tuple[str, Any]],
) -> StudyRecord:  # fmt: skip
    """The study.json record of a plan: its layout, the resolved settings of its recipe with the
    user's overrides, and per (run name, Recipe) what that run changes in them."""
    from distill.recipe.schema import load_recipe, recipe_to_dict
    from distill.study.record import planned_record

    layout = StudyRecord(
        recipe=recipe_path, types=tuple(v.name for v in variants), seeds=tuple(seeds),
        axes=tuple(a.key for a in axes), variant_settings=variant_settings(variants), overrides=tuple(overrides),
    )  # fmt: skip
    settings = recipe_to_dict(load_recipe(recipe_path, overrides))
    return planned_record(layout, settings, [(name, recipe_to_dict(r)) for name, r in recipes])


def refuse_changed_runs(study: Path, recipes: list[tuple[str, Any]]) -> None:
    """Before anything trains: a run of the plan that finished (or has checkpoints) with other
    result-changing settings (distill.recipe.keys, train's resume rule) is refused, unless the
    study starts afresh (run.overwrite=true). A study skips finished runs, so without this it would
    report a run made with other settings as if it were made with these."""
    from distill.recipe.keys import changed_for_resume
    from distill.recipe.schema import recipe_to_dict
    from distill.run.checkpoint import latest_checkpoint
    from distill.run.rundir import RunDir

    for name, recipe in recipes:
        rundir = RunDir(study / name)
        if recipe.run.overwrite or not rundir.recipe_file.is_file():
            continue
        if not rundir.finished() and latest_checkpoint(rundir.checkpoints) is None:
            continue
        changed = changed_for_resume(rundir.saved_recipe(), recipe_to_dict(recipe))
        if changed:
            state = "finished" if rundir.finished() else "was started"
            raise RunStateError(
                f"run {rundir.path} {state} with other settings than this study's: it differs in "
                f"{', '.join(changed)}; pass run.overwrite=true to train the study's runs again from scratch, "
                f"or run.output_dir=... to put this study in another folder"
            )
