"""A comparison report from finished runs: report.md, results.csv and PNG plots.

    python -m distill.report RUN_DIR [RUN_DIR ...] --out DIR

Runs are grouped into variants (distillation type, with or without the distillation token);
seeds are the replicates. Results are reported as mean +- standard deviation over seeds, and
variants are compared by paired differences over the seeds they share (same data order and
augmentation), with a 95% t-interval: airbench's rule, never one lucky run.

Runs that differ in other settings that change a result (distill/keys.py; a ``distill.compare
--vary`` grid) are grouped into cells named by those settings (``soft tau=3 alpha=0.1``), and
cells that differ in one setting (the variant counts as one) are compared the same way.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.exports.export import init_text
from distill.recipe.keys import changed_for_resume
from distill.run.tracking import read_metrics

VARIANT_ORDER = ("hard", "soft", "none", "hard-notoken", "soft-notoken", "none-notoken")
HEADS = ("cls", "dist", "fused")
# val/kl (metrics.student_sample_stats): KL(teacher || fused student) at temperature 1, per image
KL_HEADER = "KL(teacher ‖ fused student), τ=1"


@dataclass
class RunRecord:
    path: Path
    variant: str
    seed: int
    recipe: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    method: str = ""  # type[-notoken] from the recipe; ``variant`` adds its distillation settings (name_cells)
    cell: str = ""  # the group it is reported in: the variant and its settings (name_cells)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, the varied keys

    def __post_init__(self) -> None:
        self.method = self.method or self.variant
        self.cell = self.cell or self.variant

    @property
    def kind(self) -> str:
        """The distillation type: none, soft or hard."""
        return str(self.recipe["distillation"]["type"])

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1]

    def best(self, key: str = "val/top1_fused") -> float:
        return max(m[key] for m in self.metrics if m.get(key) is not None)


def load_run(path: Path) -> RunRecord:
    path = Path(path)
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json"):
        if not (path / name).is_file():
            raise DistillError(f"{path} is not a finished run: {name} is missing")
    recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    metrics = read_metrics(path)
    if not metrics:
        raise DistillError(f"{path}/metrics.jsonl holds no evaluation")
    d = recipe["distillation"]
    variant = d["type"] if d.get("token", True) else f"{d['type']}-notoken"
    summary = json.loads((path / "summary.json").read_text())
    return RunRecord(path, variant, int(recipe["run"]["seed"]), recipe, metrics, summary)


# ---------------------------------------------------------------------------------------------
# Cells: the settings that tell groups of runs apart

# Keys that differ inside a cell (seed, where a run lives) or that the variant already names.
NOT_SETTINGS = frozenset({"run.seed", "run.name", "run.output_dir", "distillation.type", "distillation.token"})


def value_text(value: Any) -> str:
    """A recipe value as a cell's name shows it: 3.0 -> 3, 0.0003 -> 0.0003, None -> null,
    [0.5, 1.0] -> [0.5, 1]. distill.compare names run directories from the same text."""
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


def varied_keys(runs: list[RunRecord], order: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The recipe keys that change a result (distill/keys.py) and differ between ``runs``, less
    seed, place and variant: a study's --vary axes, found from the runs alone. ``order`` puts
    those keys first, in that order (the study's); the rest follow sorted."""
    found: set[str] = set()
    for run in runs[1:]:
        found.update(changed_for_resume(runs[0].recipe, run.recipe))
    found -= NOT_SETTINGS
    return [k for k in order if k in found] + sorted(found - set(order))


