"""Teacher candidates and ensembles end to end: python -m distill.teachers (measures, refusals,
the pilot) and runs with ensembles of members at their own sizes, a ViT member included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from distill.errors import RecipeError, TeacherError
from distill.recipe.schema import load_recipe
from distill.study.teachers import agreement, calibration_error, measures, parse_candidates
from distill.training.trainer import DistillRun

SMOKE = "recipes/smoke.yaml"
NAMES = [f"class_{i}" for i in range(4)]  # the smoke data's classes
# A ViT teacher small enough for 2 CPU cores, at its own input size (24 px, 8 px patches).
VIT_ARGS = {"img_size": 24, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


def teacher_folder(folder: Path, names: list[str], arch: str = "resnet10t", **args: object) -> Path:
    """A timm teacher folder with random weights and the given class names (no downloads)."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=len(names), **args)
    timm.models.save_for_hf(
        model, str(folder), model_config={"label_names": names}, model_args=dict(args), safe_serialization=True
    )
    return folder


# Measures ---------------------------------------------------------------------------------------


def test_calibration_error_on_hand_made_predictions() -> None:
    # Two images at confidence 0.9 (one right), two at 0.6 (both right): bins (0.8667, 0.9333] and
    # (0.5333, 0.6]; ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.6| = 0.4.
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    assert calibration_error(probs, labels) == pytest.approx(0.4)
    assert calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def test_measures_and_agreement() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    got = measures(logits, torch.tensor([0, 1, 1]))
    assert got["top1"] == pytest.approx(2 / 3)
    nll = -(torch.log_softmax(logits.double(), -1)[[0, 1, 2], [0, 1, 1]]).mean()
    assert got["nll"] == pytest.approx(float(nll))
    a = agreement([torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0])])
    np.testing.assert_allclose(a, [[1.0, 0.75], [0.75, 1.0]])


def test_candidates_are_parsed_and_bad_ones_refused(tmp_path: Path) -> None:
    recipe = load_recipe(SMOKE)
    folder = teacher_folder(tmp_path / "mine", NAMES)
    weights = folder / "model.safetensors"
    got = parse_candidates(f"resnet18,{folder},resnet10t@{weights}", recipe)
    assert [c.label for c in got] == ["resnet18", "mine", "resnet10t@model.safetensors"]
    assert got[1].entry == {"checkpoint": str(folder)}
    with pytest.raises(RecipeError, match="does not exist"):
        parse_candidates(str(tmp_path / "nowhere" / "t.safetensors"), recipe)
    with pytest.raises(RecipeError, match="neither an existing file or folder nor a timm architecture"):
        parse_candidates("resnet_nineteen", recipe)
    with pytest.raises(RecipeError, match="names a teacher twice"):
        parse_candidates("resnet18,resnet18", recipe)
    with pytest.raises(RecipeError, match=r"no teacher\.train"):
        parse_candidates("resnet18", load_recipe(SMOKE, ["teacher.train=null"]))


# Refusals before training -----------------------------------------------------------------------


def ensemble_run(tmp_path: Path, members: list[dict[str, object]], *overrides: str) -> DistillRun:
    recipe = load_recipe(
        SMOKE,
        [f"run.output_dir={tmp_path / 'runs'}", f"teacher.ensemble={json.dumps(members)}", "teacher.min_top1=0.0",
         "train.epochs=1", "run.export=false", *overrides],
    )  # fmt: skip
    return DistillRun(recipe)


def test_a_member_trained_on_other_classes_is_refused_naming_both_lists_before_any_training(tmp_path: Path) -> None:
    other = teacher_folder(tmp_path / "other", ["cat", "dog", "class_2", "class_3"])
    run = ensemble_run(tmp_path, [{"model": "resnet10t"}, {"checkpoint": str(other)}])
    with pytest.raises(TeacherError, match=r"teacher.ensemble member 1: .*Teacher classes: .*cat.*data classes: "):
        run.run()
    # The member to train was never trained, and no run directory was left behind.
    assert not (tmp_path / "runs" / "teachers").exists()
    assert not (tmp_path / "runs" / "smoke").exists()


