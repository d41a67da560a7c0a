"""Class names travel with the model: evaluation matches the data's classes to the model's outputs
by name (a subset scores correctly, an unknown class is refused), runs and exports record their
names, and a teacher folder naming the data's classes in another order is remapped, not misread
(distill/artifacts.py, distill/evaluate.py, distill/teacher.py, distill/teacher_stage.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from distill.data.sources import SplitData
from distill.errors import DataError, TeacherError
from distill.evaluate import eval_dataset
from distill.evaluate import main as evaluate_main
from distill.exports.artifacts import LoadedModel, load_artifact, match_classes, score
from distill.exports.end_of_run import export_timm
from distill.models.spec import InputSpec
from distill.models.student import build_student
from distill.models.teacher import ConvnetTeacher, match_teacher_classes
from distill.recipe.schema import load_recipe, recipe_to_dict
from distill.training.teacher_stage import obtain_teacher
from tests.helpers import SMOKE

DIGITS = [str(d) for d in range(10)]
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# The subset folder: 7/ 8/ 9/ only, solid-colour 8x8 images whose colour decides the prediction.
FOLDER = {"7": [GREEN, GREEN, RED], "8": [GREEN, GREEN, GREEN, BLUE], "9": [BLUE, BLUE, RED, RED]}


def colour_model() -> nn.Module:
    """A 10-class timm ViT whose logits are W @ mean RGB + b: no blocks, no norms, one 8x8 patch
    averaged over channels (input = pixels / 255: mean 0, std 1), so red -> 3, green -> 8,
    blue -> 9 and, from the bias, 7 is every image's runner-up, then 0, 1, 2."""
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=8,
        patch_size=8,
        embed_dim=3,
        depth=0,
        num_heads=1,
        class_token=False,
        global_pool="avg",
        final_norm=False,
        fc_norm=False,
        num_classes=10,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for c in range(3):
            model.patch_embed.proj.weight[c, c] = 1 / 64  # feature c = mean of channel c
        for c, digit in enumerate((3, 8, 9)):
            model.head.weight[digit, c] = 1.0
        model.head.bias.copy_(torch.tensor([0.05, 0.04, 0.03, 0.02, 0.01, 0.0, -0.01, 0.5, -0.02, -0.03]))
    spec = {"input_size": (3, 8, 8), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0}
    model.pretrained_cfg = {**model.pretrained_cfg, **spec}
    return model.eval()


def card(name: str) -> dict:
    """The least that export_timm's model card needs."""
    data = {"source": "imagefolder", "path": None, "train_size": 0, "val_size": 0, "val_origin": "val"}
    distillation = {"type": "none", "alpha": 0.5, "tau": 1.0, "kl_norm": "batchmean"}
    return {"name": name, "architecture": "vit_tiny_patch16_224", "distillation": distillation, "data": data}


def export(folder: Path, names: list[str]) -> Path:
    model = colour_model()
    info = {**card(folder.name), "num_classes": 10, "epochs": 0, "recipe": {}}
    return export_timm(model, folder, {"num_classes": 10}, names, info)


def image_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]]) -> Path:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (8, 8), colour).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("exports") / "colours", DIGITS)


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "789", FOLDER)


# Evaluation by name ----------------------------------------------------------------------------


def test_the_colour_model_follows_its_rule(digits_export: Path) -> None:
    loaded = load_artifact(digits_export)
    assert json.loads((digits_export / "config.json").read_text())["label_names"] == DIGITS
    assert loaded.class_names == DIGITS
    x = torch.zeros(3, 3, 8, 8)
    for i in range(3):
        x[i, i] = 1.0  # red, green, blue
    with torch.no_grad():
        top = loaded.model(x).topk(5).indices.tolist()
    assert top == [[3, 7, 0, 1, 2], [8, 7, 0, 1, 2], [9, 7, 0, 1, 2]]


