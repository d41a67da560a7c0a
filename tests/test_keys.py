"""The recipe-field effect table (distill/recipe/keys.py): complete, nested, and read correctly."""

from __future__ import annotations

import itertools
import json
from typing import Any

from distill.recipe.keys import (
    IN_OUTPUTS,
    IN_SPLIT,
    IN_TEACHER,
    NO_EFFECT,
    RESULT,
    RESULT_ONLY,
    SPLIT,
    TABLE,
    TEACHER,
    TEACHER_OUTPUTS,
    UNKNOWN,
    all_fields,
    changed_for_resume,
    effects,
    fields,
)
from distill.recipe.schema import PROVENANCE_KEY, Recipe, TeacherTrainConfig, load_recipe, recipe_to_dict

SPLIT_FIELDS = [
    "data.hub_config",
    "data.max_train_samples",
    "data.max_val_samples",
    "data.on_bad_image",
    "data.path",
    "data.source",
    "data.split_seed",
    "data.synthetic.image_size",
    "data.synthetic.noise",
    "data.synthetic.num_classes",
    "data.synthetic.train_per_class",
    "data.synthetic.val_per_class",
    "data.train_split",
    "data.val_fraction",
    "data.val_split",
]
# What a resumed run may change (trainer.RESUME_FREE_KEYS before this table).
NO_EFFECT_FIELDS = [
    "data.num_workers",
    "data.verify_shards",
    "run.checkpoint_every_steps",
    "run.export",
    "run.keep_checkpoints",
    "run.log_every_steps",
    "run.overwrite",
    "run.process_group_timeout_min",
    "run.progress_every_s",
    "run.resume",
    "run.trackers",
    "teacher.cache_dir",
    "teacher.output_cache.dir",
    "teacher.output_cache.verify_every",
]


def recipe(*overrides: str) -> Recipe:
    return load_recipe(None, list(overrides))


def tree(*overrides: str) -> dict[str, Any]:
    return recipe_to_dict(recipe(*overrides))


# Completeness ---------------------------------------------------------------------------------


def test_every_schema_field_is_classified_and_no_entry_is_stale() -> None:
    schema, table = set(all_fields()), set(TABLE)
    assert not schema - table, f"recipe fields missing from distill/recipe/keys.py TABLE: {sorted(schema - table)}"
    assert not table - schema, f"TABLE entries that are not recipe fields: {sorted(table - schema)}"


def test_all_fields_walks_nested_and_optional_sections() -> None:
    names = all_fields()
    assert names == sorted(set(names))
    for leaf in ("data.augment.scale", "data.synthetic.noise", "teacher.output_cache.topk", "run.seed"):
        assert leaf in names
    # teacher.train is `TeacherTrainConfig | None`: walked, inherited OptimConfig fields included.
    assert [n for n in names if n.startswith("teacher.train.")] == sorted(
        f"teacher.train.{k}" for k in TeacherTrainConfig.model_fields
    )
    assert "teacher.train.lr" in names and "teacher.train.seed" in names
    # Sections are not leaves; a free-form dict field is one.
    assert "teacher.train" not in names and "data" not in names and "data.augment" not in names
    assert "teacher.model_args" in names


def test_effects_nest() -> None:
    order = (SPLIT, TEACHER, TEACHER_OUTPUTS, RESULT)
    for path, found in TABLE.items():
        for inner, outer in itertools.pairwise(order):
            assert inner not in found or outer in found, f"{path}: {inner.value} without {outer.value}"
    assert set(TABLE.values()) == {IN_SPLIT, IN_TEACHER, IN_OUTPUTS, RESULT_ONLY, NO_EFFECT}


# Classification -------------------------------------------------------------------------------


def test_split_fields() -> None:
    assert sorted(p for p, e in TABLE.items() if SPLIT in e) == SPLIT_FIELDS


def test_the_teacher_stage_ignores_the_data_seed_and_run_seed() -> None:
    # It seeds from teacher.train.seed: hashing data.seed retrained an identical teacher.
    assert TABLE["data.seed"] == frozenset({TEACHER_OUTPUTS, RESULT})
    assert TABLE["run.seed"] == frozenset({TEACHER_OUTPUTS, RESULT})
    assert TABLE["teacher.train.seed"] == frozenset({TEACHER, TEACHER_OUTPUTS, RESULT})
    assert TABLE["data.num_workers"] == frozenset()


