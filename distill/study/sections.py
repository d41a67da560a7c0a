"""The study report's sections, each a list of markdown lines: the findings and how to read
them, the results, the paired differences, the students' insides, the settings, the plots and
the runs."""

from __future__ import annotations

import statistics

from distill.study.runs import RunRecord
from distill.study.stats import METHODS, Paired, mean_std, seeds_text, verdict
from distill.study.tables import KL_HEADER, markdown_table, settings_rows, variant_rows

Pairs = list[tuple[str, str, Paired]]


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
        markdown_table(distance),
        "",
    ]
    if tokens:
        lines += [
            "Cosine between the class and distillation tokens after each block "
            "(DeiT-B: 0.06 at the input, 0.93 at the output):",
            "",
            markdown_table(tokens),
            "",
        ]
    if heads:
        lines += [
            "Disagreement with the teacher per head (% of validation images; "
            "DeiT Table 4: class 11.2, distillation 10.0, fused 10.2):",
            "",
            markdown_table(heads),
            "",
        ]
    return lines


def _chance(pairs: Pairs) -> str:
    n = len(pairs)
    if n == 1:
        return "one comparison at 95%: a 1 in 20 chance that it falls outside noise by chance alone"
    return f"{n} comparisons at 95% each, about {n / 20:.1f} can fall outside noise by chance alone"


def grid_notes(keys: list[str], pairs: Pairs) -> list[str]:
    """How to read a grid's findings: what names a cell, what is paired, and what changes the data."""
    from distill.recipe.keys import TEACHER_OUTPUTS, effects

    if not keys:
        return []
    stream = [k for k in keys if TEACHER_OUTPUTS in effects(k)]
    notes = [
        f"Cells are named by the settings that differ between them ({', '.join(f'`{k}`' for k in keys)}); "
        f"pairs are cells that differ in one setting, the variant counting as one. With {_chance(pairs)}."
    ]
    if stream:
        notes.append(
            f"Cells that differ in {', '.join(f'`{k}`' for k in stream)} also differ in the images or the "
            "teacher outputs they trained on (distill.recipe.keys), not in the loss alone."
        )
    return notes


def reading_notes(keys: list[str], pairs: Pairs) -> list[str]:
    """What the findings can and cannot say, for a study of variants (a grid has grid_notes)."""
    if keys or len(pairs) < 3:
        return []
    widths = sorted((p.hi - p.lo) / 2 for _, _, p in pairs if p.has_interval)
    notes = [f"Every pair of variants that shares seeds is compared: with {_chance(pairs)}."]
    if widths:
        notes.append(
            f"'No difference beyond noise' is not 'equal': the intervals' half-widths run from {widths[0]:.2f} to "
            f"{widths[-1]:.2f} points (median {statistics.median(widths):.2f}), so differences smaller than that "
            "are ones this study cannot separate; more seeds, a larger validation set, or per-image results "
            "narrow them."
        )
    return notes


def method_notes(pairs: Pairs) -> list[str]:
    """What the intervals account for, per method used (stats.METHODS)."""
    with_interval = [(a, b, p) for a, b, p in pairs if p.has_interval]
    notes = []
    for method, text in METHODS.items():
        which = [f"{a} - {b}" for a, b, p in with_interval if p.method == method]
        if len(which) == len(with_interval) and which:
            notes.append(f"Every interval accounts for the {text}.")
        elif which:
            notes.append(f"The intervals of {', '.join(which)} account for the {text}.")
    if any(p.method == "bound" for _, _, p in with_interval):
        notes.append(
            "The bound takes the runs to disagree on as many validation images as their accuracies allow, so "
            "those intervals are wider than per-image results (predictions.npz) would make them."
        )
    return notes


def findings_section(groups: dict[str, list[RunRecord]], keys: list[str], pairs: Pairs) -> list[str]:
    notes = grid_notes(keys, pairs) + reading_notes(keys, pairs) + method_notes(pairs)
    return [
        "## Findings (final fused top-1, paired over shared seeds)",
        "",
        *[f"{note}\n" for note in notes],
        *[f"- {verdict(a, b, p)}" for a, b, p in pairs],
        *[f"- {note}" for note in convergence_notes(groups)],
        "",
    ]


def results_section(groups: dict[str, list[RunRecord]], unit: str) -> list[str]:
    lines = [f"## Results per {unit}", "", markdown_table(variant_rows(groups, unit)), ""]
    if any(rs[0].method.endswith("-notoken") for rs in groups.values()):
        lines += [
            "Variants ending in `-notoken` train a plain ViT with both terms on its single head, so their "
            "cls, dist and fused columns are the same head.",
            "",
        ]
    return [
        *lines,
        f"`{KL_HEADER}` is `val/kl`: KL(teacher ‖ student) at temperature 1 (whatever the training τ), "
        "with the student's fused output (mean of the class and distillation logits), averaged over "
        "validation images, in nats; lower means the student's distribution is closer to the teacher's.",
        "",
    ]


METHOD_COLUMN = {"seeds": "seeds only", "images": "per-image (exact)", "bound": "bound (no per-image results)"}


def paired_section(pairs: Pairs) -> list[str]:
    rows = [
        {
            "a - b": f"{a} - {b}",
            "mean": f"{p.mean:+.2f}",
            "std over seeds": f"{p.sd:.2f}" if p.n > 1 else "n/a (1 seed)",
            "95% CI": f"{p.lo:.2f} to {p.hi:.2f}" if p.has_interval else "n/a",
            "seeds": p.n,
            "validation noise": METHOD_COLUMN[p.method] if p.has_interval else "-",
        }
        for a, b, p in pairs
    ]
    return ["## Paired differences (points of final fused top-1)", "", markdown_table(rows), ""]


def settings_section(runs: list[RunRecord]) -> list[str]:
    return ["## Settings", "", markdown_table(settings_rows(runs)), ""]


def plots_section() -> list[str]:
    return [
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
    ]


def runs_section(runs: list[RunRecord], notes: list[str]) -> list[str]:
    return [
        "## Runs",
        "",
        *[f"- `{r.path}` ({r.cell}, seed {r.seed})" for r in sorted(runs, key=lambda r: (r.cell, r.seed))],
        "",
        *[f"{note}\n" for note in notes],
        "Per-run curves and the hyper-parameter comparison: `tensorboard --logdir <study directory>` (HPARAMS tab).",
        "",
    ]


def header(runs: list[RunRecord], groups: dict[str, list[RunRecord]]) -> list[str]:
    return [
        "# Distillation study",
        "",
        f"{len(runs)} runs: {', '.join(f'{v} ({seeds_text(len(rs))})' for v, rs in groups.items())}. "
        "Top-1 in %, mean ± standard deviation over seeds; runs with the same seed saw the same images "
        "in the same order with the same augmentation.",
        "",
    ]