def test_a_subset_of_classes_is_scored_by_name(digits_export: Path, subset: Path) -> None:
    dataset, names, what = eval_dataset(str(subset), "val", None)
    assert names == ["7", "8", "9"] and len(dataset) == 11 and "789" in what
    result = score(load_artifact(digits_export), dataset, 4, torch.device("cpu"), class_names=names)
    # top-1: 7/ none (green -> 8, red -> 3), 8/ its 3 greens, 9/ its 2 blues: 5 of 11.
    # top-5 (x, 7, 0, 1, 2): all 3 of 7/, the 3 greens of 8/, the 2 blues of 9/: 8 of 11.
    # Index order (folder 7/ as output 0) gave 0/11 and 11/11; an argmax restricted to 7, 8, 9
    # (red -> 7) would give 6/11: top-k is over all ten outputs.
    assert result["top1_fused"] == 5 / 11
    assert result["top5_fused"] == 8 / 11
    assert result["images"] == 11
    assert (result["data_classes"], result["model_classes"], result["classes_matched_by"]) == (3, 10, "name")


def test_the_evaluate_command_on_a_subset_folder(
    digits_export: Path, subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    assert evaluate_main([str(digits_export), "--data", str(subset), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["top1_fused"], result["top5_fused"], result["images"]) == (5 / 11, 8 / 11, 11)
    table = capsys.readouterr().out
    assert re.search(r"top1 fused +45\.45%", table) and re.search(r"top5 fused +72\.73%", table)
    assert "3 of the model's 10, matched by name" in table


def test_a_class_the_model_does_not_know_is_refused(
    digits_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = image_folder(tmp_path / "pets", {"7": [GREEN], "cat": [RED], "dog": [BLUE]})
    assert evaluate_main([str(digits_export), "--data", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: the data has 2 class(es) that export {digits_export} (vit_tiny_patch16_224) does not know: "
        "'cat', 'dog'; the model's classes are '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'. "
        "Class folders must be named after the model's classes (a subset of them is fine)"
    )
    assert err.count("\n") == 1  # one line, no traceback


def test_without_recorded_names_only_equal_counts_match_by_index(tmp_path: Path, subset: Path) -> None:
    nameless = export(tmp_path / "nameless", [])  # timm writes no label_names for an empty list
    assert "label_names" not in json.loads((nameless / "config.json").read_text())
    loaded = load_artifact(nameless)
    assert loaded.class_names is None
    dataset, names, _ = eval_dataset(str(subset), "val", None)
    with pytest.raises(DataError, match=r"records no class names and has 10 outputs, but the data has 3 classes "):
        score(loaded, dataset, 4, torch.device("cpu"), class_names=names)
    assert match_classes(["a", "b"], None, 2, "m") is None  # same count: index order
    assert match_classes(None, DIGITS, 10, "m") is None  # unnamed data: labels are output indices
    assert match_classes(["9", "0"], DIGITS, 10, "m").tolist() == [9, 0]


def test_a_loaded_model_with_names_scores_a_stub_dataset_by_name() -> None:
    """score() reads the names from the dataset's ClassLabel feature when none are passed."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["9", "8"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), c) for c in (BLUE, GREEN, RED)], "label": [0, 1, 0]}, features=features
    )
    model = colour_model()
    spec = InputSpec((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, "bicubic")
    result = score(LoadedModel(model, spec, "colours", class_names=DIGITS), ds, 8, torch.device("cpu"))
    assert result["top1_fused"] == 2 / 3  # blue -> 9 right, green -> 8 right, red -> 3 wrong


# Run checkpoints record their classes ----------------------------------------------------------


def fake_run(root: Path) -> Path:
    """A run directory with one checkpoint of the smoke student (4 classes), no training."""
    recipe = load_recipe(SMOKE, [f"run.output_dir={root}"])
    run = root / recipe.run.name
    ckpt = run / "checkpoints" / "step_00000008"
    ckpt.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    torch.manual_seed(0)
    save_file(build_student(recipe.student, 4, recipe.distillation.token).state_dict(), ckpt / "model.safetensors")
    (ckpt / "progress.json").write_text(json.dumps({"epoch": 1, "global_step": 8}))
    return run


def test_a_run_checkpoint_carries_its_datas_class_names(tmp_path: Path) -> None:
    run = fake_run(tmp_path)
    assert load_artifact(run).class_names == ["class_0", "class_1", "class_2", "class_3"]  # from its data
    (run / "summary.json").write_text(json.dumps({"data": {"class_names": ["d", "c", "b", "a"]}}))
    assert load_artifact(run).class_names == ["d", "c", "b", "a"]  # what the run recorded comes first


# Teachers: remap a permuted folder, refuse other classes ---------------------------------------

DATA_NAMES = ["ant", "bee", "cat", "dog"]


def teacher_folder(root: Path, names: list[str]) -> Path:
    torch.manual_seed(0)  # the same weights for every folder
    model = timm.create_model("resnet10t", num_classes=len(names)).eval()
    folder = root / "-".join(names)
    timm.models.save_for_hf(model, str(folder), model_config={"label_names": names}, safe_serialization=True)
    return folder


def teacher_for(folder: Path, names: list[str] = DATA_NAMES) -> ConvnetTeacher | None:
    recipe = load_recipe(None, [f"teacher.checkpoint={folder}", "teacher.model=resnet10t"])
    split = SplitData(train=None, val=None, class_names=names, val_origin="val")
    spec = InputSpec((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bicubic")
    return obtain_teacher(Accelerator(cpu=True), recipe, split, spec)


def test_a_teacher_naming_the_classes_in_another_order_is_remapped(tmp_path: Path) -> None:
    same = teacher_for(teacher_folder(tmp_path, DATA_NAMES))
    permuted = teacher_for(teacher_folder(tmp_path, ["cat", "ant", "dog", "bee"]))
    assert same is not None and permuted is not None
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    raw = same(x)  # the same weights; output j of the folder is its label_names[j]
    # The permuted folder names its outputs cat, ant, dog, bee: in the data's order (ant, bee,
    # cat, dog) the teacher's logits are its outputs 1, 3, 0, 2.
    assert permuted.module.class_order.tolist() == [1, 3, 0, 2]
    assert torch.equal(permuted(x), raw[:, [1, 3, 0, 2]])
    assert permuted.describe()["class_order"] == [1, 3, 0, 2] and "class_order" not in same.describe()
    assert permuted.fingerprint() != same.fingerprint()  # cached outputs of one are not the other's
    assert match_teacher_classes(["cat", "ant", "dog", "bee"], DATA_NAMES, "t") == [1, 3, 0, 2]
    assert (
        match_teacher_classes(DATA_NAMES, DATA_NAMES, "t") is None
        and match_teacher_classes(None, DATA_NAMES, "t") is None
    )


def test_a_teacher_trained_on_other_classes_is_refused_with_both_lists(tmp_path: Path) -> None:
    folder = teacher_folder(tmp_path, ["ant", "bee", "cow", "eel"])
    with pytest.raises(TeacherError) as info:
        teacher_for(folder)
    assert str(info.value) == (
        f"teacher {folder} was trained on other classes than the data's. Teacher classes: 'ant', 'bee', "
        "'cow', 'eel'; data classes: 'ant', 'bee', 'cat', 'dog' (only the teacher has: 'cow', 'eel'; only "
        "the data has: 'cat', 'dog'). Use a teacher trained on these classes, or add a teacher.train "
        "section to train one"
    )
    # A head of another size is named by its classes too (before the head-size check).
    with pytest.raises(
        TeacherError,
        match=r"data classes: 'ant', 'bee' \(only the teacher has: 'cow', 'eel'; only the data has: none\)",
    ):
        teacher_for(folder, ["ant", "bee"])
