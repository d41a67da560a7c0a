"""Students, teacher checkpoints, the frozen teacher and the teacher accuracy floor (distill/models.py)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import timm
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.deit import VisionTransformerDistilled
from torch import nn

from distill.errors import RecipeError, TeacherError
from distill.models.spec import InputSpec
from distill.models.student import (
    REGISTRY_PROVENANCE_KEYS,
    build_student,
    file_sha256,
    student_heads,
    student_model_args,
)
from distill.models.teacher import ConvnetTeacher, FrozenTeacher, load_teacher, teacher_normalisation
from distill.recipe.schema import StudentConfig, TeacherConfig, load_recipe
from distill.training.teacher_stage import _folder_normalisation, check_teacher

NUM_CLASSES = 4
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
HALF = (0.5, 0.5, 0.5)


def tiny_student_cfg(**overrides: object) -> StudentConfig:
    return StudentConfig(**{**TINY, "drop_path": 0.0, **overrides})


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return build_student(tiny_student_cfg(), NUM_CLASSES)


# Student --------------------------------------------------------------------------------------


def test_build_student_is_a_resized_distilled_vit(student: nn.Module) -> None:
    assert isinstance(student, VisionTransformerDistilled)
    # 16x16 image / 4x4 patches = 16 patch tokens, plus the cls and distillation tokens
    assert student.pos_embed.shape == (1, 16 + 2, 32)
    assert student.num_prefix_tokens == 2
    assert len(student.blocks) == 2
    assert student.head.out_features == NUM_CLASSES
    assert student.head_dist.out_features == NUM_CLASSES
    assert student.num_classes == NUM_CLASSES


def test_build_student_pretrained_cfg_is_ours(student: nn.Module) -> None:
    cfg = student.pretrained_cfg
    assert cfg["input_size"] == (3, 16, 16)
    for key in ("tag", "hf_hub_id", "license"):
        assert key not in cfg
    assert not set(REGISTRY_PROVENANCE_KEYS) & set(cfg)
    # the preprocessing stays
    assert cfg["mean"] == IMAGENET_DEFAULT_MEAN
    assert cfg["std"] == IMAGENET_DEFAULT_STD
    assert cfg["interpolation"] == "bicubic"


def test_student_model_args_rebuild_the_student(student: nn.Module) -> None:
    cfg = tiny_student_cfg()
    args = student_model_args(cfg, NUM_CLASSES)
    assert args == {"num_classes": NUM_CLASSES, **TINY}
    rebuilt = timm.create_model(cfg.model, **args)
    ours = {k: v.shape for k, v in student.state_dict().items()}
    theirs = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert ours == theirs


def test_student_model_args_leave_out_unset_sizes() -> None:
    assert student_model_args(StudentConfig(), 7) == {"num_classes": 7}
    assert student_model_args(StudentConfig(mlp_ratio=2.0), 3) == {"num_classes": 3, "mlp_ratio": 2.0}


def test_build_student_refuses_a_plain_vit() -> None:
    with pytest.raises(RecipeError, match=r"'vit_tiny_patch16_224' is a VisionTransformer, not a distilled ViT"):
        build_student(StudentConfig(model="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2), 3)


def test_build_student_suggests_the_right_name_for_a_typo() -> None:
    with pytest.raises(RecipeError) as info:
        build_student(StudentConfig(model="deit_tiny_distiled_patch16_224"), 3)
    msg = str(info.value)
    assert "'deit_tiny_distiled_patch16_224' is not a timm model" in msg
    assert "did you mean deit_tiny_distilled_patch16_224" in msg


def test_build_student_unknown_name_without_close_match_has_no_hint() -> None:
    with pytest.raises(RecipeError, match=r"is not a timm model$"):
        build_student(StudentConfig(model="qqqqqqqqqqqqqqqqqqqqqqqq"), 3)


def test_student_config_refuses_indivisible_img_size() -> None:
    with pytest.raises(ValidationError) as info:
        StudentConfig(img_size=18, patch_size=4)
    msg = str(info.value)
    assert "img_size 18" in msg
    assert "patch_size 4" in msg


def test_recipe_refuses_indivisible_img_size_as_recipe_error() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, ["student.img_size=18", "student.patch_size=4"])
    msg = str(info.value)
    assert "'student'" in msg
    assert "student.img_size 18 is not divisible by student.patch_size 4" in msg


def test_build_student_refuses_indivisible_img_size_with_registry_patch() -> None:
    # patch_size unset: the registry's 16 applies, which the config validator cannot see
    with pytest.raises(RecipeError) as info:
        build_student(StudentConfig(img_size=18, embed_dim=32, depth=1, num_heads=2), 3)
    msg = str(info.value)
    assert "(18, 18) is not divisible by its patch size (16, 16)" in msg
    assert "student.img_size" in msg
    assert "student.patch_size" in msg


def test_build_student_refuses_indivisible_img_size_past_validation() -> None:
    cfg = StudentConfig.model_construct(**{**StudentConfig().model_dump(), **TINY, "img_size": 18})
    with pytest.raises(RecipeError, match=r"\(18, 18\) is not divisible by its patch size \(4, 4\)"):
        build_student(cfg, 3)


@pytest.mark.parametrize(
    ("stem", "stages", "params"),
    [("resnet18", 2, 15), ("mobilenetv3_small_100", 2, 13), ("efficientnet_b0", 3, 65)],
)
def test_every_parameter_of_a_hybrid_stem_trains(stem: str, stages: int, params: int) -> None:
    """timm runs every block of an EfficientNet/MobileNet feature model and returns the requested
    stage: the stem is cut after it (mobilenetv3_small_100 at 2 stages kept 125 of 138 parameters
    that got no gradient, and DDP stopped on them)."""
    torch.manual_seed(0)
    model = build_student(tiny_student_cfg(img_size=32, patch_size=1, stem=stem, stem_stages=stages), NUM_CLASSES)
    model.set_distilled_training(True)
    cls, dist = model.train()(torch.randn(2, 3, 32, 32))
    (cls.sum() + dist.sum()).backward()
    backbone = dict(model.patch_embed.backbone.named_parameters())
    assert len(backbone) == params
    assert [n for n, p in backbone.items() if p.grad is None] == []


def test_student_heads_average_is_the_eval_output(student: nn.Module) -> None:
    student.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls_logits, dist_logits = student_heads(student, x)
        out = student(x)
    assert cls_logits.shape == dist_logits.shape == (3, NUM_CLASSES)
    assert not torch.equal(cls_logits, dist_logits)
    assert torch.equal((cls_logits + dist_logits) / 2, out)


def test_student_heads_equal_distilled_training_output() -> None:
    torch.manual_seed(0)
    model = build_student(tiny_student_cfg(), NUM_CLASSES)
    model.train()
    model.set_distilled_training(True)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
        heads = student_heads(model, x)
    assert isinstance(out, tuple)
    assert len(out) == 2
    assert torch.equal(out[0], heads[0])
    assert torch.equal(out[1], heads[1])


# Teacher checkpoints ---------------------------------------------------------------------------


def make_resnet(arch: str = "resnet10t", num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes).eval()
    # non-trivial BatchNorm statistics, so loading them is observable
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    model = make_resnet()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_load_teacher_from_safetensors(saved_teacher: tuple[nn.Module, Path], images: torch.Tensor) -> None:
    model, path = saved_teacher
    loaded, arch, weights = load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)
    assert arch == "resnet10t"
    assert weights == path
    assert same_outputs(loaded, model, images)


def test_load_teacher_from_deit_style_torch_file(
    saved_teacher: tuple[nn.Module, Path], images: torch.Tensor, tmp_path: Path
) -> None:
    model, _ = saved_teacher
    path = tmp_path / "checkpoint.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 299, "args": {"lr": 5e-4}}, path)
    loaded, arch, weights = load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)
    assert (arch, weights) == ("resnet10t", path)
    assert same_outputs(loaded, model, images)


def test_load_teacher_explicit_path_overrides_checkpoint(
    saved_teacher: tuple[nn.Module, Path], images: torch.Tensor
) -> None:
    model, path = saved_teacher
    cfg = TeacherConfig(model="resnet10t", checkpoint=Path("/nonexistent/teacher.safetensors"))
    loaded, _, weights = load_teacher(cfg, NUM_CLASSES, path=path)
    assert weights == path
    assert same_outputs(loaded, model, images)


def test_load_teacher_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "no_such_teacher.safetensors"
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)
    msg = str(info.value)
    assert str(path) in msg
    assert "does not exist" in msg


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "garbage.bin"])
def test_load_teacher_random_bytes(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)
    msg = str(info.value)
    assert msg.startswith(f"cannot read teacher checkpoint {path}")
    assert "weights_only=True" in msg


def test_load_teacher_refuses_pickled_code(tmp_path: Path) -> None:
    # weights_only: a checkpoint holding arbitrary objects is refused, not executed
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": nn.Linear(1, 1)}, path)
    with pytest.raises(TeacherError, match=r"cannot read teacher checkpoint"):
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)


def test_load_teacher_refuses_non_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TeacherError, match=r"does not hold a state dict of tensors"):
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)


@pytest.fixture(scope="module")
def three_class_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher3") / "teacher3.safetensors"
    save_file(make_resnet(num_classes=3).state_dict(), str(path))
    return path


def test_load_teacher_wrong_class_count_is_a_teacher_error(three_class_teacher: Path) -> None:
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=three_class_teacher), NUM_CLASSES)
    assert str(three_class_teacher) in str(info.value)
    assert "fc.weight" in str(info.value)


def test_load_teacher_wrong_class_count_names_both_counts(three_class_teacher: Path) -> None:
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=three_class_teacher), NUM_CLASSES)
    msg = str(info.value)
    assert "3-class" in msg
    assert "4 classes" in msg


def test_load_teacher_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=NUM_CLASSES).state_dict(), str(path))
    with pytest.raises(TeacherError) as info:
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=path), NUM_CLASSES)
    msg = str(info.value)
    assert f"teacher checkpoint {path} does not fit teacher.model 'resnet10t'" in msg
    assert "missing" in msg
    assert "unexpected" in msg


def test_load_teacher_unknown_architecture(saved_teacher: tuple[nn.Module, Path]) -> None:
    _, path = saved_teacher
    with pytest.raises(RecipeError, match=r"teacher\.model 'resnet10tt' is not a timm model; did you mean"):
        load_teacher(TeacherConfig(model="resnet10tt", checkpoint=path), NUM_CLASSES)


@pytest.fixture(scope="module")
def hub_teacher(saved_teacher: tuple[nn.Module, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _ = saved_teacher
    folder = tmp_path_factory.mktemp("hub") / "resnet10t-hub"
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def test_load_teacher_from_timm_hub_folder_takes_its_architecture(
    saved_teacher: tuple[nn.Module, Path], hub_teacher: Path, images: torch.Tensor
) -> None:
    model, _ = saved_teacher
    assert json.loads((hub_teacher / "config.json").read_text())["architecture"] == "resnet10t"
    loaded, arch, weights = load_teacher(TeacherConfig(model="resnet18", checkpoint=hub_teacher), NUM_CLASSES)
    assert arch == "resnet10t"
    assert weights == hub_teacher / "model.safetensors"
    assert same_outputs(loaded, model, images)


def test_load_teacher_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TeacherError, match=r"lacks config\.json and model\.safetensors"):
        load_teacher(TeacherConfig(model="resnet10t", checkpoint=tmp_path), NUM_CLASSES)


def test_folder_normalisation_reads_the_hub_config(hub_teacher: Path, tmp_path: Path) -> None:
    norm = _folder_normalisation(hub_teacher)
    assert norm is not None
    assert tuple(norm["mean"]) == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert tuple(norm["std"]) == pytest.approx(IMAGENET_DEFAULT_STD)
    assert _folder_normalisation(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet10t", "pretrained_cfg": {}}))
    assert _folder_normalisation(tmp_path) is None


def test_teacher_normalisation_precedence(saved_teacher: tuple[nn.Module, Path]) -> None:
    model, _ = saved_teacher
    fallback = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    explicit = TeacherConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert teacher_normalisation(explicit, model, fallback) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert teacher_normalisation(TeacherConfig(), model, fallback) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    mean, std = teacher_normalisation(TeacherConfig(), model)
    assert mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert std == pytest.approx(IMAGENET_DEFAULT_STD)


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = os.urandom((5 << 19) + 123)  # over two 1 MiB read chunks
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


# FrozenTeacher ---------------------------------------------------------------------------------


class Echo(nn.Module):
    """Returns its input flattened (float64), with one parameter and a BatchNorm to watch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).flatten(1).double()