def setting_value(recipe: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a recipe tree; None where it is absent."""
    node: Any = recipe
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# The distillation settings a named variant may set (``--types soft:tau=3:alpha=0.1``; compare's
# VARIANT_SETTINGS), with the types they act in: tau and kl_norm shape only the soft term, alpha
# weighs either term. This order names them.
VARIANT_KEYS = {
    "distillation.tau": ("soft",),
    "distillation.alpha": ("soft", "hard"),
    "distillation.kl_norm": ("soft",),
}


STUDY_FILE = "study.json"  # <study>/study.json: written by distill.compare, read by the report command


def study_layout(run_dirs: list[Path]) -> dict[str, Any]:
    """What distill.compare recorded about the study holding ``run_dirs`` (its --vary axes and
    the settings its named variants set), or {} when they are not one study's runs."""
    parents = {Path(p).resolve().parent for p in run_dirs}
    if len(parents) == 1 and (path := parents.pop() / STUDY_FILE).is_file():
        return json.loads(path.read_text())
    return {}


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
    the varied keys (``soft tau=3``); returns those keys. With none, a cell is its variant, as
    before grids."""
    folded = name_variants(runs, shown or {})
    keys = [k for k in varied_keys(runs, order) if k not in folded]
    short = setting_names(keys)
    for run in runs:
        run.settings = {k: setting_value(run.recipe, k) for k in keys}
        run.cell = " ".join([run.variant, *(f"{short[k]}={value_text(v)}" for k, v in run.settings.items())])
    return keys


def _apart(a: RunRecord, b: RunRecord) -> int:
    """How many settings two cells differ in, the variant counting as one."""
    return (a.variant != b.variant) + sum(a.settings.get(k) != v for k, v in b.settings.items())


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


@dataclass
class Paired:
    mean: float  # mean of a - b
    sd: float
    lo: float  # 95% confidence interval of the mean difference (nan with one pair)
    hi: float
    n: int


def paired_difference(a: list[float], b: list[float]) -> Paired:
    """Mean difference a - b over paired samples, with a two-sided 95% t-interval."""
    from scipy.stats import t

    if len(a) != len(b) or not a:
        raise ValueError("paired samples need equal, non-zero lengths")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return Paired(mean, math.nan, math.nan, math.nan, n)
    sd = statistics.stdev(diffs)
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return Paired(mean, sd, mean - half, mean + half, n)


def verdict(a: str, b: str, p: Paired, unit: str = "points") -> str:
    """A plain sentence: who wins by how much, or that the difference is within noise."""
    seeds = f"{p.n} seed{'s' if p.n != 1 else ''}"
    if p.n < 2:
        return f"{a} - {b}: {p.mean:+.2f} {unit} from {seeds}; too few seeds for a confidence interval"
    if p.lo > 0 or p.hi < 0:
        win, lose, sign = (a, b, 1) if p.mean > 0 else (b, a, -1)
        lo, hi = sorted((sign * p.lo, sign * p.hi))
        return f"{win} beats {lose} by {abs(p.mean):.2f} {unit} (95% CI {lo:.2f} to {hi:.2f}, {seeds})"
    return f"{a} vs {b}: no difference beyond noise ({p.mean:+.2f} {unit}, 95% CI {p.lo:.2f} to {p.hi:.2f}, {seeds})"


# ---------------------------------------------------------------------------------------------
# Tables


def _group(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs by cell (the variant, unless name_cells found settings that differ), seeds ascending;
    cells in VARIANT_ORDER, then by their settings' values."""
    groups: dict[str, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        groups.setdefault(r.cell, []).append(r)
    order = {v: i for i, v in enumerate(VARIANT_ORDER)}

    def rank(item: tuple[str, list[RunRecord]]) -> tuple[Any, ...]:
        first = item[1][0]
        values = tuple(
            (0, v, "") if isinstance(v, (int, float)) else (1, 0, value_text(v)) for v in first.settings.values()
        )
        own = tuple(
            (0, v, "") if isinstance(v, (int, float)) else (1, 0, value_text(v))
            for v in (setting_value(first.recipe, k) for k in VARIANT_KEYS)
        )
        return (order.get(first.method, len(order)), first.method, own, values)

    return dict(sorted(groups.items(), key=rank))


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "n/a"
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def variant_rows(groups: dict[str, list[RunRecord]], unit: str = "variant") -> list[dict[str, str]]:
    rows = []
    for variant, runs in groups.items():
        row = {unit: variant, "seeds": ",".join(str(r.seed) for r in runs)}
        for head in HEADS:
            row[f"final {head}"] = _pm([r.final[f"val/top1_{head}"] for r in runs])
        row["best fused"] = _pm([r.best() for r in runs])
        row["teacher"] = _pm([r.final.get("val/teacher_top1") for r in runs])
        row["agreement"] = _pm([r.final.get("val/agreement") for r in runs])
        row[KL_HEADER] = _pm([r.final.get("val/kl") for r in runs], scale=1.0, digits=3)
        int8 = [_int8(r) for r in runs]
        if any(q is not None for q in int8):  # distill.compare --int8: the student after quantization
            row["int8 fused"] = _pm([q["top1_int8"] if q else None for q in int8])
            row["int8 drop (points)"] = _pm([q["drop_points"] if q else None for q in int8], scale=1.0)
        row["wall s"] = _pm([r.summary.get("wall_time_s") for r in runs], scale=1.0, digits=0)
        row["img/s"] = _pm([r.summary.get("throughput_train_img_s") for r in runs], scale=1.0, digits=0)
        rows.append(row)
    return rows


INT8_FILE = "int8.json"  # <run>/int8.json: distill.export.int8_top1 of the run's final student


def _int8(run: RunRecord) -> dict[str, float] | None:
    path = run.path / INT8_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def comparisons(groups: dict[str, list[RunRecord]], key: str = "val/top1_fused") -> list[tuple[str, str, Paired]]:
    """Paired differences (in points) of the final ``key`` for every pair of cells that differ in
    one setting (the variant counts as one): every pair of variants when nothing else varies. In a
    grid, pairs that differ in two settings at once would not say which one made the difference."""
    out = []
    for a, b in itertools.combinations(groups, 2):
        if _apart(groups[a][0], groups[b][0]) > 1:
            continue
        by_seed_a = {r.seed: r for r in groups[a]}
        by_seed_b = {r.seed: r for r in groups[b]}
        shared = sorted(set(by_seed_a) & set(by_seed_b))
        if not shared:
            continue
        p = paired_difference(
            [100 * by_seed_a[s].final[key] for s in shared], [100 * by_seed_b[s].final[key] for s in shared]
        )
        out.append((a, b, p))
    return out


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    """Columns: every row's keys in order of first appearance; a row without one shows '-' (a
    variant without the distillation token has no dist head to report)."""
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(runs: list[RunRecord], path: Path) -> None:
    """One row per run; a grid adds its cell's name and one column per varied key after 'variant'."""
    keys = [
        "val/top1_cls", "val/top1_dist", "val/top1_fused", "val/top5_fused", "val/teacher_top1",
        "val/agreement", "val/kl", "train/loss", "train/loss_ce", "train/loss_kd",
    ]  # fmt: skip
    settings = list(runs[0].settings)
    grid = ["cell", *settings] if settings else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", *grid, "seed", "run", "epochs", *keys, "best_top1_fused", "wall_time_s", "train_img_s"])
        for r in sorted(runs, key=lambda r: (r.cell, r.seed)):
            cell = [r.cell, *[value_text(r.settings[k]) for k in settings]] if settings else []
            w.writerow(
                [r.variant, *cell, r.seed, str(r.path), r.final["epoch"], *[r.final.get(k) for k in keys], r.best(),
                 r.summary.get("wall_time_s"), r.summary.get("throughput_train_img_s")]
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Plots


def _series(runs: list[RunRecord], key: str) -> tuple[list[int], list[list[float]]]:
    epochs = sorted({m["epoch"] for r in runs for m in r.metrics})
    per_run = []
    for r in runs:
        by_epoch = {m["epoch"]: m.get(key) for m in r.metrics}
        per_run.append([by_epoch.get(e, math.nan) if by_epoch.get(e) is not None else math.nan for e in epochs])
    return epochs, per_run


def plot_curves(groups: dict[str, list[RunRecord]], key: str, ylabel: str, path: Path, scale: float = 100.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in groups.items():
        epochs, per_run = _series(runs, key)
        arr = scale * np.array(per_run, dtype=float)
        mean = np.nanmean(arr, axis=0)
        ax.plot(epochs, mean, label=f"{variant} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{ylabel} (mean over seeds, band: min to max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(groups: dict[str, list[RunRecord]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(max(7.0, 2.0 + 0.8 * len(groups)), 4.5))
    width = 0.8 / len(HEADS)
    x = np.arange(len(groups))
    lows = []
    for i, head in enumerate(HEADS):
        stats = [mean_std([100 * r.final[f"val/top1_{head}"] for r in runs]) for runs in groups.values()]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        lows += [m - s for m, s in stats]
        ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=3, label=head)
    if any(" " in name for name in groups):  # a grid's cell names: slanted so they do not overlap
        ax.set_xticks(x, list(groups), rotation=25, ha="right")
    else:
        ax.set_xticks(x, list(groups))
    bottom = max(0.0, math.floor(min(lows) - 5))
    # A cut axis exaggerates differences: say where it starts, on the axis itself.
    ax.set_ylabel("final val top-1 (%)" + (f", axis from {bottom:.0f}%" if bottom > 0 else ""))
    ax.set_ylim(bottom, 100)
    ax.legend(title="head")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("final top-1 per head (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KL_NORM_NOTE = {"batchmean": "summed KL ÷ batch", "deit": "summed KL ÷ (batch × classes)"}


def _kl_norm(run: RunRecord) -> str:
    return str(run.recipe["distillation"].get("kl_norm", "batchmean"))


def _kd_panels(groups: dict[str, list[RunRecord]]) -> list[tuple[str, str, dict[str, list[RunRecord]]]]:
    """One panel per kind of teacher term, never two kinds on one y-scale.

    soft KD is tau^2 KL(teacher || dist head) (losses.soft_kd) and hard KD a cross-entropy against
    the teacher's argmax (losses.hard_kd); soft runs with different ``kl_norm`` differ by a factor
    of the class count, so they get panels of their own too. ``none`` has no teacher term.
    Returns (title, y-label, the variants' runs in that panel) per panel.
    """
    panels = []
    for kind in ("soft", "hard"):
        runs_of_kind = {v: rs for v, rs in groups.items() if rs[0].kind == kind}
        if not runs_of_kind:
            continue
        if kind == "hard":
            panels.append(("hard KD: CE(dist head, teacher argmax)", "cross-entropy (nats)", runs_of_kind))
            continue
        for norm in sorted({_kl_norm(r) for rs in runs_of_kind.values() for r in rs}):
            sub = {v: [r for r in rs if _kl_norm(r) == norm] for v, rs in runs_of_kind.items()}
            sub = {v: rs for v, rs in sub.items() if rs}
            taus = ", ".join(sorted({str(r.recipe["distillation"]["tau"]) for rs in sub.values() for r in rs}))
            title = f"soft KD: τ²·KL(teacher ‖ dist head)\nτ={taus}, kl_norm={norm} ({KL_NORM_NOTE.get(norm, norm)})"
            panels.append((title, "τ²·KL (nats)", sub))
    return panels


def loss_figure(groups: dict[str, list[RunRecord]]) -> Any:
    """The training-loss figure (a matplotlib Figure): total, label CE, then each teacher term on its own axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    colours = {v: f"C{i}" for i, v in enumerate(groups)}
    panels: list[tuple[str, str, str, dict[str, list[RunRecord]]]] = [
        ("train/loss", "total: (1-α)·CE + α·KD\n(none: CE only; KD differs by type)", "loss", groups),
        ("train/loss_ce", "CE(cls head, labels)\n(none: mean CE of both heads)", "cross-entropy (nats)", groups),
    ]
    panels += [("train/loss_kd", title, ylabel, sub) for title, ylabel, sub in _kd_panels(groups)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    for ax, (key, title, ylabel, sub) in zip(axes[0], panels, strict=True):
        for variant, runs in sub.items():
            epochs, per_run = _series(runs, key)
            ax.plot(epochs, np.nanmean(np.array(per_run, dtype=float), axis=0), label=variant, color=colours[variant])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    suptitle = "training loss parts (epoch means, mean over seeds)"
    if any(rs[0].kind == "none" for rs in groups.values()):
        suptitle += "; runs of type none have no KD term (not plotted)"
    fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def plot_losses(groups: dict[str, list[RunRecord]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = loss_figure(groups)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report


def _settings(runs: list[RunRecord]) -> list[dict[str, str]]:
    """The settings that matter for reading the report, with every distinct value seen."""

    def values(get: Any) -> str:
        seen = sorted({str(get(r)) for r in runs})
        return ", ".join(seen)

    teacher = values(lambda r: (r.summary.get("teacher") or {}).get("architecture", "none"))
    sha = values(lambda r: ((r.summary.get("teacher") or {}).get("sha256") or "n/a")[:16])
    return [
        {"setting": "alpha", "value": values(lambda r: r.recipe["distillation"]["alpha"])},
        {"setting": "tau (soft)", "value": values(lambda r: r.recipe["distillation"]["tau"])},
        {"setting": "soft-KL normalisation", "value": values(lambda r: r.recipe["distillation"]["kl_norm"])},
        {"setting": "epochs", "value": values(lambda r: r.final["epoch"])},
        {"setting": "teacher", "value": teacher},
        {"setting": "teacher sha256 (first 16)", "value": sha},
        {"setting": "student", "value": values(lambda r: r.recipe["student"]["model"])},
        {"setting": "student initialised from", "value": values(lambda r: init_text(r.summary.get("student_init")))},
        {
            "setting": "data",
            "value": values(lambda r: " ".join(filter(None, (r.recipe["data"]["source"], r.recipe["data"]["path"])))),
        },
        {"setting": "global batch", "value": values(lambda r: r.recipe["train"]["batch_size"])},
        {"setting": "lr", "value": values(lambda r: r.recipe["train"]["lr"])},
        {"setting": "processes", "value": values(lambda r: r.summary.get("world_size"))},
        {"setting": "data seed", "value": values(lambda r: _data_seed(r))},
        {"setting": "teacher outputs", "value": _cache_note(runs)},
    ]


def _data_seed(run: RunRecord) -> str:
    seed = run.recipe["data"].get("seed")
    return "run.seed" if seed is None else str(seed)


def _cache_note(runs: list[RunRecord]) -> str:
    """Whether teacher outputs were replayed from the cache (teacher_cache.py), and how."""
    caches = [r.summary.get("teacher_cache") or {} for r in runs]
    used = [c for c in caches if c.get("enabled")]
    if not used:
        return "computed in every run (no cache)"
    replaying = sum(1 for c in used if c.get("train_replayed_images", 0) > 0)
    encodings = ", ".join(sorted({c.get("encoding", "?") for c in used}))
    verified = sum(c.get("verified_batches", 0) for c in used)
    return (
        f"cache on in {len(used)} of {len(runs)} runs ({encodings}); replayed in {replaying}, "
        f"{verified} replayed batches re-checked against a fresh teacher pass, all equal"
    )


# A variant whose fused top-1 still rose this many points over the last quarter of its
# evaluations is called unconverged: its ranking may change with more epochs.
CONVERGED_POINTS = 1.0


def convergence_notes(groups: dict[str, list[RunRecord]]) -> list[str]:
    """A warning per variant whose runs were still improving when they stopped."""
    notes = []
    for variant, runs in groups.items():
        rises = []
        for r in runs:
            curve = [100 * m["val/top1_fused"] for m in r.metrics if m.get("val/top1_fused") is not None]
            if len(curve) >= 2:
                rises.append(curve[-1] - curve[min(len(curve) - 2, (3 * len(curve)) // 4 - 1)])
        if rises and sum(rises) / len(rises) > CONVERGED_POINTS:
            notes.append(
                f"**{variant} had not converged**: its fused top-1 still rose {sum(rises) / len(rises):+.1f} "
                f"points (mean over seeds) over the last quarter of its evaluations; more epochs may "
                "change the comparison"
            )
    return notes


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, sd = mean_std([scale * v for v in values])
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")


def analysis_section(groups: dict[str, list[RunRecord]]) -> list[str]:
    """ "Inside the students": each variant's analysis (python -m distill.analyze, written to
    <run>/analysis by distill.compare) side by side, mean ± spread over seeds. Empty when no run
    has one."""
    from distill.analysis.record import analysis_summary

    found = {
        v: [
            analysis_summary(r.path / "analysis" / "analysis.json")
            for r in runs
            if (r.path / "analysis" / "analysis.json").is_file()
        ]
        for v, runs in groups.items()
    }
    found = {v: s for v, s in found.items() if s}
    if not found:
        return []
    depth = max(len(s["attention_distance_px"]) for ss in found.values() for s in ss)
    distance = [
        {
            "variant": v,
            **{f"block {i + 1}": _spread([s["attention_distance_px"][i] for s in ss], digits=1) for i in range(depth)},
            "uniform": f"{ss[0]['uniform_distance_px']:.1f}",
        }
        for v, ss in found.items()
    ]
    tokens = []
    for v, ss in found.items():
        with_token = [s["token_cosine"] for s in ss if s["token_cosine"]]
        if with_token:
            tokens.append({"variant": v, **{k: _spread([t[k] for t in with_token]) for k in with_token[0]}})
    heads = []
    for v, ss in found.items():
        rows = [s["disagreement_with_teacher"] for s in ss if s["disagreement_with_teacher"]]
        if rows:
            heads.append({"variant": v, **{h: _spread([r[h] for r in rows], 100.0, 1) for h in rows[0]}})
    lines = [
        "## Inside the students",
        "",
        "From `python -m distill.analyze` on each run's last checkpoint "
        f"({', '.join(f'{v}: {len(ss)} runs' for v, ss in found.items())}); mean ± spread over seeds.",
        "",
        "Mean attention distance of patch queries per block (pixels; uniform attention over the grid "
        "in the last column): low values are local heads, values near uniform are global.",
        "",
        _markdown_table(distance),
        "",
    ]
    if tokens:
        lines += [
            "Cosine between the class and distillation tokens after each block "
            "(DeiT-B: 0.06 at the input, 0.93 at the output):",
            "",
            _markdown_table(tokens),
            "",
        ]
    if heads:
        lines += [
            "Disagreement with the teacher per head (% of validation images; "
            "DeiT Table 4: class 11.2, distillation 10.0, fused 10.2):",
            "",
            _markdown_table(heads),
            "",
        ]
    return lines


def grid_notes(keys: list[str], pairs: list[tuple[str, str, Paired]]) -> list[str]:
    """How to read a grid's findings: what names a cell, what is paired, and what changes the data."""
    from distill.recipe.keys import TEACHER_OUTPUTS, effects

    if not keys:
        return []
    stream = [k for k in keys if TEACHER_OUTPUTS in effects(k)]
    notes = [
        f"Cells are named by the settings that differ between them ({', '.join(f'`{k}`' for k in keys)}); "
        "pairs are cells that differ in one setting, the variant counting as one. "
        f"With {len(pairs)} comparisons at 95% each, about {len(pairs) / 20:.1f} can fall outside noise "
        "by chance alone."
    ]
    if stream:
        notes.append(
            f"Cells that differ in {', '.join(f'`{k}`' for k in stream)} also differ in the images or the "
            "teacher outputs they trained on (distill/keys.py), not in the loss alone."
        )
    return notes


def reading_notes(keys: list[str], pairs: list[tuple[str, str, Paired]]) -> list[str]:
    """What the findings can and cannot say, for a study of variants (a grid has grid_notes)."""
    if keys or len(pairs) < 3:
        return []
    widths = sorted((p.hi - p.lo) / 2 for _, _, p in pairs if p.n > 1 and math.isfinite(p.hi))
    notes = [
        f"Every pair of variants that shares seeds is compared: with {len(pairs)} comparisons at 95% each, about "
        f"{len(pairs) / 20:.1f} can fall outside noise by chance alone."
    ]
    if widths:
        notes.append(
            f"'No difference beyond noise' is not 'equal': the intervals' half-widths run from {widths[0]:.2f} to "
            f"{widths[-1]:.2f} points (median {statistics.median(widths):.2f}), so differences smaller than that "
            "are ones these seeds cannot separate; more seeds narrow them."
        )
    return notes


def _beyond_noise(p: Paired) -> bool:
    return p.n > 1 and (p.lo > 0 or p.hi < 0)


def build_report(
    run_dirs: list[Path],
    out: Path,
    axes: list[str] | tuple[str, ...] | None = None,
    variant_settings: dict[str, list[str]] | None = None,
) -> Path:
    """report.md, results.csv and plots for ``run_dirs``; ``axes``: a study's --vary keys, the
    order its cells' names list them in (found from the recipes either way); ``variant_settings``:
    type -> the keys its named variants set (name_variants). Either, when not given, from the
    study's study.json (distill.compare writes it), else none."""
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise DistillError("no runs given")
    layout = study_layout(run_dirs) if axes is None or variant_settings is None else {}
    axes = layout.get("axes", []) if axes is None else axes
    variant_settings = layout.get("variant_settings", {}) if variant_settings is None else variant_settings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = name_cells(runs, axes, variant_settings)
    unit = "cell" if keys else "variant"
    groups = _group(runs)
    write_csv(runs, out / "results.csv")
    plot_curves(groups, "val/top1_fused", "val top-1 fused (%)", out / "top1_fused_vs_epoch.png")
    plot_bars(groups, out / "final_top1_per_head.png")
    plot_losses(groups, out / "train_loss_parts.png")
    pairs = comparisons(groups)
    if keys or len(pairs) >= 3:  # a grid or many variants: what stands out first
        pairs.sort(key=lambda pair: not _beyond_noise(pair[2]))
    lines = [
        "# Distillation study",
        "",
        f"{len(runs)} runs: {', '.join(f'{v} ({len(rs)} seeds)' for v, rs in groups.items())}. "
        "Top-1 in %, mean ± standard deviation over seeds; runs with the same seed saw the same images "
        "in the same order with the same augmentation.",
        "",
        "## Findings (final fused top-1, paired over shared seeds)",
        "",
        *[f"{note}\n" for note in grid_notes(keys, pairs) + reading_notes(keys, pairs)],
        *[f"- {verdict(a, b, p)}" for a, b, p in pairs],
        *[f"- {note}" for note in convergence_notes(groups)],
        "",
        f"## Results per {unit}",
        "",
        _markdown_table(variant_rows(groups, unit)),
        "",
        "Variants ending in `-notoken` train a plain ViT with both terms on its single head, so its "
        "cls, dist and fused columns are the same head.",
        "",
        f"`{KL_HEADER}` is `val/kl`: KL(teacher ‖ student) at temperature 1 (whatever the training τ), "
        "with the student's fused output (mean of the class and distillation logits), averaged over "
        "validation images, in nats; lower means the student's distribution is closer to the teacher's.",
        "",
        *analysis_section(groups),
        "## Paired differences (points of final fused top-1)",
        "",
        _markdown_table(
            [
                {
                    "a - b": f"{a} - {b}",
                    "mean": f"{p.mean:+.2f}",
                    "std": f"{p.sd:.2f}",
                    "95% CI": f"{p.lo:.2f} to {p.hi:.2f}" if p.n > 1 else "n/a",
                    "seeds": p.n,
                }
                for a, b, p in pairs
            ]
        ),
        "",
        "## Settings",
        "",
        _markdown_table(_settings(runs)),
        "",
        "## Plots",
        "",
        "![validation top-1 fused against epoch](top1_fused_vs_epoch.png)",
        "",
        "![final top-1 per head](final_top1_per_head.png)",
        "",
        "![training loss parts](train_loss_parts.png)",
        "",
        "The teacher term `train/loss_kd` is not one quantity: for soft it is τ²·KL(teacher ‖ dist head) "
        "at the training τ (divided by the batch, or by batch × classes with kl_norm deit), for hard the "
        "cross-entropy of the dist head against the teacher's argmax; each has its own panel and scale. "
        "Runs of type none have no teacher term.",
        "",
        "## Runs",
        "",
        *[f"- `{r.path}` ({r.cell}, seed {r.seed})" for r in sorted(runs, key=lambda r: (r.cell, r.seed))],
        "",
        "Per-run curves and the hyper-parameter comparison: `tensorboard --logdir <study directory>` (HPARAMS tab).",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
