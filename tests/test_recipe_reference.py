"""The generated recipe reference (distill/recipe_doc.py, docs/recipe-reference.md) and the
resolved recipe (distill.config.resolved_recipe_yaml)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
import yaml

from distill.recipe.keys import all_fields
from distill.recipe.reference import COMMAND, read_comments, reference_markdown
from distill.recipe.schema import Recipe, load_recipe, resolved_recipe_yaml
from distill.recipe_doc import main

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "docs" / "recipe-reference.md"
RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))


def row(text: str, key: str) -> list[str]:
    """The cells (key, type, default, meaning) of ``key``'s table row."""
    (line,) = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    return [c.strip() for c in line.strip("|").split(" | ")]


# The reference ---------------------------------------------------------------------------------


def test_committed_reference_is_current() -> None:
    committed, generated = REFERENCE.read_text(), reference_markdown()
    diff = "\n".join(
        list(difflib.unified_diff(committed.splitlines(), generated.splitlines(), "committed", "generated", n=1))[:40]
    )
    assert committed == generated, f"docs/recipe-reference.md is out of date; regenerate it: {COMMAND}\n{diff}"


def test_every_leaf_field_has_a_row() -> None:
    text = reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    documented = [line.split(" | ")[0].removeprefix("| `").removesuffix("`") for line in rows]
    assert sorted(documented) == all_fields()  # each once, nothing else


def test_sections_in_schema_order() -> None:
    headings = [line.removeprefix("## ").strip("`") for line in reference_markdown().splitlines() if line[:3] == "## "]
    assert headings == [
        "run",
        "data",
        "data.synthetic",
        "data.augment",
        "teacher",
        "teacher.train",
        "teacher.output_cache",
        "student",
        "distillation",
        "train",
        "eval",
    ]


def test_rows_carry_type_bounds_default_and_comment() -> None:
    text = reference_markdown()
    assert row(text, "data.max_train_samples") == [
        "`data.max_train_samples`",
        "`int \\| null`, >= 1",
        "`null`",
        "a seeded stratified subset, for quick runs",
    ]
    assert row(text, "run.resume")[1:3] == ['`"auto" \\| "never"`', '`"auto"`']
    assert row(text, "data.augment.hflip")[1] == "`float`, in [0.0, 1.0]"
    assert row(text, "distillation.alpha")[1] == "`float`, in [0.0, 1.0]"
    assert row(text, "train.momentum")[1] == "`float`, in [0.0, 1.0)"
    assert row(text, "data.augment.ratio")[1:3] == ["`[float, float]`", "`[0.75, 1.3333333333333333]`"]
    assert row(text, "teacher.checkpoint")[1:3] == ["`path \\| null`", "`null`"]
    assert row(text, "teacher.model_args")[1:3] == ["`mapping`", "`{}`"]
    # A comment block above the field, joined; '<' escaped so GitHub does not drop '<run>'.
    assert row(text, "data.seed")[3].startswith("The data stream's seed (order, augmentation, mixup/cutmix)")
    assert row(text, "data.seed")[3].endswith("teacher.output_cache can share them.")
    assert "copy it to \\<run>/teacher/" in row(text, "run.teacher_only")[3]


def test_optional_teacher_train_documents_its_own_defaults() -> None:
    text = reference_markdown()
    # TeacherTrainConfig's defaults, not the student's OptimConfig ones; comments it does not
    # restate come from OptimConfig; its own docstring and the teacher.train field's comment.
    assert row(text, "teacher.train.epochs")[2] == "`30`"
    assert row(text, "train.epochs")[2] == "`300`"
    assert row(text, "teacher.train.batch_size")[2:] == ["`256`", "GLOBAL batch: all processes x accumulation steps"]
    assert row(text, "teacher.train.seed")[3].startswith("Fixed apart from run.seed")
    section = text.split("## `teacher.train`")[1].split("| Key |")[0]
    assert "How the pipeline trains the teacher when no checkpoint exists" in section
    assert "`teacher.train`: train the teacher when no checkpoint is given" in section
    assert "Absent by default (`teacher.train: null`)" in section