def col(v: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))


def test_frozen_teacher_renormalises_to_teacher_statistics(x: torch.Tensor) -> None:
    teacher = FrozenTeacher(Echo(), HALF, HALF, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert teacher.renormalise
    out = teacher(x)
    expected = ((x * col(HALF) + col(HALF) - col(IMAGENET_DEFAULT_MEAN)) / col(IMAGENET_DEFAULT_STD)).flatten(1)
    assert torch.equal(out, expected)
    # and in plain words: undo the student's normalisation, apply the teacher's
    pixels = x * 0.5 + 0.5
    mean_t, std_t = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    manual = (pixels - mean_t.view(1, 3, 1, 1)) / std_t.view(1, 3, 1, 1)
    torch.testing.assert_close(out, manual.flatten(1), rtol=1e-6, atol=1e-6)


def test_frozen_teacher_passes_input_through_when_statistics_match(x: torch.Tensor) -> None:
    stats = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    teacher = FrozenTeacher(Echo(), *stats, *stats)
    assert not teacher.renormalise
    assert torch.equal(teacher(x), x.flatten(1))
    # lists (from a JSON config) compare equal to tuples
    teacher = FrozenTeacher(Echo(), HALF, HALF, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # type: ignore[arg-type]
    assert not teacher.renormalise


def test_frozen_teacher_is_frozen_and_stays_in_eval(x: torch.Tensor) -> None:
    inner = Echo().train()
    teacher = FrozenTeacher(inner, HALF, HALF, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    params = list(teacher.parameters())
    assert params
    assert all(not p.requires_grad for p in params)
    # the wrapped model is in eval mode from the start (the wrapper's own flag does not matter:
    # its forward never reads it)
    assert not any(m.training for m in teacher.model.modules())
    assert teacher.train() is teacher
    assert not teacher.training
    assert not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())
    # BatchNorm statistics never move, no graph is built
    before = inner.bn.running_mean.clone()
    out = teacher(x)
    assert torch.equal(inner.bn.running_mean, before)
    assert not out.requires_grad


def test_frozen_teacher_outputs_float32(x: torch.Tensor) -> None:
    teacher = FrozenTeacher(Echo(), HALF, HALF, HALF, HALF)
    assert Echo()(x).dtype == torch.float64
    assert teacher(x).dtype == torch.float32


def test_frozen_teacher_normalisation_buffers_are_not_saved() -> None:
    teacher = FrozenTeacher(Echo(), HALF, HALF, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert not any(k.startswith(("s_", "t_")) for k in teacher.state_dict())


# check_teacher ---------------------------------------------------------------------------------


def make_teacher() -> ConvnetTeacher:
    module = FrozenTeacher(nn.Identity(), HALF, HALF, HALF, HALF)
    teacher = ConvnetTeacher(module, InputSpec((16, 16), HALF, HALF, 1.0, "bicubic"), "resnet10t", None, False)
    teacher.weights = Path("/ckpt/teacher.safetensors")  # named in messages; never read here
    return teacher


def test_check_teacher_refuses_near_chance() -> None:
    teacher = make_teacher()
    # 4 classes: floor 1.5 / 4 = 37.5%
    with pytest.raises(TeacherError) as info:
        check_teacher(teacher, 0.30, 4, None)
    msg = str(info.value)
    assert "chance is 25.0%" in msg
    assert "30.0% top-1" in msg
    assert "37.5% floor" in msg
    assert "resnet10t" in msg
    assert "/ckpt/teacher.safetensors" in msg
    assert "teacher.min_top1" in msg


@pytest.mark.parametrize("top1", [0.375, 0.5, 1.0])
def test_check_teacher_passes_above_floor_and_records_top1(top1: float) -> None:
    teacher = make_teacher()
    assert math.isnan(teacher.val_top1)  # not measured yet: no made-up accuracy
    check_teacher(teacher, top1, 4, None)
    assert teacher.val_top1 == top1


def test_check_teacher_explicit_min_top1() -> None:
    teacher = make_teacher()
    with pytest.raises(TeacherError, match=r"below the 90\.0% floor"):
        check_teacher(teacher, 0.8, 4, 0.9)
    check_teacher(teacher, 0.9, 4, 0.9)
    assert teacher.val_top1 == 0.9
    # an explicit floor of 0 accepts even a useless teacher
    check_teacher(teacher, 0.0, 4, 0.0)
    assert teacher.val_top1 == 0.0
    # an explicit floor below the default replaces it
    check_teacher(teacher, 0.3, 4, 0.2)
    assert teacher.val_top1 == 0.3


def test_check_teacher_floor_scales_with_classes() -> None:
    teacher = make_teacher()
    check_teacher(teacher, 0.016, 100, None)  # floor 1.5%
    with pytest.raises(TeacherError, match=r"chance is 1\.0%"):
        check_teacher(teacher, 0.014, 100, None)


def test_a_pipeline_trained_teacher_below_the_floor_asks_for_more_training_and_leaves_the_cache(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "teachers" / "resnet10t-0123"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "teacher.json").write_text("{}")
    module = FrozenTeacher(nn.Identity(), HALF, HALF, HALF, HALF)
    teacher = ConvnetTeacher(module, InputSpec((16, 16), HALF, HALF, 1.0, "bicubic"), "resnet10t", None, True)
    teacher.weights = folder / "model.safetensors"
    with pytest.raises(TeacherError) as info:
        check_teacher(teacher, 0.30, 4, None)
    msg = str(info.value)
    assert "the teacher the pipeline trained (resnet10t) scores 30.0% top-1" in msg
    assert "needs more training. Raise teacher.train.epochs" in msg and "Use the right checkpoint" not in msg
    assert not folder.exists()  # the next run trains it again
