"""The study report: paired statistics against hand-computed values, and a report built from
small fake runs with known numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from distill.report import build_report, load_run, mean_std, paired_difference, verdict

T_975_DF2 = 4.302652729911275  # Student t, two-sided 95%, 2 degrees of freedom (tables: 4.303)


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
        "teacher": {"architecture": "resnet10t", "sha256": "ab" * 32},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_report_from_fake_runs(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "study", v, s) for (v, s) in FUSED]
    md = build_report(runs, tmp_path / "report")
    text = md.read_text()
    # hard - none: differences 3, 4, 5 points -> mean 4, sd 1
    half = T_975_DF2 / math.sqrt(3)
    assert f"hard beats none by 4.00 points (95% CI {4 - half:.2f} to {4 + half:.2f}, 3 seeds)" in text
    # hard - soft: differences 2, 3, 3 -> mean 2.667, sd 0.577
    sd = math.sqrt(1 / 3)
    lo, hi = 8 / 3 - T_975_DF2 * sd / math.sqrt(3), 8 / 3 + T_975_DF2 * sd / math.sqrt(3)
    assert f"hard beats soft by 2.67 points (95% CI {lo:.2f} to {hi:.2f}, 3 seeds)" in text
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