def test_comment_reader_takes_the_block_above_and_the_line_after() -> None:
    source = '''
class A:
    """Doc one.

    Second paragraph,
    wrapped.
    """

    # not this one: a blank line follows

    # Above, line one;
    # line two.
    x: int = 1  # after
    y: int = (
        2
    )  # after a statement on several lines
    z: int = 3
    w = 4  # not a field
'''
    comments, docstrings = read_comments(source)
    assert comments == {
        "A": {"x": "Above, line one; line two. after", "y": "after a statement on several lines", "z": ""}
    }
    assert docstrings == {"A": "Doc one.\n\nSecond paragraph, wrapped."}


def test_command_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == reference_markdown()
    assert reference_markdown().splitlines()[2].startswith("Generated from the schema in [`distill/recipe/schema.py`]")
    assert COMMAND in reference_markdown()


# The resolved recipe ---------------------------------------------------------------------------


def round_trip(recipe: Recipe, tmp_path: Path) -> Recipe:
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_recipe_yaml(recipe))
    return load_recipe(path)


@pytest.mark.parametrize("recipe_path", [None, *RECIPES], ids=lambda p: p.name if p else "defaults")
def test_resolved_recipe_reads_back_equal(recipe_path: Path | None, tmp_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    assert round_trip(recipe, tmp_path) == recipe


def test_resolved_recipe_round_trips_awkward_values(tmp_path: Path) -> None:
    # A numeric name stays a string, tuples and paths come back as tuples and paths, 3e-4 (a
    # string to PyYAML) is a float, and a free-form dict keeps its nesting.
    recipe = load_recipe(
        None,
        [
            "run.name=123",
            "run.output_dir=/tmp/some where/runs",
            "train.lr=3e-4",
            "teacher.mean=[0.5, 0.5, 0.5]",
            "teacher.model_args={stem: {width: 8}, depths: [1, 2]}",
            "data.augment.auto_augment=null",
            "teacher.train.epochs=2",
        ],
    )
    back = round_trip(recipe, tmp_path)
    assert back == recipe
    assert back.run.name == "123" and back.run.output_dir == Path("/tmp/some where/runs")
    assert back.teacher.mean == (0.5, 0.5, 0.5) and back.data.augment.ratio == (0.75, 4.0 / 3.0)


def test_resolved_recipe_fills_every_default(tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("teacher:\n  train:\n    epochs: 5\n")
    text = resolved_recipe_yaml(load_recipe(recipe_file))
    tree = yaml.safe_load(text)
    assert list(tree) == ["run", "data", "teacher", "student", "distillation", "train", "eval"]
    assert tree["data"]["max_train_samples"] is None
    assert tree["teacher"]["train"] == {**tree["teacher"]["train"], "epochs": 5, "batch_size": 256, "seed": 0}
    assert sorted(tree["teacher"]["train"]) == sorted(
        f.split(".")[-1] for f in all_fields() if f.startswith("teacher.train.")
    )
    assert "  scale: [0.08, 1.0]\n" in text  # short lists on one line, as recipes write them
    # Without teacher.train the section is there, as null.
    assert yaml.safe_load(resolved_recipe_yaml(load_recipe(None)))["teacher"]["train"] is None


def test_resolved_recipe_is_pure() -> None:
    recipe = load_recipe(None, ["train.epochs=3"])
    before = recipe.model_dump()
    assert resolved_recipe_yaml(recipe) == resolved_recipe_yaml(recipe)
    assert recipe.model_dump() == before
    assert yaml.safe_dump([1, 2]) == "- 1\n- 2\n"  # PyYAML's own SafeDumper is left alone


def test_train_print_recipe_prints_the_resolved_recipe_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.train import main

    out = tmp_path / "runs"
    recipe = "recipes/quickstart.yaml"
    assert main([recipe, "--print-recipe", "train.epochs=3", f"run.output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    resolved = load_recipe(tmp_path / "resolved.yaml")
    assert resolved == load_recipe(recipe, ["train.epochs=3", f"run.output_dir={out}"])
    assert "  max_train_samples: null\n" in printed and "  repeated_aug: 1\n" in printed
    assert not out.exists()