def test_teacher_fields_beyond_split_and_teacher_train() -> None:
    rest = sorted(
        p
        for p, e in TABLE.items()
        if TEACHER in e and SPLIT not in e and not p.startswith(("teacher.train.", "data.augment."))
    )
    assert rest == [
        "data.repeated_aug",
        "data.shard_access",
        "data.store",
        "data.stream_buffer",
        "student.img_size",
        "student.model",
        "teacher.img_size",
        "teacher.model",
        "teacher.model_args",
        "train.precision",
        "train.tf32",
    ]
    assert all(TABLE[f"teacher.train.{k}"] == IN_TEACHER for k in TeacherTrainConfig.model_fields)
    assert TABLE["data.augment.hflip"] == IN_TEACHER
    assert TABLE["data.augment.mixup"] == IN_TEACHER


def test_teacher_outputs_fields_beyond_the_teacher() -> None:
    # The batch layout fixes the rows of each step and of each epoch.
    assert TABLE["train.batch_size"] == frozenset({TEACHER_OUTPUTS, RESULT})
    assert TABLE["train.grad_accum_steps"] == frozenset({TEACHER_OUTPUTS, RESULT})
    assert sorted(p for p, e in TABLE.items() if TEACHER_OUTPUTS in e and TEACHER not in e) == [
        "data.seed",
        "eval.batch_size",
        "run.seed",
        "teacher.channels_last",
        "teacher.checkpoint",
        "teacher.combine",
        "teacher.compile",
        "teacher.ensemble",
        "teacher.inference_mode",
        "teacher.mean",
        "teacher.std",
        "train.batch_size",
        "train.grad_accum_steps",
    ]
    # The student's shape does not change its input, so not the teacher's outputs either.
    for path in ("student.depth", "student.embed_dim", "student.patch_size", "train.lr", "distillation.tau"):
        assert TABLE[path] == frozenset({RESULT}), path


def test_fields_without_effect_are_exactly_the_resume_free_keys() -> None:
    assert sorted(p for p, e in TABLE.items() if not e) == NO_EFFECT_FIELDS
    assert sorted(p for p, e in TABLE.items() if RESULT not in e) == NO_EFFECT_FIELDS


def test_effects_of_keys_that_are_not_table_fields() -> None:
    assert effects("teacher.model_args.depth") == IN_TEACHER  # inside a free-form dict
    assert effects("teacher.train") == IN_TEACHER  # a section: the union of its fields'
    assert effects("teacher.output_cache") == RESULT_ONLY
    assert effects("data") == IN_SPLIT
    assert effects("data.legacy_key") == UNKNOWN == frozenset({SPLIT, TEACHER, TEACHER_OUTPUTS, RESULT})


# fields() -------------------------------------------------------------------------------------


def test_split_fields_follow_the_sample_limit_not_the_flip() -> None:
    base = fields(recipe(), SPLIT)
    assert list(base) == SPLIT_FIELDS
    assert base["data.max_train_samples"] is None
    assert base["data.source"] == "digits"
    assert base["data.synthetic.noise"] == 25.0
    limited = fields(recipe("data.max_train_samples=100"), SPLIT)
    assert limited["data.max_train_samples"] == 100
    assert {k for k in base if base[k] != limited[k]} == {"data.max_train_samples"}
    assert fields(recipe("data.augment.hflip=0.0"), SPLIT) == base


def test_fields_are_json_values_sorted_by_path() -> None:
    got = fields(recipe("teacher.train.epochs=2", "teacher.model_args={drop_rate: 0.1}"), TEACHER)
    assert list(got) == sorted(got)
    assert json.loads(json.dumps(got)) == got
    assert got["data.augment.scale"] == [0.08, 1.0]  # a tuple in the schema
    assert got["teacher.model_args"] == {"drop_rate": 0.1}
    assert got["teacher.train.epochs"] == 2
    assert got["train.precision"] == "fp32"
    assert "data.seed" not in got and "run.seed" not in got and "data.num_workers" not in got


