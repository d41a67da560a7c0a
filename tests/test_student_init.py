"""student.init: what it accepts, the position-embedding resampling, the distillation token in
both directions, the heads, and the refusals (distill/models/student_init.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from distill.errors import RecipeError
from distill.models.student import build_student
from distill.models.student_init import check_init, init_student, initialise, resolve_init
from distill.recipe.schema import StudentConfig, load_recipe, recipe_to_dict

TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path=0.0)


def student(img_size: object = 16, classes: int = 4, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(StudentConfig(img_size=img_size, **{**TINY, **kw}), classes)


def saved(tmp_path: Path, model: torch.nn.Module, name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("img_size", [32, (16, 32)])
def test_position_embeddings_are_resampled_as_timm_does_with_two_prefix_rows(tmp_path: Path, img_size: object) -> None:
    source = student(16)  # a 4 x 4 grid
    target = student(img_size)  # 8 x 8, or 4 x 8 (non-square)
    report = init_student(target, resolve_init(saved(tmp_path, source)))
    grid = list(target.patch_embed.grid_size)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=grid, old_size=[4, 4], num_prefix_tokens=2)
    assert torch.equal(target.pos_embed.detach(), expected)
    assert torch.equal(target.pos_embed[:, :2], source.pos_embed[:, :2])  # cls and dist rows as they were
    assert report.resampled == (f"pos_embed 4x4 -> {grid[0]}x{grid[1]} (assumed square: file records no input size)",)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    x = torch.randn(2, 3, *target.patch_embed.img_size)
    assert target.eval()(x).shape == (2, 4)


def test_reset_heads_are_zero_and_auto_keeps_matching_heads(tmp_path: Path) -> None:
    source = student(16)
    path = saved(tmp_path, source)
    reset = student(16)
    report = init_student(reset, resolve_init(path), heads="reset")
    for head in (reset.head, reset.head_dist):
        assert not head.weight.any() and not head.bias.any()
    assert sorted(report.reset) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    kept = student(16)
    assert init_student(kept, resolve_init(path), heads="auto").reset == ()
    assert torch.equal(kept.head.weight, source.head.weight)
    other = student(16, classes=7)  # a new task: auto resets
    assert len(init_student(other, resolve_init(path), heads="auto").reset) == 4
    assert not other.head.weight.any()
    with pytest.raises(RecipeError, match="init_heads=keep, but the checkpoint's heads"):
        init_student(student(16, classes=7), resolve_init(path), heads="keep")


def test_another_architecture_is_refused_naming_the_sizes(tmp_path: Path) -> None:
    path = saved(tmp_path, student(16, embed_dim=48, depth=3))
    with pytest.raises(RecipeError) as info:
        init_student(student(16), resolve_init(path))
    assert "checkpoint vs student embed_dim 48 vs 32, depth 3 vs 2" in str(info.value)
    wide_patch = saved(tmp_path, student(16, patch_size=8), "p8.safetensors")
    with pytest.raises(RecipeError, match=r"patch_size \(8, 8\) vs \(4, 4\)"):
        init_student(student(16), resolve_init(wide_patch))


def test_bad_paths_missing_unfinished_run_and_pickled_code(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist; give a run directory"):
        resolve_init(tmp_path / "nowhere")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(load_recipe(None))))
    with pytest.raises(RecipeError, match="is a run that has not finished"):
        resolve_init(run)
    with pytest.raises(RecipeError, match="has no complete last checkpoint"):
        resolve_init(run, "last")
    pickled = tmp_path / "code.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "fn": print}, pickled)  # needs unpickling beyond weights
    with pytest.raises(RecipeError, match="weights_only=True"):
        init_student(student(16), resolve_init(pickled))


def test_a_hybrid_student_cuts_a_cnn_feature_map_into_patches() -> None:
    """student.stem=resnet18, 2 stages: a stride-4, 64-channel map; 16 px -> a 4x4 grid of
    1-cell patches, plus the class and distillation tokens."""
    from timm.layers import HybridEmbed

    model = student(16, stem="resnet18", stem_stages=2, patch_size=None)
    assert isinstance(model.patch_embed, HybridEmbed)
    assert tuple(model.patch_embed.grid_size) == (4, 4) and model.pos_embed.shape == (1, 18, 32)
    assert model.patch_embed.proj.in_channels == 64
    assert model.pretrained_cfg["input_size"] == (3, 16, 16)
    model.set_distilled_training(True)
    cls, dist = model.train()(torch.randn(2, 3, 16, 16))
    assert cls.shape == dist.shape == (2, 4)
    with pytest.raises(RecipeError, match=r"student.stem 'resnet1' is not a timm model; did you mean"):
        student(16, stem="resnet1", patch_size=None)


# The distillation token, both ways ------------------------------------------------------------

DEIT_TI = dict(model="deit_tiny_distilled_patch16_224", drop_path=0.0)  # 192 wide, 12 deep, 14x14
# recipes/quickstart_finetune.yaml: DeiT-Ti's width and depth, 4 px patches, 16 px -> 32 px
QUICKSTART = dict(model="deit_tiny_distilled_patch16_224", patch_size=4, drop_path=0.0)


def sized(cfg: dict, img_size: object, token: bool, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    return build_student(StudentConfig(img_size=img_size, **cfg), classes, token)


@pytest.mark.parametrize(("cfg", "source_size", "student_size"), [(DEIT_TI, None, None), (QUICKSTART, 16, 32)])
def test_a_distilled_source_initialises_a_plain_student(
    tmp_path: Path, cfg: dict, source_size: object, student_size: object
) -> None:
    source = sized(cfg, source_size, token=True)
    path = saved(tmp_path, source)
    check_init(StudentConfig(img_size=student_size, init=path, **cfg), 10, token=False)  # on the meta device
    plain = sized(cfg, student_size, token=False)
    report = init_student(plain, resolve_init(path))
    assert report.dropped == ("dist_token", "pos_embed row 1", "head_dist") and report.added == ()
    assert torch.equal(plain.cls_token, source.cls_token)
    assert torch.equal(plain.head.weight, source.head.weight)
    if source_size is None:  # same grid: the patch rows as they were, the distillation row gone
        assert report.resampled == ()
        assert torch.equal(plain.pos_embed[:, 1:], source.pos_embed[:, 2:])
    else:
        assert report.resampled == ("pos_embed 4x4 -> 8x8 (assumed square: file records no input size)",)
        expected = resample_abs_pos_embed(
            source.pos_embed[:, [0, *range(2, 18)]].detach(), new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1
        )
        assert torch.equal(plain.pos_embed.detach(), expected)
    assert "dropped the source's distillation token, its position row and head" in report.words()


@pytest.mark.parametrize(("cfg", "source_size", "student_size"), [(DEIT_TI, None, None), (QUICKSTART, 16, 32)])
def test_a_plain_source_initialises_a_distilled_student(
    tmp_path: Path, cfg: dict, source_size: object, student_size: object
) -> None:
    source = sized(cfg, source_size, token=False)
    path = saved(tmp_path, source)
    check_init(StudentConfig(img_size=student_size, init=path, **cfg), 10, token=True)
    distilled = sized(cfg, student_size, token=True)
    report = init_student(distilled, resolve_init(path))
    assert report.added == ("dist_token", "pos_embed row 1", "head_dist") and report.dropped == ()
    assert torch.equal(distilled.dist_token, source.cls_token) and torch.equal(distilled.cls_token, source.cls_token)
    assert torch.equal(distilled.head_dist.weight, source.head.weight)
    assert torch.equal(distilled.pos_embed[:, 1], source.pos_embed[:, 0])
    assert len(report.resampled) == (0 if source_size is None else 1)


def test_initialise_returns_where_and_what_in_words(tmp_path: Path) -> None:
    path = saved(tmp_path, student(16))
    init = initialise(student(32), StudentConfig(img_size=32, init=path, **TINY))
    assert init is not None and init.source.what == "file"
    assert init.line() == (
        f"student: initialised from {path} (file): position embeddings resampled 4x4 -> 8x8 (assumed square: "
        "file records no input size) (bicubic)"
    )
    assert init.describe()["converted"] == {
        "added": [],
        "dropped": [],
        "resampled": ["pos_embed 4x4 -> 8x8 (assumed square: file records no input size)"],
        "reset": [],
    }
    assert initialise(student(16), StudentConfig(**TINY)) is None


# Grids, not shapes ------------------------------------------------------------------------------


def fake_run(tmp_path: Path, model: torch.nn.Module, img_size: list[int]) -> Path:
    """A finished run directory holding ``model`` as its last checkpoint."""
    run = tmp_path / "run"
    folder = run / "checkpoints" / "step_00000008"
    folder.mkdir(parents=True)
    tree = recipe_to_dict(load_recipe(None))
    tree["student"].update(img_size=img_size, **{k: v for k, v in TINY.items()})
    (run / "recipe.yaml").write_text(yaml.safe_dump(tree))
    (run / "summary.json").write_text(json.dumps({"final": {"val/top1_fused": 0.5}}))
    (folder / "progress.json").write_text(json.dumps({"epoch": 1, "global_step": 8}))
    saved(folder, model, "model.safetensors")
    return run


def fake_export(tmp_path: Path, model: torch.nn.Module, img_size: list[int]) -> Path:
    """An export folder that records the input size but not the patch size (a recipe that left
    student.patch_size to the registry)."""
    folder = tmp_path / "export"
    folder.mkdir()
    config = {"architecture": "deit_tiny_distilled_patch16_224", "num_classes": 4, "model_args": {}}
    config["pretrained_cfg"] = {"input_size": [3, *img_size]}
    (folder / "config.json").write_text(json.dumps(config))
    saved(folder, model, "model.safetensors")
    return folder


@pytest.mark.parametrize(("source_size", "student_size"), [((8, 32), (16, 16)), ((16, 32), (32, 16))])
@pytest.mark.parametrize("kind", ["run", "checkpoint", "export"])
def test_a_non_square_source_is_resampled_from_its_recorded_grid(
    tmp_path: Path, kind: str, source_size: tuple[int, int], student_size: tuple[int, int]
) -> None:
    """2x8 -> 4x4 and 4x8 -> 8x4 hold as many rows: only the grids tell them apart."""
    source = student(source_size)
    if kind == "export":
        path = fake_export(tmp_path, source, list(source_size))
    else:
        run = fake_run(tmp_path, source, list(source_size))
        path = run if kind == "run" else run / "checkpoints" / "step_00000008"
    target = student(student_size)
    report = init_student(target, resolve_init(path))
    old, new = [s // 4 for s in source_size], [s // 4 for s in student_size]
    assert report.resampled == (f"pos_embed {old[0]}x{old[1]} -> {new[0]}x{new[1]}",)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=new, old_size=old, num_prefix_tokens=2)
    assert torch.equal(target.pos_embed.detach(), expected)


def test_a_bare_file_is_assumed_square_and_a_non_square_one_refused(tmp_path: Path) -> None:
    square = init_student(student((16, 16)), resolve_init(saved(tmp_path, student((8, 32)))))
    assert square.resampled == ()  # 16 rows read as 4x4: nothing in the file says otherwise...
    words = init_student(student(32), resolve_init(saved(tmp_path, student((8, 32))))).words()
    assert "(assumed square: file records no input size)" in words  # ...and the line says so
    with pytest.raises(RecipeError, match=r"records no input size and its 32 position rows are not a square grid"):
        init_student(student((32, 16)), resolve_init(saved(tmp_path, student((16, 32)), "4x8.safetensors")))


# Parameters the student lacks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (dict(init_values=1e-5), "blocks.0.ls1.gamma"),  # layer scale (CaiT, DeiT III)
        (dict(qk_norm=True), "blocks.0.attn.k_norm.bias"),
        (dict(pre_norm=True), "norm_pre.bias"),
        (dict(reg_tokens=4), "reg_token"),
    ],
)
def test_a_source_with_parameters_the_student_lacks_is_refused(tmp_path: Path, extra: dict, named: str) -> None:
    import timm

    other = timm.create_model(
        "vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **extra
    )
    path = saved(tmp_path, other)
    with pytest.raises(RecipeError, match="has parameters the student lacks") as info:
        init_student(student(16), resolve_init(path))
    assert named in str(info.value)
