"""The study command: variants, the plan, matched data across types, and restart behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.compare import main
from distill.data.pipeline import build_pipeline, data_seed
from distill.data.sources import load_source
from distill.errors import RecipeError
from distill.models.student import student_input_spec
from distill.recipe.schema import load_recipe
from distill.study.plan import Axis, Variant, split_values, study_plan
from tests.helpers import SMOKE, check_ok, subprocess_env

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


def test_vary_parses_key_and_values() -> None:
    assert Axis.parse("distillation.tau=1,3") == Axis("distillation.tau", ("1", "3"))
    assert Axis.parse(" data.augment.scale = [0.5, 1.0],[0.08,1.0] ").values == ("[0.5, 1.0]", "[0.08,1.0]")
    assert split_values("'a,b',c, {x: 1, y: 2}") == ["'a,b'", "c", "{x: 1, y: 2}"]
    with pytest.raises(
        RecipeError, match=r"bad --vary 'tau': expected KEY=v1,v2,..., e.g. --vary distillation.tau=1,3"
    ):
        Axis.parse("tau")
    with pytest.raises(RecipeError, match=r"bad --vary 'distillation.tau=': no values after '='"):
        Axis.parse("distillation.tau=")
    with pytest.raises(RecipeError, match=r"^--vary distillation.type: --types sets it; vary it there$"):
        Axis.parse("distillation.type=soft,hard")
    with pytest.raises(RecipeError, match=r"^--vary run.seed: --seeds sets it; vary it there$"):
        Axis.parse("run.seed=0,1")
    with pytest.raises(RecipeError, match=r"--vary distillation.token: --types \(soft-notoken"):
        Axis.parse("distillation.token=true,false")


def test_a_grid_names_every_cell_by_its_settings(tmp_path: Path) -> None:
    axes = [Axis.parse("distillation.tau=1,3.0"), Axis.parse("distillation.alpha=0.1,0.5")]
    study, runs = study_plan(
        str(SMOKE), [Variant("soft"), Variant("hard", False)], [0, 1], [f"run.output_dir={tmp_path}"], axes=axes
    )
    names = [name for name, _ in runs]
    assert names[:5] == [
        "soft-tau1-alpha0.1-seed0",
        "soft-tau1-alpha0.5-seed0",
        "soft-tau3-alpha0.1-seed0",  # 3.0 is named as the schema resolves it, as the report does
        "soft-tau3-alpha0.5-seed0",
        "hard-notoken-tau1-alpha0.1-seed0",
    ]
    assert len(names) == len(set(names)) == 2 * 2 * 2 * 2 and names[-1] == "hard-notoken-tau3-alpha0.5-seed1"
    recipe = load_recipe(SMOKE, dict(runs)["hard-notoken-tau3-alpha0.1-seed1"])
    assert (recipe.distillation.tau, recipe.distillation.alpha, recipe.run.seed) == (3.0, 0.1, 1)
    assert (recipe.distillation.type, recipe.distillation.token, recipe.run.name) == (
        "hard",
        False,
        "hard-notoken-tau3-alpha0.1-seed1",
    )
    assert recipe.run.output_dir == study == tmp_path / "smoke-study"


def test_grid_directory_names_are_file_system_safe_and_unique(tmp_path: Path) -> None:
    out = [f"run.output_dir={tmp_path}"]
    _, runs = study_plan(
        str(SMOKE), [Variant("hard")], [0], out, axes=[Axis.parse("data.augment.scale=[0.5,1.0],[0.08, 1]")]
    )
    assert [name for name, _ in runs] == ["hard-scale0.5_1-seed0", "hard-scale0.08_1-seed0"]
    assert load_recipe(SMOKE, runs[1][1]).data.augment.scale == (0.08, 1.0)
    # train.lr and teacher.train.lr share their last part: both are named in full
    _, runs = study_plan(
        str(SMOKE),
        [Variant("hard")],
        [0],
        out,
        axes=[Axis.parse("train.lr=0.001"), Axis.parse("teacher.train.lr=1e-3")],
    )
    assert [name for name, _ in runs] == ["hard-train.lr0.001-teacher.train.lr0.001-seed0"]
    with pytest.raises(
        RecipeError,
        match=r"two cells would share the run directory hard-modelres_net-seed0 \(values that differ only in",
    ):
        study_plan(str(SMOKE), [Variant("hard")], [0], out, axes=[Axis.parse("teacher.model=res/net,res net")])


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        (["distillation.taux=1,3"], r"unknown key 'distillation.taux'; did you mean 'distillation.tau'\?"),
        (["distillation.alpha=0.5,2"], r"'distillation.alpha': Input should be less than or equal to 1 \(got 2\)"),
        (["distillation.tau=3,3.0"], r"^--vary distillation.tau gives the same value twice: 3$"),
        (
            ["distillation.tau=1", "distillation.tau=3"],
            r"^--vary names a key twice: distillation.tau, distillation.tau$",
        ),
        (["run.keep_checkpoints=1,2"], r"^--vary run.keep_checkpoints: it does not change a run's result"),
    ],
)
def test_a_bad_grid_is_refused_with_the_schemas_message(tmp_path: Path, vary: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        study_plan(
            str(SMOKE), [Variant("soft")], [0], [f"run.output_dir={tmp_path}"], axes=[Axis.parse(v) for v in vary]
        )


def test_vary_data_seed_with_data_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"^--vary data.seed: --data-seed sets it; give one or the other$"):
        study_plan(
            str(SMOKE),
            [Variant("soft")],
            [0],
            [f"run.output_dir={tmp_path}"],
            data_seed=0,
            axes=[Axis.parse("data.seed=1,2")],
        )


def test_the_command_refuses_a_bad_grid_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(SMOKE), f"run.output_dir={tmp_path}", "--types", "soft"]
    assert main([*base, "--vary", "distillation.type=soft,hard"]) == 2
    assert "error: --vary distillation.type: --types sets it; vary it there" in capsys.readouterr().err
    assert main([*base, "--vary", "distillation.tau=1,3", "--vary", "train.epochs=0,1"]) == 2
    assert "'train.epochs': Input should be greater than or equal to 1 (got 0)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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


def test_grid_cells_with_the_same_seed_get_identical_batches(tmp_path: Path) -> None:
    axes = [Axis.parse("distillation.tau=1,3"), Axis.parse("distillation.alpha=0.1,0.9")]
    _, runs = study_plan(
        str(SMOKE), [Variant("soft"), Variant("hard")], [0], [f"run.output_dir={tmp_path}", *SMOKE_BASE], axes=axes
    )
    first = first_batches(runs[0][1], n=2)
    for name in ("soft-tau3-alpha0.9-seed0", "hard-tau1-alpha0.9-seed0"):
        for a, b in zip(first, first_batches(dict(runs)[name], n=2), strict=True):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


@pytest.mark.slow
def test_a_study_stopped_mid_way_skips_finished_runs_and_resumes_the_rest(tmp_path: Path, teacher_cache: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

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
    # The same study with other result-changing settings in the same folder: refused before training
    # (the finished 1-epoch runs would be skipped and reported as 2-epoch runs).
    changed = ["train.epochs=2" if a == "train.epochs=1" else a for a in args]
    third = subprocess.run(changed, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert third.returncode == 2, third.stderr
    assert f"run {study / 'none-seed0'} finished with other settings than this study's: it differs in train.epochs" in (
        third.stderr
    )
    assert "skipped" not in third.stdout and (study / "none-seed0" / "metrics.jsonl").read_text() == finished_metrics
    assert json.loads((study / "study.json").read_text())["settings"]["train"]["epochs"] == 1


@pytest.mark.slow
def test_a_grid_study_runs_every_cell_and_reports_them_by_name(tmp_path: Path, teacher_cache: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    args = [
        sys.executable, "-m", "distill.compare", str(SMOKE), "--types", "soft", "--seeds", "0",
        "--vary", "distillation.tau=1,3", f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}",
        "train.epochs=1", "run.export=false", "--no-analysis",
    ]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    check_ok(proc)
    study = tmp_path / "smoke-study"
    assert "study: [1/2] soft-tau1-seed0" in proc.stdout and "study: [2/2] soft-tau3-seed0" in proc.stdout
    taus = [load_recipe(study / f"soft-tau{t}-seed0" / "recipe.yaml").distillation.tau for t in (1, 3)]
    assert taus == [1.0, 3.0]
    summaries = [json.loads((study / f"soft-tau{t}-seed0" / "summary.json").read_text()) for t in (1, 3)]
    assert summaries[0]["final"]["train/loss_kd"] != summaries[1]["final"]["train/loss_kd"]
    assert summaries[1]["teacher_cache"]["train_replayed_images"] > 0  # one data stream: outputs replayed
    layout = json.loads((study / "study.json").read_text())  # for python -m distill.report later
    assert layout["axes"] == ["distillation.tau"] and layout["types"] == ["soft"] and layout["seeds"] == [0]
    report = (study / "report" / "report.md").read_text()
    assert (
        "- soft tau=1 vs soft tau=3" in report
        or "- soft tau=3 vs soft tau=1" in report
        or "soft tau=1 - soft tau=3" in report
    )
    assert "| soft tau=1 | 0 |" in report and "| soft tau=3 | 0 |" in report


def test_a_type_with_settings_of_its_own_is_a_named_variant(tmp_path: Path) -> None:
    paper = Variant.parse("soft:tau=3:alpha=0.1")
    assert paper == Variant("soft", True, (("tau", "3"), ("alpha", "0.1")))
    assert paper.name == "soft-tau3-alpha0.1" and Variant.parse("soft:tau=3.0").name == "soft-tau3"
    assert Variant.parse("soft:alpha=1e-1:tau=3") == paper.__class__("soft", True, (("tau", "3"), ("alpha", "1e-1")))
    assert Variant.parse("soft:alpha=1e-1:tau=3").name == paper.name  # a restart typed otherwise finds its runs
    assert Variant.parse("hard-notoken:distillation.alpha=0.9").name == "hard-notoken-alpha0.9"
    _study, runs = study_plan(
        str(SMOKE), [Variant("soft"), paper, Variant("hard")], [0, 1], [f"run.output_dir={tmp_path}", *SMOKE_BASE]
    )
    assert [name for name, _ in runs][:3] == ["soft-seed0", "soft-tau3-alpha0.1-seed0", "hard-seed0"]
    recipe = load_recipe(SMOKE, dict(runs)["soft-tau3-alpha0.1-seed1"])
    assert (recipe.distillation.type, recipe.distillation.tau, recipe.distillation.alpha) == ("soft", 3.0, 0.1)
    plain = load_recipe(SMOKE, dict(runs)["soft-seed1"])
    assert (plain.distillation.tau, plain.distillation.alpha) == (1.0, 0.5)  # the recipe's own
    # same seed, same data stream: the settings change the loss only
    for a, b in zip(first_batches(dict(runs)["soft-seed0"], 2), first_batches(runs[1][1], 2), strict=True):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("soft:temperature=3", r"KEY one of tau, alpha, kl_norm"),
        ("soft:tau", r"KEY=VALUE settings separated by ':'"),
        ("hard:tau=3", r"distillation.tau acts only in soft distillation, so 'hard' runs would not change"),
        ("none:alpha=0.1", r"acts only in soft and hard distillation"),
        ("soft:tau=3:tau=2", r"sets tau twice"),
    ],
)
def test_bad_named_variants_are_refused(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Variant.parse(text)


def test_named_variants_are_checked_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [str(SMOKE), "--seeds", "0", f"run.output_dir={tmp_path}"]
    assert main([*base, "--types", "soft,soft:tau=-1"]) == 2  # the schema's message
    assert "distillation.tau" in capsys.readouterr().err
    assert main([*base, "--types", "soft,soft:tau=1:alpha=0.5"]) == 2  # the recipe's own values
    assert "--types soft and soft-tau1-alpha0.5 are the same runs" in capsys.readouterr().err
    assert main([*base, "--types", "soft:tau=3", "--vary", "distillation.tau=1,2"]) == 2
    assert "sets distillation.tau, which --vary varies too" in capsys.readouterr().err
    assert not (tmp_path / "smoke-study").exists()


def _finished_run(study: Path, name: str, overrides: list[str]) -> Path:
    """A finished run as the trainer leaves it: recipe.yaml (the resolved recipe) and summary.json."""
    import yaml

    from distill.recipe.schema import recipe_to_dict

    run = study / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(load_recipe(SMOKE, overrides))))
    (run / "summary.json").write_text("{}")
    return run


def test_a_study_refuses_finished_runs_made_with_other_settings_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """compare ... train.epochs=1, then the same with train.epochs=2 in the same folder: the
    finished 1-epoch run was skipped and reported as the 2-epoch study's."""
    base = [str(SMOKE), "--types", "hard", "--seeds", "0", f"run.output_dir={tmp_path}", "--no-analysis"]
    study, runs = study_plan(str(SMOKE), [Variant("hard")], [0], [f"run.output_dir={tmp_path}", "train.epochs=1"])
    run = _finished_run(study, "hard-seed0", dict(runs)["hard-seed0"])
    before = sorted(p.name for p in study.rglob("*"))
    assert main([*base, "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"error: run {run} finished with other settings than this study's: it differs in train.epochs;" in err
    assert "pass run.overwrite=true to train the study's runs again from scratch, or run.output_dir=..." in err
    assert sorted(p.name for p in study.rglob("*")) == before  # nothing trained, no study.json written


def test_a_fresh_start_or_the_same_settings_pass_the_check(tmp_path: Path) -> None:
    from distill.study.plan import refuse_changed_runs

    out = f"run.output_dir={tmp_path}"
    study, runs = study_plan(str(SMOKE), [Variant("hard")], [0], [out, "train.epochs=1"])
    _finished_run(study, "hard-seed0", dict(runs)["hard-seed0"])
    same = [(n, load_recipe(SMOKE, ov)) for n, ov in runs]
    refuse_changed_runs(study, same)
    _, again = study_plan(str(SMOKE), [Variant("hard")], [0], [out, "train.epochs=2", "run.overwrite=true"])
    refuse_changed_runs(study, [(n, load_recipe(SMOKE, ov)) for n, ov in again])
    # an operational setting (no effect on the result) is no reason to refuse
    _, quiet = study_plan(str(SMOKE), [Variant("hard")], [0], [out, "train.epochs=1", "run.keep_checkpoints=5"])
    refuse_changed_runs(study, [(n, load_recipe(SMOKE, ov)) for n, ov in quiet])


def test_the_study_record_holds_the_resolved_settings_of_every_run(tmp_path: Path) -> None:
    from distill.study.plan import study_record
    from distill.study.record import mismatch

    out = [f"run.output_dir={tmp_path}", "train.epochs=2"]
    variants, axes = [Variant("soft"), Variant.parse("soft:alpha=0.1")], [Axis.parse("distillation.tau=1,3")]
    _, runs = study_plan(str(SMOKE), variants, [0, 1], out, axes=axes)
    recipes = [(name, load_recipe(SMOKE, ov)) for name, ov in runs]
    record = study_record(str(SMOKE), variants, [0, 1], axes, out, recipes)
    assert record.version == 1 and record.types == ("soft", "soft-alpha0.1") and record.axes == ("distillation.tau",)
    assert record.variant_settings == {"soft": ["distillation.alpha"]} and record.overrides == tuple(out)
    assert record.settings["train"]["epochs"] == 2
    assert record.runs["soft-alpha0.1-tau3-seed1"]["distillation.tau"] == 3.0
    assert record.runs["soft-alpha0.1-tau3-seed1"]["distillation.alpha"] == 0.1
    assert record.runs["soft-alpha0.1-tau3-seed1"]["run.seed"] == 1
    from distill.recipe.schema import recipe_to_dict

    for name, recipe in recipes:
        assert mismatch(record, name, recipe_to_dict(recipe)) == []
    other = recipe_to_dict(load_recipe(SMOKE, [*dict(runs)["soft-tau1-seed0"], "train.epochs=3"]))
    assert mismatch(record, "soft-tau1-seed0", other) == ["train.epochs"]


def test_help_names_the_default_study(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "By default 3 types (none, soft, hard) x 3 seeds (0, 1, 2) = 9 runs." in text
    assert "--seeds SEEDS comma-separated integers, each a run of every type" in text and "(default: 0,1,2)" in text
