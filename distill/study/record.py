"""``<study>/study.json``: what distill.compare planned, for the report it writes and for
``python -m distill.report`` on the folder later. One typed record, one writer, one reader.

It holds the study's layout (its types in order, seeds, --vary axes, the settings its named
variants set) and its resolved settings: the recipe every run starts from, the user's overrides
included, and per run the result-changing keys (distill.recipe.keys) where that run differs from
it (type, seed, cell). The report checks every run against them, so that it never reports a run
made with other settings. A file without a version (written before the settings were recorded)
is read as version 0: its layout is used, its runs cannot be checked.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import DistillError
from distill.recipe.keys import changed_for_resume
from distill.study.naming import setting_value

STUDY_FILE = "study.json"
STUDY_VERSION = 1
# Where a run lives: a study folder may be moved or copied whole, its runs' results unchanged.
PLACE_KEYS = frozenset({"run.name", "run.output_dir"})


@dataclass(frozen=True)
class StudyRecord:
    recipe: str = ""  # the recipe file as given
    types: tuple[str, ...] = ()  # --types, as run directories name them
    seeds: tuple[int, ...] = ()
    axes: tuple[str, ...] = ()  # --vary keys, in the order cells are named by
    variant_settings: dict[str, list[str]] = field(default_factory=dict)  # type -> keys its named variants set
    overrides: tuple[str, ...] = ()  # the user's a.b=value overrides, as typed
    settings: dict[str, Any] | None = None  # the resolved recipe every run starts from; None: version 0
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> {dotted key: value} it differs in
    version: int = STUDY_VERSION

    def expected(self, run: str) -> dict[str, Any]:
        """The resolved recipe tree the study planned for ``run``."""
        if self.settings is None or run not in self.runs:
            raise KeyError(run)
        tree = copy.deepcopy(self.settings)
        for key, value in self.runs[run].items():
            *parents, last = key.split(".")
            node = tree
            for part in parents:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[last] = value
        return tree


def planned_record(
    layout: StudyRecord, settings: dict[str, Any], runs: list[tuple[str, dict[str, Any]]]
) -> StudyRecord:
    """``layout`` with the resolved ``settings`` and, per (run name, resolved recipe tree), the
    result-changing keys where the run differs from them."""
    differs = {}
    for name, tree in runs:
        differs[name] = {k: setting_value(tree, k) for k in changed_for_resume(settings, tree) if k not in PLACE_KEYS}
    return StudyRecord(
        layout.recipe, layout.types, layout.seeds, layout.axes, layout.variant_settings, layout.overrides,
        settings, differs,
    )  # fmt: skip


def write_study(folder: Path, record: StudyRecord) -> Path:
    path = Path(folder) / STUDY_FILE
    path.write_text(json.dumps(asdict(record), indent=1, default=str))
    return path


def read_study(folder: Path) -> StudyRecord | None:
    """The record in ``folder``/study.json, or None where there is none."""
    path = Path(folder) / STUDY_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DistillError(f"{path} is not valid JSON ({exc}); delete it or run distill.compare again") from None
    version = raw.get("version", 0)
    if not isinstance(version, int) or version > STUDY_VERSION:
        raise DistillError(
            f"{path} has version {version}, newer than this distill reads ({STUDY_VERSION}); update distill"
        )
    return StudyRecord(
        recipe=str(raw.get("recipe", "")),
        types=tuple(raw.get("types", ())),
        seeds=tuple(int(s) for s in raw.get("seeds", ())),
        axes=tuple(raw.get("axes", ())),
        variant_settings={t: list(k) for t, k in (raw.get("variant_settings") or {}).items()},
        overrides=tuple(raw.get("overrides", ())),
        settings=raw.get("settings") if version >= 1 else None,
        runs=raw.get("runs") or {} if version >= 1 else {},
        version=version,
    )


def study_of(run_dirs: list[Path]) -> StudyRecord | None:
    """The record of the study holding every one of ``run_dirs``, or None when they are not one
    study's runs or it has none."""
    parents = {Path(p).resolve().parent for p in run_dirs}
    return read_study(parents.pop()) if len(parents) == 1 else None


def mismatch(record: StudyRecord, run: str, recipe: dict[str, Any]) -> list[str] | None:
    """The result-changing keys where a run's recipe differs from what ``record`` planned for it
    (places aside); None where the record does not plan ``run`` or cannot tell (version 0)."""
    if record.settings is None or run not in record.runs:
        return None
    return [k for k in changed_for_resume(record.expected(run), recipe) if k not in PLACE_KEYS]
