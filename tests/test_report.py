"""The study report: paired statistics against hand-computed values, and a report built from
small fake runs with known numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from distill.study.record import StudyRecord
from distill.study.report import build_report
from distill.study.runs import load_run
from distill.study.stats import mean_std, paired_difference, verdict

T_975_DF2 = 4.302652729911275  # Student t, two-sided 95%, 2 degrees of freedom (tables: 4.303)
Z_975 = 1.959963984540054  # standard normal, two-sided 95%
VAL_SIZE = 10_000  # validation images of every fake run (summary.json data.val_size)


def bound_half(a: list[float], b: list[float], n: int = VAL_SIZE) -> float:
    """The report's half-width without per-image results, by hand (points): the seeds' t(2)
    half-width and the validation set's worst case, z * sqrt((mean(min(a+b, 2-a-b)) - d^2) / N),
    added in quadrature."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    seeds = T_975_DF2 * 100 * sd / math.sqrt(len(d))
    q = sum(min(x + y, 2 - x - y) for x, y in zip(a, b, strict=True)) / len(d)
    images = Z_975 * 100 * math.sqrt((q - mean**2) / n)
    return math.hypot(seeds, images)


def test_paired_difference_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, half-width t * 1 / sqrt(3)
    p = paired_difference([81.0, 82.0, 83.0], [80.0, 80.0, 80.0])
    half = T_975_DF2 / math.sqrt(3)
    assert (p.mean, p.sd, p.n) == (pytest.approx(2.0), pytest.approx(1.0), 3)
    assert p.lo == pytest.approx(2.0 - half) and p.hi == pytest.approx(2.0 + half)
    assert half == pytest.approx(2.4841, abs=1e-4)


def test_verdict_sentences() -> None:
    # differences 1.8, 2.0, 2.2: mean 2, sd 0.2, CI 2 +- 0.4968
    clear = paired_difference([81.8, 82.0, 82.2], [80.0, 80.0, 80.0])
    assert clear.lo == pytest.approx(2.0 - T_975_DF2 * 0.2 / math.sqrt(3))
    assert verdict("hard", "soft", clear) == "hard beats soft by 2.00 points (95% CI 1.50 to 2.50, 3 seeds)"
    reverse = paired_difference([80.0, 80.0, 80.0], [81.8, 82.0, 82.2])
    assert verdict("soft", "hard", reverse) == "hard beats soft by 2.00 points (95% CI 1.50 to 2.50, 3 seeds)"
    noisy = paired_difference([81.0, 82.0, 83.0], [80.0, 80.0, 84.0])  # differences 1, 2, -1
    assert verdict("hard", "none", noisy).startswith("hard vs none: no difference beyond noise (+0.67 points")
    single = paired_difference([81.0], [80.0])
    assert math.isnan(single.lo) and "too few seeds" in verdict("hard", "soft", single)