def test_teacher_fields_ignore_the_data_seed_outputs_do_not() -> None:
    base = recipe("teacher.train.epochs=2")
    reseeded = recipe("teacher.train.epochs=2", "data.seed=7")
    assert fields(reseeded, TEACHER) == fields(base, TEACHER)
    assert fields(reseeded, TEACHER_OUTPUTS)["data.seed"] == 7
    assert fields(base, TEACHER_OUTPUTS)["data.seed"] is None
    rebatched = fields(recipe("teacher.train.epochs=2", "train.grad_accum_steps=2"), TEACHER_OUTPUTS)
    assert rebatched["train.grad_accum_steps"] == 2
    assert fields(base, TEACHER_OUTPUTS)["train.grad_accum_steps"] == 1


def test_fields_of_an_absent_optional_section_read_none() -> None:
    got = fields(recipe(), TEACHER)
    assert got["teacher.train.lr"] is None
    assert got["teacher.train.seed"] is None
    assert fields(recipe("teacher.train.epochs=2"), TEACHER)["teacher.train.lr"] == 1e-3


# changed_for_resume() -------------------------------------------------------------------------


def test_resume_ignores_operational_keys_and_reports_result_keys() -> None:
    old = tree()
    assert changed_for_resume(old, tree()) == []
    assert changed_for_resume(old, tree("run.log_every_steps=3")) == []
    assert changed_for_resume(old, tree("train.lr=0.01")) == ["train.lr"]
    both = tree("run.log_every_steps=3", "train.lr=0.01", "data.num_workers=4", "data.seed=3")
    assert changed_for_resume(old, both) == ["data.seed", "train.lr"]


def test_resume_keys_in_one_tree_only() -> None:
    old, new = tree(), tree()
    del old["train"]["ema_decay"]  # a field this version added: it has RESULT effect
    del old["data"]["num_workers"]  # one without: ignored
    assert changed_for_resume(old, new) == ["train.ema_decay"]
    old = tree()
    old["data"]["legacy_key"] = 1  # an older version's field: assumed to matter
    assert changed_for_resume(old, tree()) == ["data.legacy_key"]
    old[PROVENANCE_KEY] = {"git": "abc"}  # written next to the recipe, not part of it
    assert changed_for_resume(old, tree()) == ["data.legacy_key"]


def test_resume_compares_free_form_dicts_and_optional_sections_whole() -> None:
    assert changed_for_resume(tree(), tree("teacher.model_args={drop_rate: 0.1}")) == ["teacher.model_args"]
    added = changed_for_resume(tree(), tree("teacher.train.epochs=2"))
    assert added == ["teacher.train", *sorted(f"teacher.train.{k}" for k in TeacherTrainConfig.model_fields)]
    # Values compare as values: an int read back where a float was written is the same.
    old = tree()
    old["train"]["warmup_epochs"] = 5  # the default is 5.0
    assert changed_for_resume(old, tree()) == []


# Settings that cannot act -----------------------------------------------------------------------


def test_a_path_the_data_source_does_not_read_is_refused() -> None:
    import pytest

    from distill.errors import RecipeError
    from distill.recipe.checks import check_settings

    for source in ("digits", "synthetic"):
        with pytest.raises(RecipeError) as info:
            check_settings(load_recipe(None, [f"data.source={source}", "data.path=/data/cifar10"]))
        assert str(info.value) == (
            f"data.path=/data/cifar10 has no effect: data.source={source} reads no path; set "
            "data.source=imagefolder (a folder of class sub-folders), hub (a dataset name) or shards (a folder "
            "distill.shard wrote), or remove data.path"
        )
    shards = load_recipe(None, ["data.source=shards", "data.path=/x", "data.hub_config=plain_text"])
    assert check_settings(shards) == [
        "data.hub_config=plain_text has no effect: data.source=shards is not a Hub dataset"
    ]  # a warning: the recipe of a Hub dataset, switched to the shards written from it
    assert (
        check_settings(load_recipe(None, ["data.source=hub", "data.path=cifar10", "data.hub_config=plain_text"])) == []
    )


