"""Every export format on a small untrained student (no training: seconds): the timm folder in
transformers (Auto classes and pipeline, identical logits, the run's label names), transformers'
native DeiT and ViT with their image processor, refusals for students it cannot hold, int8
quantization, each format scored by ``distill.evaluate`` (its data roots, JSON on standard output,
progress), the export check record, and the bad inputs' messages (distill/exports/*_format.py,
distill/exports/artifacts.py). The trained-run checks (re-validation, the int8 drop gate) are in
tests/test_export.py."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from distill.data.pipeline import eval_transform
from distill.evaluate import main as evaluate_main
from distill.export import main as export_main
from distill.exports.artifacts import load_artifact, score
from distill.exports.card import speed_words
from distill.exports.check_record import CHECK_VERSION, read_check
from distill.exports.end_of_run import export_timm
from distill.exports.export import ExportOptions, parse_formats, resolve_formats, run_export
from distill.exports.formats import ExportError, MissingPackageError
from distill.exports.onnx_format import write_onnx, write_onnx_int8
from distill.exports.timm_format import load_timm
from distill.exports.torchscript_format import write_torchscript
from distill.exports.transformers_format import transformers_problem, write_transformers
from distill.models.spec import InputSpec
from distill.models.student import build_student, student_heads, student_model_args
from distill.recipe.schema import StudentConfig

NAMES = ["cat", "dog", "eel", "fox"]
# crop_pct < 1 and non-square source images: the resize + centre crop is exercised, not skipped.
SPEC = InputSpec((16, 16), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.9, "bicubic")
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path": 0.0}


def student(token: bool = True, **sizes: object) -> nn.Module:
    torch.manual_seed(0)
    cfg = StudentConfig(**{**TINY, **sizes})
    model = build_student(cfg, len(NAMES), token)
    with torch.no_grad():  # timm zero-initialises the heads: make every head's logits distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.pretrained_cfg = {**model.pretrained_cfg, **SPEC.timm_config()}
    return model.eval()


def card(name: str) -> dict:
    data = {"source": "imagefolder", "path": None, "train_size": 0, "val_size": 0, "val_origin": "val"}
    distillation = {"type": "hard", "alpha": 0.5, "tau": 1.0, "kl_norm": "batchmean"}
    return {
        "name": name, "architecture": "deit_tiny_distilled_patch16_224", "distillation": distillation,
        "data": data, "num_classes": len(NAMES), "epochs": 0, "recipe": {},
    }  # fmt: skip


def pictures(n: int = 12) -> list[Image.Image]:
    """RGB noise pictures of several sizes (square and not), seeded."""
    g = torch.Generator().manual_seed(1)
    sizes = [(16, 16), (20, 24), (31, 17), (8, 8)]
    return [
        Image.fromarray(torch.randint(0, 256, (*sizes[i % 4], 3), generator=g, dtype=torch.uint8).numpy())
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export folder with every format (random weights), as distill.export lays it out."""
    out = tmp_path_factory.mktemp("exports") / "tiny"
    model = student()
    export_timm(model, out, student_model_args(StudentConfig(**TINY), len(NAMES)), NAMES, card("tiny"))
    images = torch.stack([eval_transform(SPEC)(p) for p in pictures(8)])
    checks = {
        "onnx": write_onnx(model, out / "model.onnx", images),
        "torchscript": write_torchscript(model, out / "model.torchscript.pt", images),
        "transformers": write_transformers(model, out / "transformers", NAMES, SPEC, "tiny", images),
    }
    assert all(c["ok"] for c in checks.values()), checks
    write_onnx_int8(out / "model.onnx", out / "model.int8.onnx", images)
    return out