def test_a_member_that_cannot_be_loaded_is_refused_before_any_training(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    run = ensemble_run(tmp_path, [{"model": "resnet10t"}, {"checkpoint": str(broken)}])
    with pytest.raises(TeacherError, match=r"member 1: teacher folder .*broken lacks config\.json"):
        run.run()
    assert not (tmp_path / "runs" / "teachers").exists() and not (tmp_path / "runs" / "smoke").exists()


def test_a_member_with_another_class_count_is_refused(tmp_path: Path) -> None:
    five = teacher_folder(tmp_path / "five", [*NAMES, "class_4"])
    run = ensemble_run(tmp_path, [{"checkpoint": str(five)}])
    with pytest.raises(TeacherError, match=r"member 0: .*only the teacher has: 'class_4'"):
        run.run()
    # A bare weights file records no names: its head's size is the check.
    bare = [{"model": "resnet10t", "checkpoint": str(five / "model.safetensors")}]
    with pytest.raises(TeacherError, match=r"member 0: .*has a 5-class head .* but the data has 4 classes"):
        ensemble_run(tmp_path, bare).run()


# Runs (slow: they train) ------------------------------------------------------------------------


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_hard_run_with_a_vit_and_a_convnet_member_at_their_own_sizes_trains_and_exports(tmp_path: Path) -> None:
    # A ViT member given as a folder whose classes are the data's in another order (remapped by
    # name), at 24 px, beside a resnet10t the pipeline trains at the student's 16 px.
    vit = teacher_folder(tmp_path / "vit", NAMES[::-1], "vit_tiny_patch16_224", **VIT_ARGS)
    members = [{"model": "resnet10t", "weight": 3}, {"checkpoint": str(vit), "img_size": 24, "weight": 1}]
    ensemble_run(tmp_path, members, "distillation.type=hard", "run.export=true").run()
    teacher = summary(tmp_path / "runs" / "smoke")["teacher"]
    got = [(m["architecture"], m["input"]["size"], m["weight"]) for m in teacher["members"]]
    assert got == [("resnet10t", [16, 16], 0.75), ("vit_tiny_patch16_224", [24, 24], 0.25)]
    assert teacher["members"][1]["class_order"] == [3, 2, 1, 0]
    assert all(len(m["sha256"]) == 64 and 0 <= m["val_top1"] <= 1 for m in teacher["members"])
    assert teacher["architecture"] == "ensemble(resnet10t+vit_tiny_patch16_224)" and teacher["combine"] == "probs"
    card = (tmp_path / "runs" / "smoke" / "export" / "README.md").read_text()
    assert "| teacher member 1 | `vit_tiny_patch16_224`, weight 0.25, sha256" in card


@pytest.mark.slow
@pytest.mark.extended
def test_soft_run_with_two_trained_members_reuses_each_member_and_replays_cached_outputs(tmp_path: Path) -> None:
    members = [{"model": "resnet10t"}, {"model": "resnet10t", "img_size": 24}]
    cache = [f"teacher.output_cache.dir={tmp_path / 'outputs'}", "teacher.output_cache.enabled=true"]
    ensemble_run(tmp_path, members, "distillation.type=soft", "distillation.tau=2", *cache).run()
    first = summary(tmp_path / "runs" / "smoke")
    assert [m["trained_here"] for m in first["teacher"]["members"]] == [True, True]
    assert len(list((tmp_path / "runs" / "teachers").iterdir())) == 2  # each member cached by its own key
    ensemble_run(tmp_path, members, "distillation.type=soft", "distillation.tau=2", "run.name=again", *cache).run()
    again = summary(tmp_path / "runs" / "again")
    assert [m["trained_here"] for m in again["teacher"]["members"]] == [False, False]
    assert again["teacher"]["sha256"] == first["teacher"]["sha256"]
    assert again["teacher_cache"]["train_replayed_images"] > 0
    assert again["final"]["val/top1_fused"] == first["final"]["val/top1_fused"]


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_an_ensemble_run_killed_mid_epoch_resumes_to_the_uninterrupted_numbers(tmp_path: Path, kind: str) -> None:
    """Two members at their own sizes (16 px, the student's, and 24 px), the output cache on:
    SIGKILL right after the step-4 checkpoint (half-way through epoch 1 of 2, the cache half
    written), then resumed; each run with its own cache."""
    from tests.helpers import check_ok, kill_and_resume, read_metrics, run_train

    members = [
        {"checkpoint": str(teacher_folder(tmp_path / "a", NAMES)), "img_size": 16, "weight": 2},
        {"checkpoint": str(teacher_folder(tmp_path / "b", NAMES)), "img_size": 24},
    ]
    common = [
        SMOKE, f"teacher.ensemble={json.dumps(members)}", "teacher.min_top1=0.0", f"distillation.type={kind}",
        "teacher.output_cache.enabled=true", "run.export=false",
    ]  # fmt: skip
    whole, killed = ([*common, f"run.output_dir={tmp_path / n}", f"teacher.output_cache.dir={tmp_path / n / 'outputs'}"]
                     for n in ("whole", "killed"))  # fmt: skip
    check_ok(run_train(*whole))
    kill_and_resume(killed, tmp_path / "killed" / "smoke")
    assert read_metrics(tmp_path / "killed" / "smoke") == read_metrics(tmp_path / "whole" / "smoke")
    first, again = summary(tmp_path / "whole" / "smoke"), summary(tmp_path / "killed" / "smoke")
    assert again["teacher"]["sha256"] == first["teacher"]["sha256"]
    assert [m["input"]["size"] for m in again["teacher"]["members"]] == [[16, 16], [24, 24]]


@pytest.mark.slow
def test_a_study_with_an_ensemble_replays_its_outputs_across_soft_and_hard(tmp_path: Path) -> None:
    """python -m distill.compare --types soft,hard with a two-member ensemble (16 and 24 px):
    soft computes the ensemble's outputs, hard replays them; the report lists the members."""
    import subprocess
    import sys

    from tests.helpers import REPO, check_ok, subprocess_env

    members = [
        {"checkpoint": str(teacher_folder(tmp_path / "a", NAMES)), "img_size": 16},
        {"checkpoint": str(teacher_folder(tmp_path / "b", NAMES)), "img_size": 24},
    ]
    args = [
        sys.executable, "-m", "distill.compare", SMOKE, "--types", "soft,hard", "--seeds", "0", "--no-analysis",
        f"teacher.ensemble={json.dumps(members)}", "teacher.min_top1=0.0", f"run.output_dir={tmp_path / 'runs'}",
        "train.epochs=1", "run.export=false",
    ]  # fmt: skip
    check_ok(subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600))
    study = tmp_path / "runs" / "smoke-study"
    soft, hard = (summary(study / f"{kind}-seed0")["teacher_cache"] for kind in ("soft", "hard"))
    assert soft["train_computed_images"] > 0 and soft["train_replayed_images"] == 0
    assert hard["train_replayed_images"] == soft["train_computed_images"] and hard["train_computed_images"] == 0
    assert "ensemble(resnet10t+resnet10t)" in (study / "report" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.extended
def test_the_teachers_command_writes_its_report_with_a_pilot(tmp_path: Path) -> None:
    from distill.teachers import main

    out = tmp_path / "report"
    argv = [SMOKE, "--candidates", "resnet10t,resnet18", "--ensemble", "--pilot", "1", "--seeds", "0,1"]
    assert main([*argv, "--out", str(out), f"run.output_dir={tmp_path / 'runs'}"]) == 0
    report = (out / "report.md").read_text()
    assert "| resnet10t |" in report and "| ensemble |" in report and "## Pilot" in report
    assert "not the full run's 2" in report
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("teacher,top1,nll,ece,images_per_s,sha256,student_top1")
    assert len(rows) == 4
    assert (out / "teachers_accuracy_calibration.png").is_file() and (out / "pilot_student_top1.png").is_file()


def test_the_teachers_command_refuses_a_candidate_that_cannot_be_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.teachers import main

    out = tmp_path / "report"
    argv = [SMOKE, "--candidates", f"resnet10t,{tmp_path / 'missing.safetensors'}", "--out", str(out)]
    assert main(argv) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert not out.exists()
