"""student.init: what it accepts, the position-embedding resampling, the heads, and the refusals
(distill/student_init.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from distill.errors import RecipeError
from distill.models.student import build_student
from distill.models.student_init import init_student, resolve_init
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
    assert report["resampled"] == [f"pos_embed 4x4 -> {grid[0]}x{grid[1]}"]
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
    assert sorted(report["reset"]) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    kept = student(16)
    assert init_student(kept, resolve_init(path), heads="auto")["reset"] == []
    assert torch.equal(kept.head.weight, source.head.weight)
    other = student(16, classes=7)  # a new task: auto resets
    assert len(init_student(other, resolve_init(path), heads="auto")["reset"]) == 4
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