def test_settings_with_no_effect_are_one_warning_line_each() -> None:
    from distill.recipe.checks import check_settings

    recipe = load_recipe(
        None,
        [
            "teacher.checkpoint=/t.safetensors",
            "teacher.train={epochs: 3}",
            "distillation.tau=3",
            "student.init_heads=reset",
            "data.synthetic.noise=0.5",
            "data.verify_shards=true",
            "train.epochs=300",
        ],
    )
    assert check_settings(recipe) == [
        "data.synthetic.noise=0.5 has no effect: data.source=digits generates no synthetic images",
        "data.verify_shards=True has no effect: data.source=digits reads no shards",
        "teacher.train has no effect: teacher.checkpoint is given: the teacher is loaded, not trained",
        "distillation.tau=3.0 has no effect: distillation.type=hard has no temperature or KL term",
        "student.init_heads=reset has no effect: student.init is not set: the student starts from random weights",
    ]
    # a value equal to the default is no setting at all: a resolved recipe.yaml warns of nothing
    assert check_settings(load_recipe(None, ["distillation.tau=1.0", "train.momentum=0.9"])) == []
    assert check_settings(load_recipe(None, ["distillation.type=soft", "distillation.tau=3"])) == []


def test_a_run_that_never_leaves_its_warm_up_is_warned_about() -> None:
    from distill.recipe.checks import check_settings

    recipe = load_recipe(None, ["train.epochs=2", "train.warmup_epochs=4"])
    assert check_settings(recipe) == [
        "train.epochs=2 is not above train.warmup_epochs=4: the learning rate rises for the whole run, ends "
        "at about 50% of its peak and never decays; raise train.epochs or lower train.warmup_epochs"
    ]
    teacher = load_recipe(None, ["teacher.train={epochs: 1, warmup_epochs: 1}"])
    assert [w.split(":")[0] for w in check_settings(teacher)] == [
        "teacher.train.epochs=1 is not above teacher.train.warmup_epochs=1"
    ]
    assert check_settings(load_recipe(None, ["train.epochs=6", "train.warmup_epochs=5"])) == []


def test_the_shipped_recipes_set_nothing_without_effect_but_deit_s_kl_norm() -> None:
    """The ImageNet recipes keep DeiT's kl_norm for their soft variants; their hard runs say so."""
    from pathlib import Path

    from distill.recipe.checks import check_settings

    for path in sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml")):
        expected = ["distillation.kl_norm=deit"] if path.name.startswith("imagenet") else []
        assert [w.split(" ")[0] for w in check_settings(load_recipe(path))] == expected, path.name


def test_keys_that_cannot_act_do_not_enter_cache_keys() -> None:
    from distill.recipe.keys import data_fields

    base = load_recipe(None, ["data.source=synthetic"])
    noisy = load_recipe(None, ["data.source=digits", "data.synthetic.noise=0.9"])
    plain = load_recipe(None, ["data.source=digits"])
    assert data_fields(noisy.data, SPLIT) == data_fields(plain.data, SPLIT)
    assert data_fields(base.data, SPLIT) != data_fields(
        load_recipe(None, ["data.source=synthetic", "data.synthetic.noise=0.9"]).data, SPLIT
    )
    loaded = load_recipe(None, ["teacher.checkpoint=/t.safetensors"])
    both = load_recipe(None, ["teacher.checkpoint=/t.safetensors", "teacher.train={epochs: 3, lr: 0.1}"])
    assert fields(both, TEACHER_OUTPUTS) == fields(loaded, TEACHER_OUTPUTS)
    assert fields(both, TEACHER_OUTPUTS)["teacher.train.lr"] is None
    adam = load_recipe(None, ["teacher.train={opt: adamw, momentum: 0.5}"])
    assert fields(adam, TEACHER)["teacher.train.momentum"] == 0.9  # the default: adamw reads none
    sgd = load_recipe(None, ["teacher.train={opt: sgd, momentum: 0.5}"])
    assert fields(sgd, TEACHER)["teacher.train.momentum"] == 0.5


def test_train_refuses_a_data_path_digits_cannot_read(capsys: Any) -> None:
    from distill.train import main

    assert main(["recipes/smoke.yaml", "data.path=/data/cifar10"]) == 2
    assert "error: data.path=/data/cifar10 has no effect: data.source=" in capsys.readouterr().err
