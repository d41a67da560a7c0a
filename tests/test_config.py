"""Recipe loading, dotted overrides and error messages (distill/recipe/schema.py, overrides.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.errors import DistillError, RecipeError
from distill.recipe.schema import Recipe, flatten, load_recipe, parse_override, recipe_to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def recipe_error(path: str | Path | None, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides or [])
    return str(info.value)


# Defaults and files ---------------------------------------------------------------------------


def test_defaults_load() -> None:
    recipe = load_recipe(None)
    assert isinstance(recipe, Recipe)
    assert recipe.train.epochs == 300
    assert recipe.distillation.type == "hard"
    assert recipe.data.source == "digits"


def test_a_recipe_error_stops_the_entry_point_with_a_message_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What RecipeError being a DistillError is for: the real entry point prints `error: <message>`
    # with no traceback and exits 2, before anything is built or written.
    from distill.train import main

    out = tmp_path / "runs"
    code = main([str(write(tmp_path, "train:\n  epochs: 3\n")), "train.epocs=3", f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert code == DistillError.exit_code == 2
    assert err.startswith("error: invalid recipe ") and "did you mean 'train.epochs'" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_yaml_file_values_are_used(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 7\n  batch_size: 32\nstudent:\n  img_size: 16\n  patch_size: 4\n")
    recipe = load_recipe(path)
    assert recipe.train.epochs == 7
    assert recipe.train.batch_size == 32
    assert (recipe.student.img_size, recipe.student.patch_size) == (16, 4)
    assert recipe.train.lr == 5e-4  # untouched keys keep their defaults


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, "")) == load_recipe(None)


def test_overrides_apply_on_top_of_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 7\n")
    recipe = load_recipe(path, ["train.epochs=9", "train.batch_size=16"])
    assert recipe.train.epochs == 9
    assert recipe.train.batch_size == 16


def test_later_override_wins() -> None:
    assert load_recipe(None, ["train.epochs=3", "train.epochs=4"]).train.epochs == 4


def test_scientific_notation_string_in_yaml_becomes_float(tmp_path: Path) -> None:
    text = "train:\n  lr: 3e-4\n"
    assert yaml.safe_load(text)["train"]["lr"] == "3e-4"  # the premise: PyYAML (YAML 1.1) reads a string
    recipe = load_recipe(write(tmp_path, text))
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.lr == pytest.approx(0.0003, rel=1e-15)


def test_scientific_notation_in_override_becomes_float() -> None:
    recipe = load_recipe(None, ["train.lr=3e-4", "train.min_lr=1e-6"])
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.lr == pytest.approx(0.0003, rel=1e-15)
    assert recipe.train.min_lr == pytest.approx(1e-6, rel=1e-15)


def test_recipe_file_missing_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "recipe.yaml"
    msg = recipe_error(missing)
    assert str(missing) in msg
    assert "not found" in msg


def test_recipe_file_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    msg = recipe_error(path)
    assert str(path) in msg
    assert "mapping" in msg


def test_recipe_file_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "train: [1, 2\n")
    msg = recipe_error(path)
    assert str(path) in msg
    assert "not valid YAML" in msg


# Unknown keys ---------------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_close_key(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epocs: 3\n")
    msg = recipe_error(path)
    assert "'train.epocs'" in msg
    assert "did you mean 'train.epochs'" in msg
    assert str(path) in msg  # the source is named


def test_unknown_key_in_override_suggests_close_key() -> None:
    msg = recipe_error(None, ["train.epocs=3"])
    assert "'train.epocs'" in msg
    assert "did you mean 'train.epochs'" in msg
    assert "train.epocs=3" in msg  # the override is named as the source


def test_misspelt_section_suggests_section(tmp_path: Path) -> None:
    msg = recipe_error(write(tmp_path, "trian:\n  epochs: 3\n"))
    assert "'trian'" in msg
    assert "did you mean 'train'" in msg


def test_misspelt_section_in_override() -> None:
    msg = recipe_error(None, ["trian.epochs=3"])
    assert "'trian'" in msg
    assert "did you mean 'train'" in msg


def test_unknown_key_in_optional_nested_section() -> None:
    # teacher.train is `TeacherTrainConfig | None`: the hint still finds the section's fields.
    msg = recipe_error(None, ["teacher.train.epocs=2"])
    assert "'teacher.train.epocs'" in msg
    assert "did you mean 'teacher.train.epochs'" in msg


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    msg = recipe_error(None, ["distillation.zzzzzz=1"])
    assert "'distillation.zzzzzz'" in msg
    assert "did you mean" not in msg
    for key in ("type", "alpha", "tau", "kl_norm"):
        assert key in msg


# Types and ranges -----------------------------------------------------------------------------


def test_wrong_type_names_key() -> None:
    msg = recipe_error(None, ["train.epochs=abc"])
    assert "'train.epochs'" in msg
    assert "'abc'" in msg


def test_wrong_type_in_file_names_key(tmp_path: Path) -> None:
    msg = recipe_error(write(tmp_path, "train:\n  epochs: abc\n"))
    assert "'train.epochs'" in msg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.lr=-0.001"], "train.lr"),
        (["train.lr=0"], "train.lr"),
        (["distillation.alpha=1.5"], "distillation.alpha"),
        (["distillation.alpha=-0.1"], "distillation.alpha"),
        (["distillation.tau=0"], "distillation.tau"),
        (["student.img_size=30", "student.patch_size=4"], "student.img_size"),
        (["student.embed_dim=100", "student.num_heads=3"], "student.embed_dim"),
        (["train.label_smoothing=1.0"], "train.label_smoothing"),
        (["data.val_fraction=0"], "data.val_fraction"),
        (["train.epochs=0"], "train.epochs"),
        (["data.source=mnist"], "data.source"),
        (["distillation.type=medium"], "distillation.type"),
    ],
)
def test_out_of_range_names_key(overrides: list[str], key: str) -> None:
    msg = recipe_error(None, overrides)
    assert key in msg


def test_img_size_patch_size_message_has_both_sizes() -> None:
    msg = recipe_error(None, ["student.img_size=30", "student.patch_size=4"])
    assert "30" in msg and "4" in msg
    assert "student.patch_size" in msg


def test_img_size_divisible_is_fine() -> None:
    recipe = load_recipe(None, ["student.img_size=32", "student.patch_size=4"])
    assert recipe.student.img_size == 32


@pytest.mark.parametrize("source", ["imagefolder", "hub"])
def test_path_required_for_folder_and_hub(source: str) -> None:
    msg = recipe_error(None, [f"data.source={source}"])
    assert "data.path" in msg
    assert source in msg


def test_imagefolder_with_path_loads() -> None:
    recipe = load_recipe(None, ["data.source=imagefolder", "data.path=/some/dir"])
    assert recipe.data.path == "/some/dir"


# Overrides ------------------------------------------------------------------------------------


def test_overrides_parsed_as_yaml() -> None:
    recipe = load_recipe(
        None,
        [
            "data.augment.scale=[0.5, 1.0]",
            "data.augment.auto_augment=null",
            "run.overwrite=true",
            "run.export=false",
            "train.clip_grad=1.5",
            "teacher.model_args={drop_rate: 0.1}",
            "teacher.mean=[0.5, 0.5, 0.5]",
            "run.name=a=b",  # only the first '=' splits
        ],
    )
    assert recipe.data.augment.scale == (0.5, 1.0)
    assert recipe.data.augment.auto_augment is None
    assert recipe.run.overwrite is True
    assert recipe.run.export is False
    assert recipe.train.clip_grad == 1.5
    assert recipe.teacher.model_args == {"drop_rate": 0.1}
    assert recipe.teacher.mean == (0.5, 0.5, 0.5)
    assert recipe.run.name == "a=b"


def test_override_empty_value_is_null() -> None:
    assert load_recipe(None, ["train.ema_decay=0.99", "train.ema_decay="]).train.ema_decay is None


def test_override_creates_optional_section() -> None:
    recipe = load_recipe(None, ["teacher.train.epochs=2"])
    assert recipe.teacher.train is not None
    assert recipe.teacher.train.epochs == 2
    assert recipe.teacher.train.batch_size == 256  # the teacher-stage default, not train's


@pytest.mark.parametrize(
    ("text", "parts", "value"),
    [
        ("train.epochs=3", ["train", "epochs"], 3),
        ("a.b=[1, 2]", ["a", "b"], [1, 2]),
        ("a=null", ["a"], None),
        ("a=yes", ["a"], True),  # YAML 1.1 boolean
        ("a=off", ["a"], False),
        ("a=3e-4", ["a"], "3e-4"),  # a string here; the schema converts it
        ("a = 2", ["a"], 2),
    ],
)
def test_parse_override(text: str, parts: list[str], value: Any) -> None:
    assert parse_override(text) == (parts, value)


def test_bad_override_without_equals() -> None:
    msg = recipe_error(None, ["train.epochs"])
    assert "train.epochs" in msg
    assert "dotted.key=value" in msg


@pytest.mark.parametrize("text", ["train..epochs=3", ".epochs=3", "=3"])
def test_bad_override_empty_key_part(text: str) -> None:
    assert "empty key part" in recipe_error(None, [text])


def test_bad_override_invalid_yaml_value() -> None:
    msg = recipe_error(None, ["train.epochs=[1, 2"])
    assert "not valid YAML" in msg


def test_override_into_a_value_from_defaults() -> None:
    # 'train.epochs' is a value (an int), not a section.
    msg = recipe_error(None, ["train.epochs.x=1"])
    assert "train.epochs" in msg


def test_override_into_a_value_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  epochs: 5\n")
    msg = recipe_error(path, ["train.epochs.x=1"])
    assert "'train.epochs' is a value, not a section" in msg


def test_override_into_a_value_set_by_earlier_override() -> None:
    msg = recipe_error(None, ["train.epochs=3", "train.epochs.x=1"])
    assert "'train.epochs' is a value, not a section" in msg


# Provenance and round trip --------------------------------------------------------------------


def test_provenance_key_is_ignored(tmp_path: Path) -> None:
    text = "provenance:\n  git_commit: abc123\n  argv: [distill-train, x.yaml]\ntrain:\n  epochs: 4\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.train.epochs == 4


def test_run_recipe_yaml_round_trips(tmp_path: Path) -> None:
    # A run writes the resolved recipe plus provenance; loading that file gives the same recipe.
    original = load_recipe(
        None,
        ["train.epochs=4", "train.lr=3e-4", "data.augment.scale=[0.5, 1.0]", "teacher.train.epochs=2"],
    )
    tree = recipe_to_dict(original)
    tree["provenance"] = {"git_commit": "abc123", "overrides": ["train.epochs=4"]}
    path = write(tmp_path, yaml.safe_dump(tree, sort_keys=False))
    assert load_recipe(path) == original


def test_provenance_is_only_special_at_top_level(tmp_path: Path) -> None:
    msg = recipe_error(write(tmp_path, "train:\n  provenance: x\n"))
    assert "'train.provenance'" in msg


# flatten --------------------------------------------------------------------------------------


def test_flatten_small_nested_dict() -> None:
    tree = {
        "a": {"b": 1, "c": {"d": "x", "e": None}},
        "f": [1, 2],
        "g": True,
        "h": 0.5,
        "i": {},
        "j": (3, 4),
    }
    assert flatten(tree) == {
        "a.b": 1,
        "a.c.d": "x",
        "a.c.e": "None",
        "f": "[1, 2]",
        "g": True,
        "h": 0.5,
        "i": "{}",
        "j": "(3, 4)",
    }


def test_flatten_prefix() -> None:
    assert flatten({"a": {"b": 2}}, prefix="hp/") == {"hp/a.b": 2}


def test_flatten_of_a_recipe_has_dotted_keys() -> None:
    flat = flatten(recipe_to_dict(load_recipe(None)))
    assert flat["train.epochs"] == 300
    assert flat["data.augment.scale"] == "[0.08, 1.0]"
    assert flat["teacher.checkpoint"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


# Shipped recipes ------------------------------------------------------------------------------


def test_recipes_directory_has_recipes() -> None:
    assert len(RECIPES) >= 1, f"no recipes/*.yaml under {REPO_ROOT}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_is_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    # The file must only hold keys the schema knows, so loading never silently drops anything:
    # dumping the resolved recipe and reloading it gives the same recipe.
    assert Recipe.model_validate(recipe_to_dict(recipe)) == recipe


# Messages for the usual slips -------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_an_override_given_before_the_recipe_says_the_recipe_comes_first() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("train.epochs=3", ["recipes/quickstart.yaml"])
    assert str(info.value) == (
        "'train.epochs=3' is an override, not a recipe file: the recipe comes first, then the overrides "
        "(recipes/quickstart.yaml train.epochs=3)"
    )


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("epochs=3", "did you mean train.epochs=3 or teacher.train.epochs=3?"),
        ("tau=3", "did you mean distillation.tau=3?"),
        ("epohcs=3", "did you mean train.epochs=3 or teacher.train.epochs=3?"),
    ],
)
def test_a_bare_key_names_the_dotted_keys_that_hold_it(text: str, hint: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [text])
    assert str(info.value) == f"bad override '{text}': keys are dotted paths (section.key); {hint}"


def test_a_recipe_named_without_its_path_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(RecipeError, match=r"^recipe file not found: quickstart; did you mean recipes/quickstart.yaml"):
        load_recipe("quickstart")
    with pytest.raises(RecipeError, match=r"did you mean recipes/quickstart_finetune.yaml\?$"):
        load_recipe("recipes/quickstart_finetune")
    monkeypatch.chdir(tmp_path)  # elsewhere: the repository's recipes, by their full path
    with pytest.raises(RecipeError, match=f"did you mean {REPO / 'recipes' / 'smoke.yaml'}"):
        load_recipe("smok")
    with pytest.raises(RecipeError, match=r"^recipe file not found: nothing_like_it.yaml \(pass the path"):
        load_recipe("nothing_like_it.yaml")


def test_python_m_distill_lists_every_command() -> None:
    import subprocess
    import sys

    from distill.__main__ import COMMANDS

    commands = {p.stem for p in (REPO / "distill").glob("*.py")} - {"__init__", "__main__", "errors", "entrypoint"}
    assert set(COMMANDS) == commands
    proc = subprocess.run([sys.executable, "-m", "distill"], capture_output=True, text=True, cwd=REPO, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: python -m distill.<command>")
    assert [line.split()[0] for line in lines[2:]] == list(COMMANDS)
