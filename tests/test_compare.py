"""The study command: variants, the plan, matched data across types, and restart behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.compare import Variant, study_plan
from distill.config import load_recipe
from distill.data import load_source
from distill.errors import RecipeError
from distill.pipeline import build_pipeline, data_seed, student_input_spec
from tests.conftest import SMOKE, check_ok, subprocess_env

SMOKE_BASE = ["data.augment.auto_augment=rand-m9-mstd0.5-inc1", "data.augment.re_prob=0.25"]


def test_variants_parse() -> None:
    assert Variant.parse("hard") == Variant("hard", True)
    assert Variant.parse("soft-notoken") == Variant("soft", False)
    assert Variant.parse("soft-notoken").name == "soft-notoken"
    with pytest.raises(RecipeError, match="unknown study type 'medium'"):
        Variant.parse("medium")
    with pytest.raises(RecipeError, match="unknown study type"):
        Variant.parse("hard-token")


def test_study_plan_names_and_overrides(tmp_path: Path) -> None:
    study, runs = study_plan(
        str(SMOKE), [Variant("none"), Variant("hard", False)], [0, 3], [f"run.output_dir={tmp_path}"]
    )
    assert study == tmp_path / "smoke-study"
    assert [name for name, _ in runs] == ["none-seed0", "hard-notoken-seed0", "none-seed3", "hard-notoken-seed3"]
    recipe = load_recipe(SMOKE, runs[3][1])
    assert (recipe.run.seed, recipe.distillation.type, recipe.distillation.token) == (3, "hard", False)
    assert recipe.run.output_dir == study and recipe.teacher.cache_dir == tmp_path / "teachers"


def first_batches(overrides: list[str], n: int = 3) -> list[dict[str, torch.Tensor]]:
    """The first training batches of epoch 1 exactly as the trainer builds its loader."""
    r = load_recipe(SMOKE, overrides)
    split = load_source(r.data)
    pipeline = build_pipeline(
        r.data, split, student_input_spec(r), data_seed(r),
        per_process_batch=16, global_batch=16, eval_batch=32, label_smoothing=0.0,
    )  # fmt: skip
    train = pipeline.train_loader
    train.dataset.set_epoch(1)
    train.sampler.set_epoch(1)
    return [b for b, _ in zip(train, range(n), strict=False)]


def test_runs_with_the_same_seed_and_different_types_get_identical_batches(tmp_path: Path) -> None:
    _, runs = study_plan(
        str(SMOKE),
        [Variant("none"), Variant("soft"), Variant("hard", False)],
        [0, 1],
        [f"run.output_dir={tmp_path}", *SMOKE_BASE],
    )
    batches = {name: first_batches(ov) for name, ov in runs}
    for other in ("soft-seed0", "hard-notoken-seed0"):
        for a, b in zip(batches["none-seed0"], batches[other], strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(batches["none-seed0"][0]["image"], batches["none-seed1"][0]["image"])


@pytest.mark.slow
def test_a_study_stopped_mid_way_skips_finished_runs_and_resumes_the_rest(tmp_path: Path, teacher_cache: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    args = [
        sys.executable,
        "-m",
        "distill.compare",
        str(SMOKE),
        "--types",
        "none,hard",
        "--seeds",
        "0",
        f"run.output_dir={tmp_path}",
        f"teacher.cache_dir={teacher_cache}",
        "train.epochs=1",
        "run.export=false",
    ]
    first = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    check_ok(first)
    study = tmp_path / "smoke-study"
    report = (study / "report" / "report.md").read_text()
    assert "none-seed0" in report and "hard-seed0" in report
    assert "study: [1/2] none-seed0 finished in " in first.stdout and "1 run left, eta " in first.stdout
    assert "## Inside the students" in report and "| hard |" in report  # the analyses, side by side
    assert all((study / f"{v}-seed0" / "analysis" / "analysis.json").is_file() for v in ("none", "hard"))
    # The second run "was interrupted": its summary is gone, its checkpoints are there.
    (study / "hard-seed0" / "summary.json").unlink()
    finished_metrics = (study / "none-seed0" / "metrics.jsonl").read_text()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    check_ok(second)
    assert "none-seed0 finished earlier, skipped" in second.stdout
    assert "resuming from" in second.stdout
    assert (study / "none-seed0" / "metrics.jsonl").read_text() == finished_metrics
    assert json.loads((study / "hard-seed0" / "summary.json").read_text())["epochs"] == 1
