"""A comparison report from finished runs: report.md, results.csv and PNG plots.

    python -m distill.report RUN_DIR [RUN_DIR ...] --out DIR

Runs are grouped into variants (distillation type, with or without the distillation token, and
the settings of a study's named variants); seeds are the replicates. Results are reported as mean
+- standard deviation over seeds, and variants are compared by paired differences over the seeds
they share (same data order and augmentation), with 95% intervals that account for the seed
spread and the finite validation set (distill.study.stats): airbench's rule, never one lucky run,
and "beats" only where the interval excludes zero.

Runs that differ in other settings that change a result (distill.recipe.keys; a ``distill.compare
--vary`` grid) are grouped into cells named by those settings (``soft tau=3 alpha=0.1``), and
cells that differ in one setting (the variant counts as one) are compared the same way.

Runs of a study are checked against its study.json (distill.study.record): a run whose
result-changing settings differ from what the study planned is refused, never reported.
"""

from __future__ import annotations

from pathlib import Path

from distill.errors import DistillError
from distill.study import sections
from distill.study.naming import group_cells, name_cells
from distill.study.plots import plot_bars, plot_curves, plot_losses
from distill.study.record import StudyRecord, mismatch, study_of
from distill.study.runs import RunRecord, load_run
from distill.study.tables import comparisons, write_csv


def check_runs(runs: list[RunRecord], record: StudyRecord | None) -> list[str]:
    """Refuse runs that differ from what the study planned; returns notes for the report (what
    could not be checked)."""
    if record is None:
        return []
    if record.settings is None:
        return ["The study's study.json records no settings (written by an older distill): runs not checked."]
    for run in runs:
        name = run.path.name
        changed = mismatch(record, name, run.recipe)
        if changed is None:
            raise DistillError(
                f"{run.path} is not one of the runs its study planned ({run.path.parent / 'study.json'}: types "
                f"{', '.join(record.types)}, seeds {', '.join(map(str, record.seeds))}); report it apart, or "
                "run distill.compare again with it in --types/--seeds"
            )
        if changed:
            raise DistillError(
                f"{run.path} was made with other settings than its study planned (study.json): it differs in "
                f"{', '.join(changed)}; train it again (distill.compare with run.overwrite=true) or report it apart"
            )
    return []


def build_report(run_dirs: list[Path], out: Path, record: StudyRecord | None = None) -> Path:
    """report.md, results.csv and plots for ``run_dirs``. ``record``: the study they belong to
    (its --vary axes name cells, its named variants' settings name variants, its settings check
    the runs); by default the study.json of the folder holding them, where there is one."""
    runs = [load_run(p) for p in run_dirs]
    if not runs:
        raise DistillError("no runs given")
    record = study_of(run_dirs) if record is None else record
    notes = check_runs(runs, record)
    layout = record or StudyRecord()
    keys = name_cells(runs, list(layout.axes), layout.variant_settings)
    groups = group_cells(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(runs, out / "results.csv")
    plot_curves(groups, "val/top1_fused", "val top-1 fused (%)", out / "top1_fused_vs_epoch.png")
    plot_bars(groups, out / "final_top1_per_head.png")
    plot_losses(groups, out / "train_loss_parts.png")
    pairs = comparisons(groups)
    if keys or len(pairs) >= 3:  # a grid or many variants: what stands out first
        pairs.sort(key=lambda pair: not pair[2].beyond_noise)
    lines = [
        *sections.header(runs, groups),
        *sections.findings_section(groups, keys, pairs),
        *sections.results_section(groups, "cell" if keys else "variant"),
        *sections.analysis_section(groups),
        *sections.paired_section(pairs),
        *sections.settings_section(runs),
        *sections.plots_section(),
        *sections.runs_section(runs, notes),
    ]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
