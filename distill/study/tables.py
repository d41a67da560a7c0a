"""The study report's tables: results per variant or cell, the per-run CSV, the paired
comparisons, and the settings that matter for reading them."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np

from distill.exports.card import init_text
from distill.study.naming import settings_apart, value_text
from distill.study.plots import HEADS
from distill.study.runs import RunRecord
from distill.study.stats import Paired, mean_std, paired_interval

# val/kl (metrics.student_sample_stats): KL(teacher || fused student) at temperature 1, per image
KL_HEADER = "KL(teacher ‖ fused student), τ=1"


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
        int8 = [r.int8() for r in runs]
        if any(q is not None for q in int8):  # distill.compare --int8: the student after quantization
            row["int8 fused"] = _pm([q["top1_int8"] if q else None for q in int8])
            row["int8 drop (points)"] = _pm([q["drop_points"] if q else None for q in int8], scale=1.0)
        row["wall s"] = _pm([r.summary.get("wall_time_s") for r in runs], scale=1.0, digits=0)
        row["img/s"] = _pm([r.summary.get("throughput_train_img_s") for r in runs], scale=1.0, digits=0)
        rows.append(row)
    return rows


def comparisons(groups: dict[str, list[RunRecord]], key: str = "val/top1_fused") -> list[tuple[str, str, Paired]]:
    """Paired differences (in points) of the final ``key`` for every pair of cells that differ in
    one setting (the variant counts as one): every pair of variants when nothing else varies. In a
    grid, pairs that differ in two settings at once would not say which one made the difference.
    Intervals account for the validation set: exactly where every run of the pair has per-image
    results of the fused head (``key`` val/top1_fused), else bounded from its size."""
    out = []
    for a, b in itertools.combinations(groups, 2):
        if settings_apart(groups[a][0], groups[b][0]) > 1:
            continue
        by_seed_a = {r.seed: r for r in groups[a]}
        by_seed_b = {r.seed: r for r in groups[b]}
        shared = sorted(set(by_seed_a) & set(by_seed_b))
        if not shared:
            continue
        pairs = [(by_seed_a[s], by_seed_b[s]) for s in shared]
        sizes = {r.val_size for pair in pairs for r in pair}
        images = per_image(pairs) if key == "val/top1_fused" else None
        p = paired_interval(
            [ra.final[key] for ra, _ in pairs],
            [rb.final[key] for _, rb in pairs],
            None if None in sizes else min(sizes),  # type: ignore[type-var]
            images,
        )
        out.append((a, b, p))
    return out


def per_image(pairs: list[tuple[RunRecord, RunRecord]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(seeds, images) arrays of right/wrong for the a and b runs of each pair, over one set of
    validation images; None where a run has no per-image results or they cover other images."""
    results = [(ra.correct(), rb.correct()) for ra, rb in pairs]
    flat = [c for pair in results for c in pair]
    if any(c is None for c in flat) or len(pairs) < 2:
        return None
    first = flat[0][0]  # type: ignore[index]
    if any(len(c[0]) != len(first) or not np.array_equal(c[0], first) for c in flat):  # type: ignore[index]
        return None
    return np.stack([a[1] for a, _ in results]), np.stack([b[1] for _, b in results])  # type: ignore[index]


def markdown_table(rows: list[dict[str, Any]]) -> str:
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


def settings_rows(runs: list[RunRecord]) -> list[dict[str, str]]:
    """The settings that matter for reading the report, with every distinct value seen."""

    def values(get: Any) -> str:
        seen = sorted({str(get(r)) for r in runs})
        return ", ".join(seen)

    teacher = values(lambda r: (r.summary.get("teacher") or {}).get("architecture", "none"))
    sha = values(lambda r: ((r.summary.get("teacher") or {}).get("sha256") or "n/a")[:16])
    members = [
        {"setting": "teacher members", "value": values(lambda r: _members_text(r.summary.get("teacher")))}
    ] if any((r.summary.get("teacher") or {}).get("members") for r in runs) else []  # fmt: skip
    return [
        {"setting": "alpha", "value": values(lambda r: r.recipe["distillation"]["alpha"])},
        {"setting": "tau (soft)", "value": values(lambda r: r.recipe["distillation"]["tau"])},
        {"setting": "soft-KL normalisation", "value": values(lambda r: r.recipe["distillation"]["kl_norm"])},
        {"setting": "epochs", "value": values(lambda r: r.final["epoch"])},
        {"setting": "teacher", "value": teacher},
        {"setting": "teacher sha256 (first 16)", "value": sha},
        *members,
        {"setting": "student", "value": values(lambda r: r.recipe["student"]["model"])},
        {"setting": "student initialised from", "value": values(lambda r: init_text(r.summary.get("student_init")))},
        {
            "setting": "data",
            "value": values(lambda r: " ".join(filter(None, (r.recipe["data"]["source"], r.recipe["data"]["path"])))),
        },
        {"setting": "global batch", "value": values(lambda r: r.recipe["train"]["batch_size"])},
        {"setting": "lr", "value": values(lambda r: r.recipe["train"]["lr"])},
        {"setting": "processes", "value": values(lambda r: r.summary.get("world_size"))},
        {"setting": "validation images", "value": values(lambda r: r.val_size or "n/a")},
        {"setting": "data seed", "value": values(lambda r: _data_seed(r))},
        {"setting": "teacher outputs", "value": _cache_note(runs)},
    ]


def _members_text(teacher: dict[str, Any] | None) -> str:
    """An ensemble teacher's members (teacher.ensemble): architecture, share, sha256, top-1."""
    return "; ".join(
        f"{m.get('architecture')} x{m.get('weight', 1.0):.3g} sha256 {str(m.get('sha256'))[:16]} "
        f"top-1 {100 * m['val_top1']:.2f}%"
        for m in (teacher or {}).get("members") or []
    )


def _data_seed(run: RunRecord) -> str:
    seed = run.recipe["data"].get("seed")
    return "run.seed" if seed is None else str(seed)


def _cache_note(runs: list[RunRecord]) -> str:
    """Whether teacher outputs were replayed from the cache (teacher.output_cache), and how."""
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