def test_mean_std_is_the_sample_standard_deviation() -> None:
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (pytest.approx(2.5), pytest.approx(math.sqrt(5 / 3)))
    assert mean_std([7.0]) == (7.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


FUSED = {  # final val/top1_fused per (variant, seed): hard beats none by exactly 3, 4, 5 points
    ("hard", 0): 0.83, ("hard", 1): 0.84, ("hard", 2): 0.85,
    ("soft", 0): 0.81, ("soft", 1): 0.81, ("soft", 2): 0.82,
    ("none", 0): 0.80, ("none", 1): 0.80, ("none", 2): 0.80,
}  # fmt: skip


def fake_run(root: Path, variant: str, seed: int) -> Path:
    run = root / f"{variant}-seed{seed}"
    run.mkdir(parents=True)
    recipe = {
        "run": {"seed": seed, "name": run.name},
        "data": {"source": "digits", "path": None},
        "student": {"model": "deit_tiny_distilled_patch16_224"},
        "train": {"batch_size": 64, "lr": 0.001},
        "distillation": {"type": variant, "alpha": 0.5, "tau": 1.0, "kl_norm": "batchmean", "token": True},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    final = FUSED[(variant, seed)]
    rows = []
    for epoch in (1, 2):
        top1 = final - 0.1 if epoch == 1 else final
        rows.append({
            "epoch": epoch, "step": 10 * epoch, "train/loss": 1.0 / epoch, "train/loss_ce": 0.8 / epoch,
            "train/loss_kd": 0.0 if variant == "none" else 0.5 / epoch, "lr": 0.001,
            "val/top1_cls": top1 - 0.01, "val/top1_dist": top1 - 0.02, "val/top1_fused": top1, "val/top5_fused": 1.0,
            "val/teacher_top1": 0.9, "val/agreement": top1, "val/kl": 0.1 * seed, "throughput/train_img_s": 100.0,
        })  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "wall_time_s": 60.0 + seed, "throughput_train_img_s": 400.0, "world_size": 1,
        "teacher": {"architecture": "resnet10t", "sha256": "ab" * 32}, "data": {"val_size": VAL_SIZE},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_report_from_fake_runs(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "study", v, s) for (v, s) in FUSED]
    md = build_report(runs, tmp_path / "report")
    text = md.read_text()
    # hard - none: differences 3, 4, 5 points -> mean 4, sd 1; no per-image results: the bound
    hard, soft, none = ([FUSED[(v, s)] for s in (0, 1, 2)] for v in ("hard", "soft", "none"))
    half = bound_half(hard, none)
    assert half == pytest.approx(2.7473, abs=1e-4)  # t(2) part 2.4841, validation part 1.1734
    assert f"hard beats none by 4.00 points (95% CI {4 - half:.2f} to {4 + half:.2f}, 3 seeds)" in text
    # hard - soft: differences 2, 3, 3 -> mean 2.667, sd 0.577
    half = bound_half(hard, soft)
    assert f"hard beats soft by 2.67 points (95% CI {8 / 3 - half:.2f} to {8 / 3 + half:.2f}, 3 seeds)" in text
    assert "| hard - none | +4.00 | 1.00 | 1.25 to 6.75 | 3 | bound (no per-image results) |" in text
    assert (
        "Every interval accounts for the seed-to-seed spread and the validation set's sampling noise, bounded" in text
    )
    # per-variant table: hard fused 84.00 +- 1.00, best equals final here, cls one point lower
    assert "| hard | 0,1,2 | 83.00 ± 1.00 | 82.00 ± 1.00 | 84.00 ± 1.00 | 84.00 ± 1.00 | 90.00 ± 0.00 |" in text
    assert "| soft-KL normalisation | batchmean |" in text and "| teacher | resnet10t |" in text

    with open(tmp_path / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    hard1 = next(r for r in rows if r["variant"] == "hard" and r["seed"] == "1")
    assert float(hard1["val/top1_fused"]) == pytest.approx(0.84) and float(hard1["wall_time_s"]) == 61.0
    for png in ("top1_fused_vs_epoch.png", "final_top1_per_head.png", "train_loss_parts.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_command_on_a_study_directory(tmp_path: Path) -> None:
    from distill.report import main

    for v, s in FUSED:
        fake_run(tmp_path / "study", v, s)
    assert main([str(tmp_path / "study"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").is_file()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out2")]) == 2


def test_load_run_names_the_missing_file(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "hard", 0)
    (run / "summary.json").unlink()
    from distill.errors import DistillError

    with pytest.raises(DistillError, match=r"summary\.json is missing"):
        load_run(run)


def test_report_names_the_kl_direction_and_the_kd_terms(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "study", v, s) for (v, s) in FUSED]
    text = build_report(runs, tmp_path / "report").read_text()
    # val/kl is metrics.kl_teacher_student(teacher, fused) at temperature 1
    assert "| KL(teacher ‖ fused student), τ=1 |" in text
    assert "| KL |" not in text
    assert "τ²·KL(teacher ‖ dist head)" in text and "teacher's argmax" in text


def _lines_by_axes(fig: object) -> list[tuple[str, set[str]]]:
    return [(ax.get_title() + " " + ax.get_ylabel(), {line.get_label() for line in ax.get_lines()}) for ax in fig.axes]


def test_loss_kd_of_soft_and_hard_never_share_an_axis(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from distill.study.naming import group_cells as _group
    from distill.study.plots import loss_figure

    runs = [load_run(fake_run(tmp_path / "study", v, s)) for (v, s) in FUSED]
    fig = loss_figure(_group(runs))
    try:
        panels = _lines_by_axes(fig)
        soft = [(label, lines) for label, lines in panels if lines == {"soft"}]
        hard = [(label, lines) for label, lines in panels if lines == {"hard"}]
        assert len(soft) == 1 and len(hard) == 1, panels
        assert "τ²·KL(teacher ‖ dist head)" in soft[0][0] and "kl_norm=batchmean" in soft[0][0]
        assert "CE(dist head, teacher argmax)" in hard[0][0]
        soft_ax = next(ax for ax in fig.axes if ax.get_title() + " " + ax.get_ylabel() == soft[0][0])
        hard_ax = next(ax for ax in fig.axes if ax.get_title() + " " + ax.get_ylabel() == hard[0][0])
        assert not soft_ax.get_shared_y_axes().joined(soft_ax, hard_ax)
        # the mixed panels (total, label CE) carry every variant; no KD panel plots none's zero line
        kd_panels = [lines for label, lines in panels if "KD:" in label]
        assert len(kd_panels) == 2 and all("none" not in lines for lines in kd_panels)
        assert "none have no KD term" in fig.get_suptitle()
    finally:
        plt.close(fig)


def test_loss_kd_panels_split_soft_runs_by_kl_norm(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from distill.study.naming import group_cells as _group
    from distill.study.plots import loss_figure

    runs = [load_run(fake_run(tmp_path / "study", "soft", s)) for s in (0, 1)]
    runs[1].recipe["distillation"]["kl_norm"] = "deit"  # C times smaller: not on the batchmean scale
    fig = loss_figure(_group(runs))
    try:
        kd = [label for label, _ in _lines_by_axes(fig) if "soft KD" in label]
        assert len(kd) == 2 and any("kl_norm=deit" in k for k in kd) and any("kl_norm=batchmean" in k for k in kd)
        assert "none" not in fig.get_suptitle()
    finally:
        plt.close(fig)


def card_info_for(final: dict) -> dict:
    return {
        "name": "student", "architecture": "deit_tiny_distilled_patch16_224", "final": final,
        "teacher": {"architecture": "resnet10t", "sha256": "ab" * 32, "val_top1": 0.9},
        "distillation": {"type": "soft", "alpha": 0.5, "tau": 1.0, "kl_norm": "batchmean"},
        "data": {"source": "digits", "path": None, "train_size": 100, "val_size": 20, "val_origin": "split"},
        "num_classes": 10, "epochs": 2, "recipe": {"run": {"seed": 0}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kl", "shown"), [(0.5952284187078476, "0.5952"), (1.23456789e-05, "1.235e-05"), (None, "n/a"), ("x", "n/a")]
)
def test_model_card_kl_row_names_the_direction_with_four_digits(kl: object, shown: str) -> None:
    from distill.exports.card import model_card

    final = {"val/top1_fused": 0.8} if kl is None else {"val/top1_fused": 0.8, "val/kl": kl}
    card = model_card(card_info_for(final))
    assert f"| KL(teacher ‖ fused student), τ=1 | {shown} |" in card


def test_unconverged_variants_are_named_and_converged_ones_are_not(tmp_path: Path) -> None:
    from distill.study.sections import convergence_notes

    rising = [load_run(fake_run(tmp_path, "hard", s)) for s in (0, 1, 2)]  # +10 points in the last epoch
    notes = convergence_notes({"hard": rising})
    assert len(notes) == 1 and notes[0].startswith("**hard had not converged**: its fused top-1 still rose +10.0")
    flat = load_run(fake_run(tmp_path / "flat", "soft", 0))
    rows = [json.loads(line) for line in (flat.path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["val/top1_fused"] = 0.9
    (flat.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert convergence_notes({"soft": [load_run(flat.path)]}) == []


def test_the_bar_chart_says_where_its_cut_axis_starts(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from distill.study.plots import plot_bars

    runs = [load_run(fake_run(tmp_path, "hard", s)) for s in (0, 1, 2)]
    captured = {}
    real_close = plt.close
    plt.close = lambda fig: captured.setdefault("fig", fig)  # type: ignore[assignment]
    try:
        plot_bars({"hard": runs}, tmp_path / "bars.png")
    finally:
        plt.close = real_close
    ax = captured["fig"].axes[0]
    bottom = ax.get_ylim()[0]
    assert bottom > 0 and ax.get_ylabel() == f"final val top-1 (%), axis from {bottom:.0f}%"


# Grids (distill.compare --vary) ---------------------------------------------------------------

GRID = {  # final val/top1_fused per (type, tau) and seed
    ("soft", 1.0): (0.80, 0.81, 0.82),
    ("soft", 3.0): (0.83, 0.84, 0.85),  # soft tau=3 - soft tau=1: exactly 3 points on every seed
    ("hard", 1.0): (0.82, 0.80, 0.84),  # tau does not act on hard: the two hard cells are equal
    ("hard", 3.0): (0.82, 0.80, 0.84),
}


def grid_run(root: Path, kind: str, tau: float, seed: int) -> Path:
    """A fake run of the cell (kind, tau) as distill.compare --vary distillation.tau=1,3 names it."""
    run = fake_run(root / f"tmp-{kind}-{tau}", "none", seed)  # FUSED has a row for every seed
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["distillation"].update(type=kind, tau=tau)
    recipe["run"]["keep_checkpoints"] = seed + 1  # a setting that changes no result: not a cell's
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["val/top1_fused"] = GRID[(kind, tau)][seed]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run.rename(root / f"{kind}-tau{tau:g}-seed{seed}")


def test_value_text_and_setting_names() -> None:
    from distill.study.naming import setting_names, value_text

    assert [value_text(v) for v in (3.0, 0.0003, 1e-05, 2, None, True, "bf16", [0.5, 1.0])] == [
        "3", "0.0003", "1e-05", "2", "null", "true", "bf16", "[0.5, 1]",
    ]  # fmt: skip
    assert value_text({"depth": 2.0}) == "{depth: 2}"
    assert setting_names(["distillation.tau", "train.lr", "teacher.train.lr"]) == {
        "distillation.tau": "tau", "train.lr": "train.lr", "teacher.train.lr": "teacher.train.lr",
    }  # fmt: skip


def test_cells_are_found_from_the_recipes_and_named_by_their_settings(tmp_path: Path) -> None:
    from distill.study.naming import group_cells as _group
    from distill.study.naming import name_cells

    runs = [load_run(grid_run(tmp_path, k, t, s)) for (k, t) in GRID for s in (0, 1, 2)]
    assert name_cells(runs) == ["distillation.tau"]  # run.seed, run.name, keep_checkpoints, type: not settings
    groups = _group(runs)
    assert list(groups) == ["hard tau=1", "hard tau=3", "soft tau=1", "soft tau=3"]
    assert [r.seed for r in groups["soft tau=3"]] == [0, 1, 2]
    # one variant and nothing else varied: the cell is the variant
    plain = [load_run(fake_run(tmp_path / "plain", v, s)) for v, s in FUSED]
    assert name_cells(plain) == [] and list(_group(plain)) == ["hard", "soft", "none"]


def test_a_grid_report_pairs_cells_that_differ_in_one_setting(tmp_path: Path) -> None:
    dirs = [grid_run(tmp_path / "study", k, t, s) for (k, t) in GRID for s in (0, 1, 2)]
    text = build_report(dirs, tmp_path / "report", StudyRecord(axes=("distillation.tau",))).read_text()
    # soft tau=3 - soft tau=1 = 3 points on every seed: sd 0, yet the interval is not the point, for
    # the validation set's sampling noise is shared by every seed
    half = bound_half(list(GRID[("soft", 3.0)]), list(GRID[("soft", 1.0)]))
    assert half == pytest.approx(Z_975 * 100 * math.sqrt((0.35 - 0.03**2) / VAL_SIZE))  # q: 0.37, 0.35, 0.33
    assert f"- soft tau=3 beats soft tau=1 by 3.00 points (95% CI {3 - half:.2f} to {3 + half:.2f}, 3 seeds)" in text
    assert half == pytest.approx(1.1580, abs=1e-4)
    # hard tau=1 vs hard tau=3: identical numbers
    assert "- hard tau=1 vs hard tau=3: no difference beyond noise (+0.00 points" in text
    # soft tau=1 - hard tau=1: differences -2, 1, -2 -> mean -1, sd sqrt(3)
    half = bound_half(list(GRID[("hard", 1.0)]), list(GRID[("soft", 1.0)]))
    assert (
        f"- hard tau=1 vs soft tau=1: no difference beyond noise (+1.00 points, 95% CI {1 - half:.2f} to {1 + half:.2f}"
        in text
    )
    # hard tau=1 and soft tau=3 differ in two settings: not compared
    assert "hard tau=1 - soft tau=3" not in text and "soft tau=3 vs hard tau=1" not in text
    findings = text.split("## Findings")[1].split("## Results")[0]
    assert findings.index("beats") < findings.index("no difference")  # what stands out first
    assert "pairs are cells that differ in one setting" in findings and "With 4 comparisons" in findings
    assert "## Results per cell" in text and "| cell | seeds |" in text
    soft3 = next(line for line in text.splitlines() if line.startswith("| soft tau=3 | 0,1,2 |"))
    assert soft3.split(" | ")[4] == "84.00 ± 1.00"  # final fused, mean ± sd over seeds
    assert "(soft tau=3, seed 2)" in text
    with open(tmp_path / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["variant", "cell", "distillation.tau", "seed", "run"]
    row = next(r for r in rows if r["cell"] == "soft tau=3" and r["seed"] == "1")
    assert (row["variant"], row["distillation.tau"], float(row["val/top1_fused"])) == ("soft", "3", 0.84)


def test_a_grid_varying_the_data_says_cells_saw_different_images(tmp_path: Path) -> None:
    dirs = []
    for scale in (0.5, 0.08):
        for seed in (0, 1):
            run = fake_run(tmp_path / f"s{scale}", "soft", seed)
            recipe = yaml.safe_load((run / "recipe.yaml").read_text())
            recipe["data"]["augment"] = {"scale": [scale, 1.0]}
            (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
            dirs.append(run)
    text = build_report(dirs, tmp_path / "report").read_text()
    assert "soft scale=[0.08, 1] vs soft scale=[0.5, 1]" in text
    assert "differ in `data.augment.scale` also differ in the images or the teacher outputs" in text


def test_int8_columns_appear_when_the_study_quantized_its_runs(tmp_path: Path) -> None:
    from distill.study.runs import INT8_FILE
    from distill.study.tables import variant_rows

    runs = [load_run(fake_run(tmp_path, "hard", s)) for s in (0, 1, 2)]
    assert "int8 fused" not in variant_rows({"hard": runs})[0]
    for r, (q, drop) in zip(runs, [(0.80, 1.0), (0.82, 0.5), (0.84, 0.0)], strict=True):
        (r.path / INT8_FILE).write_text(json.dumps({"top1_fp32": q, "top1_int8": q, "drop_points": drop}))
    row = variant_rows({"hard": runs})[0]
    assert row["int8 fused"] == "82.00 ± 2.00" and row["int8 drop (points)"] == "0.50 ± 0.50"


def paper_soft_runs(root: Path, tops: tuple[float, ...] = (0.86, 0.86, 0.88)) -> list[Path]:
    """soft:tau=3:alpha=0.1 runs for seeds 0, 1, 2 with final fused top-1 ``tops``."""
    dirs = []
    for seed, top1 in enumerate(tops):
        run = fake_run(root / "paper", "soft", seed)
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe["distillation"].update(tau=3.0, alpha=0.1)
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows[-1]["val/top1_fused"] = top1
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(run)
    return dirs


PAPER = {"soft": ["distillation.tau", "distillation.alpha"]}  # what compare records for soft:tau=3:alpha=0.1


def test_a_named_variant_is_a_variant_of_its_own_compared_with_every_other(tmp_path: Path) -> None:
    """--types none,soft,soft:tau=3:alpha=0.1,hard: the paper's soft setting beside the code's,
    every pair of variants compared (they differ in the variant only), hard and none keep their names."""
    from distill.study.naming import group_cells as _group
    from distill.study.naming import name_cells
    from distill.study.tables import comparisons

    dirs = [fake_run(tmp_path / "study", v, s) for (v, s) in FUSED] + paper_soft_runs(tmp_path)
    text = build_report(dirs, tmp_path / "report", StudyRecord(variant_settings=PAPER)).read_text()
    assert "## Results per variant" in text  # no grid: tau and alpha belong to the soft variants
    for name in ("hard", "none", "soft tau=1 alpha=0.5", "soft tau=3 alpha=0.1"):
        assert f"| {name} | 0,1,2 |" in text, name
    # soft tau=3 alpha=0.1 - hard: 3, 2, 3 points; against none 6, 6, 8: every pair is compared
    assert "- soft tau=3 alpha=0.1 beats hard by 2.67 points" in text
    assert "- soft tau=3 alpha=0.1 beats none by 6.67 points" in text
    assert "- soft tau=3 alpha=0.1 beats soft tau=1 alpha=0.5 by 5.33 points" in text
    runs = [load_run(d) for d in dirs]
    assert name_cells(runs, [], PAPER) == [] and len(comparisons(_group(runs))) == 6


def test_a_lone_named_variant_keeps_its_settings_in_its_name_and_is_compared(tmp_path: Path) -> None:
    """--types none,soft:tau=3:alpha=0.1,hard: no plain soft, so tau and alpha differ between types
    only; they still name the soft variant, never make cells, and every pair is compared."""
    dirs = [fake_run(tmp_path / "study", v, s) for (v, s) in FUSED if v != "soft"] + paper_soft_runs(tmp_path)
    text = build_report(dirs, tmp_path / "report", StudyRecord(variant_settings=PAPER)).read_text()
    assert "## Results per variant" in text and "| soft tau=3 alpha=0.1 | 0,1,2 |" in text
    assert "| none | 0,1,2 |" in text and "| hard | 0,1,2 |" in text
    assert "- soft tau=3 alpha=0.1 beats hard by 2.67 points" in text and "- hard beats none by 4.00 points" in text


def test_the_report_command_reads_the_study_record_compare_wrote(tmp_path: Path) -> None:
    from distill.report import main
    from distill.study.record import STUDY_FILE

    study = tmp_path / "study"
    for v, s in FUSED:
        fake_run(study, v, s)
    for i, run in enumerate(paper_soft_runs(tmp_path)):  # move them into the study folder
        run.rename(study / f"soft-tau3-alpha0.1-seed{i}")
    (study / STUDY_FILE).write_text(json.dumps({"axes": [], "variant_settings": PAPER}))
    assert main([str(study), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| soft tau=3 alpha=0.1 | 0,1,2 |" in text and "| soft tau=1 alpha=0.5 | 0,1,2 |" in text
    (study / STUDY_FILE).unlink()  # without it: tau and alpha are taken for grid settings
    assert main([str(study), "--out", str(tmp_path / "plain")]) == 0
    assert "## Results per cell" in (tmp_path / "plain" / "report.md").read_text()


PAIRS = [("hard", "soft"), ("hard", "none"), ("soft", "none")]


def test_a_study_of_many_variants_says_what_it_cannot_conclude(tmp_path: Path) -> None:
    text = build_report([fake_run(tmp_path / "s", v, s) for (v, s) in FUSED], tmp_path / "report").read_text()
    findings = text.split("## Findings")[1].split("## Results")[0]
    assert "with 3 comparisons at 95% each, about 0.1 can fall outside noise by chance alone" in findings
    # soft - none: 1, 1, 2 -> sd 0.577, t(2) part 1.43, widened to 1.88; hard - soft 1.84; hard - none 2.75
    widths = sorted(bound_half(*([FUSED[(v, s)] for s in (0, 1, 2)] for v in pair)) for pair in PAIRS)
    assert f"half-widths run from {widths[0]:.2f} to {widths[-1]:.2f} points (median {widths[1]:.2f})" in findings
    assert "half-widths run from 1.84 to 2.75 points (median 1.88)" in findings
    assert findings.index("beats") < findings.index("no difference")


def test_inside_the_students_mixes_variants_with_and_without_the_token(tmp_path: Path, monkeypatch) -> None:
    """The CIFAR-10 study's report failed here (KeyError 'dist'): hard-notoken has no dist head."""
    import distill.analysis.record
    from distill.study.naming import group_cells as _group
    from distill.study.sections import analysis_section

    runs = [load_run(fake_run(tmp_path / "s", "hard", 0)), load_run(fake_run(tmp_path / "s", "none", 0))]
    for r in runs:
        (r.path / "analysis").mkdir()
        (r.path / "analysis" / "analysis.json").write_text("{}")
    runs[1].method = runs[1].variant = runs[1].cell = "hard-notoken"
    heads = {"hard": {"cls": 0.2, "dist": 0.1, "fused": 0.15}, "hard-notoken": {"cls": 0.3}}

    def summary(path: Path) -> dict:
        v = "hard" if "hard-seed" in str(path) else "hard-notoken"
        return {
            "attention_distance_px": [4.0, 6.0], "uniform_distance_px": 8.0,
            "token_cosine": {"block 1": 0.9} if v == "hard" else None, "disagreement_with_teacher": heads[v],
        }  # fmt: skip

    monkeypatch.setattr(distill.analysis.record, "analysis_summary", summary)
    text = "\n".join(analysis_section(_group(runs)))
    assert "| variant | cls | dist | fused |" in text
    assert "| hard | 20.0 | 10.0 | 15.0 |" in text and "| hard-notoken | 30.0 | - | - |" in text  # one seed: no spread


# Intervals: seed spread and the finite validation set ------------------------------------------


def test_equal_differences_on_every_seed_give_a_zero_width_t_interval() -> None:
    p = paired_difference([48.31, 47.9, 48.6], [47.31, 46.9, 47.6])
    assert p.lo == pytest.approx(1.0) and p.hi == pytest.approx(1.0) and p.method == "seeds"
    assert verdict("soft", "hard", p) == "soft beats hard by 1.00 points (95% CI 1.00 to 1.00, 3 seeds)"


def test_the_reported_interval_is_never_zero_width_for_a_non_zero_difference() -> None:
    from distill.study.stats import paired_interval

    # the same accuracies as above, on 10,000 validation images: the validation set is one sample
    # that every seed shares, so no agreement between seeds narrows its part of the noise
    p = paired_interval([0.4831, 0.479, 0.486], [0.4731, 0.469, 0.476], VAL_SIZE)
    half = bound_half([0.4831, 0.479, 0.486], [0.4731, 0.469, 0.476])
    assert p.method == "bound" and (p.lo, p.hi) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert half == pytest.approx(Z_975 * 100 * math.sqrt(((0.9562 + 0.948 + 0.962) / 3 - 0.01**2) / VAL_SIZE), rel=1e-4)
    assert (
        verdict("soft", "hard", p)
        == "soft vs hard: no difference beyond noise (+1.00 points, 95% CI -0.92 to 2.92, 3 seeds)"
    )
    # even runs right (a) and wrong (b) on every image keep one image's worth: z / N
    p = paired_interval([1.0, 1.0], [0.0, 0.0], 100)
    assert p.hi - p.lo == pytest.approx(2 * Z_975 * 100 / 100)
    # per-image results with no disagreement at all between seeds: the images still vary
    a = np.array([[1, 1, 0, 1], [1, 1, 0, 1]])
    b = np.array([[1, 0, 0, 0], [1, 0, 0, 0]])
    p = paired_interval([0.75, 0.75], [0.25, 0.25], 4, (a, b))
    # D = 0, 1, 0, 1 on both seeds: MS_image = 2 * 1/3, MS_rest = 0 -> variance (2/3) / (2 * 4) = 1/12
    assert p.method == "images" and p.mean == pytest.approx(50.0)
    assert p.hi - p.lo == pytest.approx(2 * Z_975 * 100 * math.sqrt(1 / 12))


def test_one_seed_says_so_instead_of_a_verdict() -> None:
    from distill.study.stats import paired_interval

    p = paired_interval([0.5], [0.4], VAL_SIZE)
    assert not p.has_interval and not p.beyond_noise
    assert verdict("soft", "hard", p) == (
        "soft - hard: +10.00 points from 1 seed; too few seeds for a confidence interval (at least 2)"
    )
    unknown = paired_interval([0.5, 0.6], [0.4, 0.5], None)  # runs that do not record their val size
    assert verdict("soft", "hard", unknown) == (
        "soft - hard: +10.00 points (2 seeds); no interval: the runs do not record their validation set's size "
        "(summary.json)"
    )


def test_exact_paired_variance_by_hand() -> None:
    from distill.study.stats import images_interval

    # D = a - b on 2 seeds x 3 images: [[1, 0, 0], [0, 0, -1]]; per-seed means 1/3, -1/3
    a = np.array([[1, 1, 0], [1, 0, 0]])
    b = np.array([[0, 1, 0], [1, 0, 1]])
    mean, half = images_interval(a, b)
    # seeds: sd of (1/3, -1/3) = sqrt(2)/3, t(1) half-width 12.706 * (sqrt(2)/3) / sqrt(2) = 4.235
    # images: per-image means 1/2, 0, -1/2 -> MS_image = 2 * (1/2) / 2 = 1/2; residuals
    # [[1/2, 0, 1/2] - ...]: MS_rest = 1/2 * (4 * 1/4)... computed: sum of squares 1, / (1 * 2) = 1/2
    # -> image variance max(1/2 - 1/2, 0) / 6 = 0, floored at (1/3)^2
    t1 = 12.706204736174707
    assert float(mean) == pytest.approx(0.0)
    assert float(half) == pytest.approx(math.hypot(t1 * (math.sqrt(2) / 3) / math.sqrt(2), Z_975 / 3))


def _probit_studies(rng: np.random.Generator, draws: int, seeds: int, images: int) -> tuple[np.ndarray, ...]:
    """Synthetic paired studies with a known true difference: image difficulty z, an image effect
    that only run a has (zeta), seed effects e and per-(seed, image) noise shared in part by the
    two runs. a is right where 0.15 + e_a - 2 z + 0.5 zeta - h_a > 0, b where e_b - 2 z - h_b > 0,
    so P(a right) = Phi(0.15 / sqrt(1 + 4 + 0.25 + tau^2)) and P(b right) = 1/2 exactly. The
    validation set (z, zeta) is drawn afresh per study and shared by its seeds."""
    shape = (draws, seeds, images)
    z = rng.standard_normal((draws, 1, images))
    zeta = rng.standard_normal((draws, 1, images))
    e_a, e_b = (0.05 * rng.standard_normal((draws, seeds, 1)) for _ in range(2))
    common = rng.standard_normal(shape)
    h_a = math.sqrt(0.5) * (common + rng.standard_normal(shape))
    h_b = math.sqrt(0.5) * (common + rng.standard_normal(shape))
    right_a = 0.15 + e_a - 2 * z + 0.5 * zeta - h_a > 0
    right_b = e_b - 2 * z - h_b > 0
    return right_a, right_b


def test_intervals_cover_the_true_difference_in_95_percent_of_studies() -> None:
    """2,000 synthetic studies of 2-5 seeds on 400 shared validation images each (accuracies k/400):
    the per-image interval covers the truth in 93-97% of them, the bound (accuracies only) at least
    95%, and the seed-only t-interval, which misses the shared validation set, less often."""
    from scipy.stats import norm

    from distill.study.stats import bound_interval, images_interval, seed_half_width

    truth = norm.cdf(0.15 / math.sqrt(1 + 4 + 0.25 + 0.05**2)) - 0.5
    rng = np.random.default_rng(0)
    covered = {"images": 0, "bound": 0, "seeds": 0}
    for seeds in (2, 3, 4, 5):
        a, b = _probit_studies(rng, 500, seeds, 400)
        mean, half = images_interval(a, b)
        covered["images"] += int((abs(mean - truth) <= half).sum())
        mean, half = bound_interval(a.mean(-1), b.mean(-1), 400)
        covered["bound"] += int((abs(mean - truth) <= half).sum())
        d = a.mean(-1) - b.mean(-1)
        covered["seeds"] += int((abs(d.mean(-1) - truth) <= seed_half_width(d)).sum())
    rate = {k: v / 2000 for k, v in covered.items()}
    assert 0.93 <= rate["images"] <= 0.97, rate
    assert rate["bound"] >= 0.95, rate
    assert rate["seeds"] < rate["images"], rate


# The study record, and runs the report must not take -----------------------------------------


def test_study_json_round_trips_and_reads_the_unversioned_form(tmp_path: Path) -> None:
    from distill.errors import DistillError
    from distill.study.record import STUDY_FILE, StudyRecord, read_study, write_study

    old = {"types": ["none", "soft"], "axes": [], "variant_settings": PAPER, "recipe": "r.yaml", "seeds": [0, 1]}
    (tmp_path / STUDY_FILE).write_text(json.dumps(old))
    record = read_study(tmp_path)
    assert record == StudyRecord("r.yaml", ("none", "soft"), (0, 1), (), PAPER, version=0)
    assert record.settings is None and record.runs == {}
    new = StudyRecord("r.yaml", ("soft",), (0,), ("distillation.tau",), {}, ("train.epochs=2",),
                      {"train": {"epochs": 2}}, {"soft-seed0": {"run.seed": 0}})  # fmt: skip
    write_study(tmp_path, new)
    assert read_study(tmp_path) == new and json.loads((tmp_path / STUDY_FILE).read_text())["version"] == 1
    (tmp_path / STUDY_FILE).write_text(json.dumps({"version": 9}))
    with pytest.raises(DistillError, match=r"study.json has version 9, newer than this distill reads \(1\)"):
        read_study(tmp_path)
    assert read_study(tmp_path / "nowhere") is None


def _record_of(study: Path) -> None:
    """study.json as distill.compare writes it, planned from the runs now in ``study``."""
    from distill.study.record import StudyRecord, planned_record, write_study

    trees = [(p.name, yaml.safe_load((p / "recipe.yaml").read_text())) for p in sorted(study.iterdir())]
    settings = dict(trees)["hard-seed0"]
    write_study(study, planned_record(StudyRecord(types=("hard", "soft", "none"), seeds=(0, 1, 2)), settings, trees))


def test_the_report_refuses_a_run_made_with_other_settings_than_its_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.report import main

    study = tmp_path / "study"
    for v, s in FUSED:
        fake_run(study, v, s)
    _record_of(study)
    assert main([str(study), "--out", str(tmp_path / "ok")]) == 0
    run = study / "hard-seed1"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["train"]["lr"] = 0.002  # trained again later with another lr, in the same folder
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(study), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {run} was made with other settings than its study planned (study.json): it differs in train.lr" in err
    )
    assert not (tmp_path / "bad" / "report.md").exists()
    stranger = fake_run(tmp_path / "other", "hard", 2).rename(study / "hard-copy-seed2")
    recipe["train"]["lr"] = 0.001
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main([str(study), "--out", str(tmp_path / "also")]) == 0  # the study folder: passed over, said so
    assert f"report: skipped {stranger} (not one of the runs {study / 'study.json'} planned)" in capsys.readouterr().out
    assert main([*map(str, sorted(study.glob("*-seed*"))), "--out", str(tmp_path / "bad")]) == 2  # named: refused
    assert f"{stranger} is not one of the runs its study planned" in capsys.readouterr().err


def test_the_report_refuses_two_runs_of_one_variant_and_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.report import main

    a, b = fake_run(tmp_path / "one", "hard", 0), fake_run(tmp_path / "two", "hard", 0)
    assert main([str(a), str(b), "--out", str(tmp_path / "all")]) == 2
    assert (
        f"error: runs {a}, {b} are all hard with seed 0: a report takes one run per hard and seed"
        in capsys.readouterr().err
    )


def test_the_report_says_what_it_skipped_in_a_study_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill.report import main

    for v, s in FUSED:
        fake_run(tmp_path / "study", v, s)
    nested = fake_run(tmp_path / "study" / "old-study", "hard", 0).parent
    unfinished = fake_run(tmp_path / "elsewhere", "soft", 2).rename(tmp_path / "study" / "soft-seed5")
    (unfinished / "summary.json").unlink()
    assert main([str(tmp_path / "study"), "--out", str(tmp_path / "study" / "report")]) == 0
    out = capsys.readouterr().out
    assert f"report: skipped {nested} (a study of its own inside {tmp_path / 'study'}: pass it by name" in out
    assert f"report: skipped {unfinished} (unfinished: no summary.json)" in out
    assert main([str(tmp_path), "--out", str(tmp_path / "top")]) == 2  # a folder of studies only
    assert f"error: {tmp_path} holds no run of its own, only studies: pass one of them ({tmp_path / 'study'})" in (
        capsys.readouterr().err
    )
    # the report folder given as if it were a run: pointed at the study
    assert main([str(tmp_path / "study" / "report"), "--out", str(tmp_path / "again")]) == 2
    assert (
        f"error: {tmp_path / 'study' / 'report'} is a report, not a run: its runs are in the study folder "
        f"{tmp_path / 'study'}" in capsys.readouterr().err
    )


def test_a_one_seed_report_words_its_counts(tmp_path: Path) -> None:
    dirs = [grid_run(tmp_path / "study", "soft", t, 0) for t in (1.0, 3.0)]
    text = build_report(dirs, tmp_path / "report", StudyRecord(axes=("distillation.tau",))).read_text()
    assert "2 runs: soft tau=1 (1 seed), soft tau=3 (1 seed)." in text
    assert "With one comparison at 95%: a 1 in 20 chance that it falls outside noise by chance alone." in text
    assert "- soft tau=1 - soft tau=3: -3.00 points from 1 seed; too few seeds for a confidence interval" in text
    assert "| soft tau=1 - soft tau=3 | -3.00 | n/a (1 seed) | n/a | 1 | - |" in text
    assert "nan" not in text and "1 seeds" not in text and "1 comparisons" not in text
    assert "-notoken" not in text  # the note on notoken variants only where there is one
    notoken = fake_run(tmp_path / "nt", "hard", 0)
    recipe = yaml.safe_load((notoken / "recipe.yaml").read_text())
    recipe["distillation"]["token"] = False
    (notoken / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    text = build_report([notoken], tmp_path / "nt-report").read_text()
    assert "Variants ending in `-notoken` train a plain ViT" in text


def test_epoch_ticks_are_whole_numbers_and_long_bar_labels_are_slanted(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from distill.study.plots import curve_figure, plot_bars

    runs = [load_run(fake_run(tmp_path, "hard", s)) for s in (0, 1, 2)]
    fig = curve_figure({"hard": runs}, "val/top1_fused", "val top-1 fused (%)")
    try:
        fig.canvas.draw()
        ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 2]
        assert ticks == [1.0, 2.0]  # epochs 1 and 2; never 1.25, 1.5, ...
    finally:
        plt.close(fig)
    captured = {}
    real_close = plt.close
    plt.close = lambda fig: captured.setdefault("fig", fig)  # type: ignore[assignment]
    try:
        plot_bars({"soft tau=1 alpha=0.5": runs, "hard": runs}, tmp_path / "bars.png")
    finally:
        plt.close = real_close
    labels = captured["fig"].axes[0].get_xticklabels()
    assert [label.get_text() for label in labels] == ["soft tau=1 alpha=0.5", "hard"]
    assert all(label.get_rotation() == 25 for label in labels)
    real_close(captured["fig"])


def _predictions(run: Path, right: np.ndarray, seed: int) -> None:
    """<run>/predictions.npz as a run writes it, in a shuffled order: right[i] says whether the
    fused head was right on validation image i."""
    order = np.random.default_rng(seed).permutation(len(right))
    label = np.arange(len(right), dtype=np.int64) % 10
    pred = np.where(right, label, (label + 1) % 10).astype(np.int64)
    np.savez(run / "predictions.npz", index=order.astype(np.int64), label=label[order], pred_fused=pred[order])


def test_per_image_results_give_the_exact_interval(tmp_path: Path) -> None:
    from distill.study.stats import images_interval

    rng = np.random.default_rng(1)
    right = {v: (rng.random((3, 200)) < acc).astype(bool) for v, acc in (("hard", 0.6), ("none", 0.5))}
    dirs = []
    for v, r in right.items():
        for s in (0, 1, 2):
            run = fake_run(tmp_path / "study", v, s)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            rows[-1]["val/top1_fused"] = float(r[s].mean())
            (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            _predictions(run, r[s], s)
            dirs.append(run)
    text = build_report(dirs, tmp_path / "report").read_text()
    mean, half = images_interval(right["hard"], right["none"])
    lo, hi = 100 * (float(mean) - float(half)), 100 * (float(mean) + float(half))
    assert f"| hard - none | {100 * float(mean):+.2f} | " in text
    assert f" | {lo:.2f} to {hi:.2f} | 3 | per-image (exact) |" in text
    assert "Every interval accounts for the seed-to-seed spread and the validation set's sampling noise, exact" in text
    (dirs[0] / "predictions.npz").unlink()  # one run without: the bound, from the recorded size
    text = build_report(dirs, tmp_path / "report2").read_text()
    assert "| 3 | bound (no per-image results) |" in text and "per-image (exact)" not in text