def test_the_timm_folder_loads_in_transformers_with_identical_logits_and_label_names(export_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    config = json.loads((export_dir / "config.json").read_text())
    # TimmWrapper passes num_classes itself: a second one in model_args is a TypeError.
    assert "num_classes" not in config["model_args"] and config["num_classes"] == 4
    timm_model = load_timm(export_dir)
    assert torch.equal(timm_model.head_dist.weight, student().head_dist.weight)  # both heads loaded, not reset
    hf = AutoModelForImageClassification.from_pretrained(str(export_dir)).eval()
    assert type(hf).__name__ == "TimmWrapperForImageClassification"
    assert hf.config.id2label == dict(enumerate(NAMES))
    processor = AutoImageProcessor.from_pretrained(str(export_dir))
    x = processor(pictures(), return_tensors="pt")["pixel_values"]
    tf = eval_transform(SPEC)
    assert torch.equal(x, torch.stack([tf(p) for p in pictures()]))  # timm's own eval transform
    with torch.no_grad():
        expected = timm_model(x)
        assert torch.equal(hf(pixel_values=x).logits, expected)  # max abs diff 0 in fp32
    classify = pipeline("image-classification", model=str(export_dir))
    for picture, logits in zip(pictures(), expected):
        best = classify(picture, top_k=1)[0]
        assert best["label"] == NAMES[int(logits.argmax())]
        assert best["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-6)


def test_the_native_deit_folder_matches_every_head_and_the_eval_transform(export_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder = export_dir / "transformers"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeiTForImageClassificationWithTeacher"]
    assert config["layer_norm_eps"] == 1e-6 and config["id2label"] == {str(i): n for i, n in enumerate(NAMES)}
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": math.floor(16 / 0.9)} and pre["crop_size"] == {"height": 16, "width": 16}
    assert pre["resample"] == 3 and pre["image_mean"] == list(SPEC.mean) and pre["image_std"] == list(SPEC.std)

    hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    reference = student()
    x = torch.stack([eval_transform(SPEC)(p) for p in pictures()])
    with torch.no_grad():
        out = hf(pixel_values=x)
        cls, dist = student_heads(reference, x)
        for got, want in ((out.cls_logits, cls), (out.distillation_logits, dist), (out.logits, reference(x))):
            assert (got - want).abs().max() <= 1e-4
    # transformers' PIL image processor: timm's resize and normalisation, within float rounding,
    # on pictures whose centre crop falls on whole pixels in both (see README).
    ours = torch.stack([eval_transform(SPEC)(p) for p in pictures()[::4]])
    theirs = AutoImageProcessor.from_pretrained(str(folder), backend="pil")(pictures()[::4], return_tensors="pt")
    assert (theirs["pixel_values"] - ours).abs().max() <= 1e-5
    best = pipeline("image-classification", model=str(folder))(pictures()[0], top_k=1)[0]
    assert best["label"] in NAMES


def test_a_student_without_the_distillation_token_becomes_a_vit(tmp_path: Path) -> None:
    model = student(token=False)
    images = torch.stack([eval_transform(SPEC)(p) for p in pictures(4)])
    check = write_transformers(model, tmp_path / "transformers", NAMES, SPEC, "plain", images)
    assert check["architecture"] == "ViTForImageClassification" and check["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    ("sizes", "reason"),
    [
        ({"img_size": (16, 32)}, "image size 16x32 with 4x4 patches is not square"),
        (
            {"img_size": 32, "patch_size": 1, "stem": "resnet10t", "stem_stages": 2},
            "its stem is a hybrid (a CNN backbone before the patch embedding)",
        ),
    ],
)
def test_students_transformers_cannot_hold_are_refused_with_the_reason(sizes: dict, reason: str) -> None:
    problem = transformers_problem(student(**sizes))
    assert problem is not None and reason in problem
    with pytest.raises(ExportError, match="cannot represent this student exactly"):
        write_transformers(student(**sizes), Path("/nonexistent/transformers"), NAMES, SPEC, "x", torch.zeros(1))


def test_every_format_is_scored_by_evaluate_with_its_folders_preprocessing(export_dir: Path, tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": pictures(24), "label": [i % 4 for i in range(24)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}),
    )
    results = {}
    for path in ("", "transformers", "model.onnx", "model.torchscript.pt", "model.int8.onnx"):
        loaded = load_artifact(export_dir / path)
        assert loaded.class_names == NAMES and loaded.spec.size == (16, 16), path
        results[path] = score(loaded, ds, 8, device=torch.device("cpu"))
    heads = {p: sorted(k for k in r if k.startswith("top1_")) for p, r in results.items()}
    assert heads[""] == heads["transformers"] == ["top1_cls", "top1_dist", "top1_fused"]
    assert heads["model.onnx"] == heads["model.torchscript.pt"] == heads["model.int8.onnx"] == ["top1_fused"]
    for path in ("transformers", "model.onnx", "model.torchscript.pt"):  # fp32: the same predictions
        assert results[path]["top1_fused"] == results[""]["top1_fused"], path
    assert results["transformers"]["top1_cls"] == results[""]["top1_cls"]
    # The command: one table per format, the same rows.
    for i, name in enumerate(NAMES):
        (tmp_path / "data" / name).mkdir(parents=True)
        for j, picture in enumerate(pictures(24)[i::4]):
            picture.save(tmp_path / "data" / name / f"{j}.png")
    for path in ("transformers", "model.int8.onnx"):
        out = tmp_path / f"{path}.json"
        assert evaluate_main([str(export_dir / path), "--data", str(tmp_path / "data"), "--json", str(out)]) == 0
        assert json.loads(out.read_text())["images"] == 24


def test_evaluate_refuses_another_librarys_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert evaluate_main([str(tmp_path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a transformers 'bert' folder (BertModel), not a distill export; evaluate reads" in err
    lone = tmp_path / "elsewhere" / "model.onnx"
    lone.parent.mkdir()
    lone.write_bytes(b"onnx")
    assert evaluate_main([str(lone)]) == 2
    assert "has no timm config.json; keep the file in the folder distill.export wrote" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "fmt", "extra"), [("transformers", "transformers", "hf"), ("onnxruntime", "onnx-int8", "export")]
)
def test_a_format_whose_package_is_missing_names_the_extra_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], module: str, fmt: str,
    extra: str,
) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like to import
    with pytest.raises(MissingPackageError, match=rf"--format {fmt} needs the '{module}' package"):
        run_export(ExportOptions(tmp_path / "run", tmp_path / "out", (fmt,)))
    assert export_main([str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / "out")]) == 2
    assert f"pip install 'distill[{extra}]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _class_folders(root: Path, n: int = 24) -> Path:
    for i, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for j, picture in enumerate(pictures(n)[i::4]):
            picture.save(root / name / f"{j}.png")
    return root


def test_evaluate_reads_a_root_that_holds_only_a_validation_split(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ROOT/test/<class>/ (no train/): scored as that split, not as one class named "test"."""
    _class_folders(tmp_path / "root" / "test")
    assert evaluate_main([str(export_dir), "--data", str(tmp_path / "root"), "--json", "-"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images"] == 24
    assert f"imagefolder {(tmp_path / 'root').resolve()}/test (24 images)" in captured.err
    assert evaluate_main([str(export_dir), "--data", str(tmp_path / "root"), "--split", "train"]) == 2
    assert "has no train/ folder, only test/; evaluate it with --split val" in capsys.readouterr().err


def test_evaluate_json_goes_to_standard_output_and_progress_to_stderr(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _class_folders(tmp_path / "data")
    for flag in (["--json", "-"], ["--json"]):
        args = [str(export_dir / "model.onnx"), "--data", str(data), "--batch-size", "8", "--progress-every", "0"]
        assert evaluate_main([*args, *flag]) == 0
        captured = capsys.readouterr()
        assert json.loads(captured.out)["top1_fused"] >= 0.0  # stdout is the JSON alone
        assert "top1 fused" in captured.err  # the table
        assert [line.split("  ")[0] for line in captured.err.splitlines() if line.startswith("evaluate:")] == [
            "evaluate: 8/24 images", "evaluate: 16/24 images", "evaluate: 24/24 images",
        ]  # fmt: skip
        assert not Path("-").exists()


def test_bad_paths_are_named(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main([str(tmp_path / "nonexist")]) == 2
    assert f"{tmp_path / 'nonexist'} does not exist" in capsys.readouterr().err
    assert export_main([str(export_dir), "--out", str(tmp_path / "out")]) == 2
    assert f"{export_dir} is an export; give the run directory" in capsys.readouterr().err
    assert resolve_formats(parse_formats("ONNX, TorchScript,Transformers")) == [
        "timm", "onnx", "torchscript", "transformers",
    ]  # fmt: skip


def test_tracing_the_student_raises_no_tracer_warnings(tmp_path: Path) -> None:
    images = torch.stack([eval_transform(SPEC)(p) for p in pictures(4)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_torchscript(student(), tmp_path / "model.torchscript.pt", images)
        write_onnx(student(), tmp_path / "model.onnx", images)
    assert [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)] == []


def test_int8_latency_is_said_in_words() -> None:
    assert speed_words(1.18) == "int8 is 1.18x slower"
    assert speed_words(1 / 1.3) == "int8 is 1.30x faster"


# export_check.json as the first layout wrote it (no version; top-1 per head under "fused").
FIRST_LAYOUT = {
    "checkpoint": "runs/smoke/checkpoints/step_00000016", "ema": False, "head": "fused",
    "formats": {"timm": {"file": "model.safetensors", "bytes": 114656, "max_abs_diff": 0.0, "ok": True,
                         "checked_images": 16}},
    "revalidation": {"split": "val (validation, 40 images)", "student_top1": 0.675, "export_top1": 0.675,
                     "run_logged_top1": 0.675, "formats": {"timm": 0.675}},
    "int8": {"onnx-int8": {
        "file": "model.int8.onnx", "bytes": 60000, "calibration_images": 64, "heads_note": " (note)",
        "top1": {"fused": {"fp32": 0.675, "int8": 0.65, "drop_points": 2.5}}, "agreement_with_fp32": 0.9,
        "fp32_bytes": 138159, "size_ratio": 0.43, "latency_ms": {"1": {"fp32": 0.5, "int8": 0.59, "ratio": 1.18,
        "repeats": 50}}, "calibration_seed": 0, "max_top1_drop_points": 1.0, "ok": False,
    }},
}  # fmt: skip


def test_an_export_check_of_the_first_layout_is_read(tmp_path: Path) -> None:
    (tmp_path / "export_check.json").write_text(json.dumps(FIRST_LAYOUT))
    check = read_check(tmp_path)
    assert check.version == 1 < CHECK_VERSION and check.revalidation.run.rule == "exact"
    q = check.int8["onnx-int8"]
    assert (q.head, q.kept.drop_points, q.latency_ms["1"].ratio) == ("fused", 2.5, 1.18)
    assert check.formats["timm"].bytes == 114656 and check.revalidation.images is None
    (tmp_path / "export_check.json").write_text(json.dumps({**FIRST_LAYOUT, "version": CHECK_VERSION + 1}))
    with pytest.raises(ExportError, match="upgrade"):
        read_check(tmp_path)
