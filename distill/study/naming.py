"""Variant and cell names: what tells groups of runs apart, and how the report and the run
directories write it (``soft tau=3 alpha=0.1`` in a report, ``soft-tau3-alpha0.1`` on disk).

A variant is a distillation type, with or without the distillation token, and the distillation
settings that the study's named variants set (``--types soft,soft:tau=3:alpha=0.1``). A cell is a
variant and its values of the keys that a ``--vary`` grid varies, found from the runs' recipes.
"""

from __future__ import annotations

from typing import Any

from distill.errors import DistillError
from distill.recipe.keys import changed_for_resume
from distill.study.runs import RunRecord

VARIANT_ORDER = ("hard", "soft", "none", "hard-notoken", "soft-notoken", "none-notoken")

# Settings a named variant may carry (``soft:tau=3:alpha=0.1``): the distillation method's own,
# with the types each acts in: tau and kl_norm shape only the soft term, alpha weighs either
# term. This order names them.
VARIANT_SETTINGS = {"tau": ("soft",), "alpha": ("soft", "hard"), "kl_norm": ("soft",)}
VARIANT_KEYS = {f"distillation.{k}": types for k, types in VARIANT_SETTINGS.items()}

# Keys that differ inside a cell (seed, where a run lives) or that the variant already names.
NOT_SETTINGS = frozenset({"run.seed", "run.name", "run.output_dir", "distillation.type", "distillation.token"})


def value_text(value: Any) -> str:
    """A recipe value as a cell's name shows it: 3.0 -> 3, 0.0003 -> 0.0003, None -> null,
    [0.5, 1.0] -> [0.5, 1]. Run directories are named from the same text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def setting_names(keys: list[str]) -> dict[str, str]:
    """dotted key -> its name in a cell's name: the last part (tau), or the whole key where two
    keys share their last part (train.lr and teacher.train.lr)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last, strict=True)}


def setting_value(recipe: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a recipe tree; None where it is absent."""
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def varied_keys(runs: list[RunRecord], order: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The recipe keys that change a result (distill.recipe.keys) and differ between ``runs``,
    less seed, place and variant: a study's --vary axes, found from the runs alone. ``order`` puts
    those keys first, in that order (the study's); the rest follow sorted."""
    found: set[str] = set()
    for run in runs[1:]:
        found.update(changed_for_resume(runs[0].recipe, run.recipe))
    found -= NOT_SETTINGS
    return [k for k in order if k in found] + sorted(found - set(order))


def name_variants(runs: list[RunRecord], shown: dict[str, list[str]]) -> list[str]:
    """Name each run's variant: its type, then its values of the distillation settings that the
    study's named variants of that type set (``shown``: type -> keys, e.g. {"soft":
    ["distillation.tau", "distillation.alpha"]} for ``--types soft,soft:tau=3:alpha=0.1``), so
    ``soft tau=1 alpha=0.5`` sits beside ``soft tau=3 alpha=0.1`` while ``none`` and ``hard`` keep
    their names. Returns those keys: the variants' own, never cell settings."""
    folded: list[str] = []
    for run in runs:
        keys = [k for k in VARIANT_KEYS if k in shown.get(run.kind, ())]
        names = setting_names(keys)
        run.variant = " ".join([run.method, *(f"{names[k]}={value_text(setting_value(run.recipe, k))}" for k in keys)])
        folded += [k for k in keys if k not in folded]
    return folded


def name_cells(
    runs: list[RunRecord], order: list[str] | tuple[str, ...] = (), shown: dict[str, list[str]] | None = None
) -> list[str]:
    """Name each run's variant (name_variants) and its cell after the variant and its values of
    the varied keys (``soft tau=3``); returns those keys. With none, a cell is its variant."""
    folded = name_variants(runs, shown or {})
    keys = [k for k in varied_keys(runs, order) if k not in folded]
    short = setting_names(keys)
    for run in runs:
        run.settings = {k: setting_value(run.recipe, k) for k in keys}
        run.cell = " ".join([run.variant, *(f"{short[k]}={value_text(v)}" for k, v in run.settings.items())])
    return keys


def settings_apart(a: RunRecord, b: RunRecord) -> int:
    """How many settings two cells differ in, the variant counting as one."""
    return (a.variant != b.variant) + sum(a.settings.get(k) != v for k, v in b.settings.items())


def _sort_value(value: Any) -> tuple[int, float, str]:
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0.0, value_text(value))


def group_cells(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by cell (the variant, unless name_cells found settings that differ), seeds ascending;
    cells in VARIANT_ORDER, then by their settings' values. Two runs of one cell with the same
    seed are refused: a cell's seeds are its replicates, and a repeat would count one twice."""
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        groups.setdefault(r.cell, []).append(r)
    for cell, members in groups.items():
        seeds = [r.seed for r in members]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            paths = ", ".join(str(r.path) for r in members if r.seed == twice[0])
            raise DistillError(
                f"runs {paths} are all {cell} with seed {twice[0]}: a report takes one run per {cell} and "
                "seed (seeds are the replicates); pass only one of them"
            )
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}

    def rank(item: tuple[str, list[RunRecord]]) -> tuple[Any, ...]:
        first = item[1][0]
        values = tuple(_sort_value(v) for v in first.settings.values())
        own = tuple(_sort_value(setting_value(first.recipe, k)) for k in VARIANT_KEYS)
        return (order.get(first.method, len(order)), first.method, own, values)

    return dict(sorted(groups.items(), key=rank))
