"""Shipping the student: every export format with parity checks, single-head exports, the model
card, re-validation, int8 quantization and its drop gate, the transformers pipeline, the evaluate
command on every format, initialising from a plain ViT, a fresh process that imports only timm
reproducing the run's accuracy, a bf16 run's export, and the export command's guards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.errors import DistillError
from distill.export import main as export_main
from distill.exports.artifacts import load_artifact
from distill.exports.check_record import read_check
from distill.exports.export import ExportOptions, run_export
from distill.exports.int8 import int8_top1
from distill.models.student import student_heads
from tests.helpers import SMOKE, check_ok, read_metrics, run_train, subprocess_env

pytestmark = pytest.mark.slow


ALL_FORMATS = "timm,ONNX,onnx-int8,TorchScript,transformers"  # --format is read in any letter case


@pytest.fixture(scope="module")
def full_export(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "smoke-all"
    # A generous drop limit: this fixture is about the files; the gate is pinned below.
    args = ["--format", ALL_FORMATS, "--calibration-images", "64", "--max-top1-drop", "100"]
    assert export_main([str(smoke_run), *args, "--out", str(out)]) == 0
    return out


def test_every_format_is_written_and_checked(full_export: Path, smoke_run: Path) -> None:
    names = {p.name for p in full_export.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "model.onnx", "model.torchscript.pt"} <= names
    assert {"model.int8.onnx", "transformers"} <= names
    check = read_check(full_export)
    assert check.formats["timm"].max_abs_diff == 0.0
    assert check.formats["onnx"].max_abs_diff <= 1e-4 and check.formats["onnx"].checked_images == 16
    assert check.formats["torchscript"].max_abs_diff <= 1e-4
    hf = check.formats["transformers"]
    assert hf.architecture == "DeiTForImageClassificationWithTeacher"
    assert max(hf.max_abs_diff, hf.max_abs_diff_cls, hf.max_abs_diff_dist) <= 1e-4
    logged = read_metrics(smoke_run)[-1]["val/top1_fused"]
    assert check.revalidation.export_top1 == check.revalidation.student_top1 == logged
    # Every fp32 format, loaded as distill.evaluate loads it, scores exactly the run's top-1.
    assert check.revalidation.formats == dict.fromkeys(("timm", "onnx", "torchscript", "transformers"), logged)
    # The run evaluated in fp32 on the CPU with the fused kernel, as re-validation does: exactly equal.
    assert check.revalidation.run.rule == "exact" and check.revalidation.run.difference_images == 0


def test_int8_is_revalidated_against_fp32_and_described_in_the_card(full_export: Path, smoke_run: Path) -> None:
    from distill.evaluate import main as evaluate_main

    q = read_check(full_export).int8["onnx-int8"]
    assert q.calibration_images == 64 and q.calibration_seed == 0 and q.ok is True
    assert list(q.top1) == ["fused"]  # the ONNX graph has the fused output only
    fused = q.top1["fused"]
    assert fused.fp32 == read_metrics(smoke_run)[-1]["val/top1_fused"]
    assert fused.drop_points == pytest.approx(100 * (fused.fp32 - fused.int8))
    assert 0.5 <= q.agreement_with_fp32 <= 1.0 and q.size_ratio == q.bytes / q.fp32_bytes
    assert set(q.latency_ms) == {"1", "32"} and all(v.fp32 > 0 < v.int8 for v in q.latency_ms.values())
    # The same figure from distill.evaluate on the int8 file, and in the model card.
    out = full_export.parent / "int8.json"
    assert evaluate_main([str(full_export / "model.int8.onnx"), "--data", str(SMOKE), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["top1_fused"] == fused.int8
    card = (full_export / "README.md").read_text()
    assert f"| top-1 fused | {100 * fused.fp32:.2f}% | {100 * fused.int8:.2f}% (drop " in card
    assert "| CPU latency, batch 32 (median of 10) |" in card and "(int8 is " in card
    assert "calibrated on 64 training images (seed 0, eval transform)" in card and "model.int8.onnx" in card
    assert 'pipeline("image-classification", model="smoke-all/transformers")' in card


def test_an_int8_drop_beyond_the_limit_fails_and_keeps_the_fp32_files(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gate"
    # -100 points: no int8 model passes (on this near-chance smoke student int8 happens to score
    # higher than fp32, so a limit of -1 would pass).
    args = ["--format", "onnx-int8", "--calibration-images", "16", "--max-top1-drop", "-100", "--out", str(out)]
    assert export_main([str(smoke_run), *args]) == 2
    err = capsys.readouterr().err
    assert "error: onnx-int8: fused top-1 dropped" in err and "more than --max-top1-drop -100.0" in err
    assert "model.int8.onnx was removed, the fp32 files stay" in err
    # Advice the measurements support (more calibration images made an MNIST drop larger).
    assert "More calibration images do not reliably help" in err and "percentile or entropy calibration" in err
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "model.onnx",
                                              "export_check.json"}  # fmt: skip
    q = read_check(out).int8["onnx-int8"]
    assert q.ok is False and q.max_top1_drop_points == -100.0


def test_int8_top1_measures_without_an_export_folder(full_export: Path, smoke_run: Path) -> None:
    """The study report's int8 figures: the same quantization (64 images, seed 0) as the export."""
    before = {p.name for p in smoke_run.iterdir()}
    got = int8_top1(smoke_run, calibration_images=64)
    q = read_check(full_export).int8["onnx-int8"]
    assert got == {
        "top1_fp32": q.kept.fp32, "top1_int8": q.kept.int8, "drop_points": q.kept.drop_points,
        "agreement_with_fp32": q.agreement_with_fp32,
    }  # fmt: skip
    assert {p.name for p in smoke_run.iterdir()} == before


def test_a_calibration_sample_larger_than_the_training_split_is_refused(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x"
    assert export_main([str(smoke_run), "--format", "onnx-int8", "--calibration-images", "129", "--out", str(out)]) == 2
    assert "--calibration-images 129: the training split has 128 images; choose between 1 and 128" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_the_transformers_pipeline_scores_the_runs_top1(full_export: Path, smoke_run: Path) -> None:
    """Through the timm folder (TimmWrapper: timm's transform) and the native DeiT folder."""
    from transformers import pipeline

    from distill.data.sources import load_source
    from distill.recipe.schema import load_recipe

    split = load_source(load_recipe(SMOKE).data)
    images, labels = [r["image"] for r in split.val], [split.class_names[r["label"]] for r in split.val]
    logged = read_metrics(smoke_run)[-1]["val/top1_fused"]
    for folder in (full_export, full_export / "transformers"):
        classify = pipeline("image-classification", model=str(folder))
        predicted = [p[0]["label"] for p in classify(images, top_k=1)]
        assert sum(p == y for p, y in zip(predicted, labels)) / len(labels) == logged, folder


def test_onnx_runs_in_onnxruntime_with_any_batch(full_export: Path) -> None:
    import onnxruntime as ort
    import timm

    session = ort.InferenceSession(str(full_export / "model.onnx"), providers=["CPUExecutionProvider"])
    model = timm.create_model(f"local-dir:{full_export}", pretrained=True).eval()
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        got = session.run(["logits"], {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            assert abs(got - model(x).numpy()).max() <= 1e-4


def test_model_card_carries_the_run_provenance(full_export: Path, smoke_run: Path) -> None:
    card = (full_export / "README.md").read_text()
    summary = json.loads((smoke_run / "summary.json").read_text())
    final = read_metrics(smoke_run)[-1]
    assert card.startswith("---\n") and "library_name: timm" in card
    for text in (
        "`resnet10t`", summary["teacher"]["sha256"], "| type | hard |", "| alpha | 0.5 |", "| tau | 1.0 |",
        "| soft KL normalisation | batchmean |", "| data source | synthetic", "| train / val images | 128 / 40",
        "| epochs | 2 |", f"| top-1 fused | {100 * final['val/top1_fused']:.2f}% |",
        f"| top-1 class head | {100 * final['val/top1_cls']:.2f}% |",
        f"| agreement with teacher | {100 * final['val/agreement']:.2f}% |", "| timm |", "```yaml",
    ):  # fmt: skip
        assert text in card, text


@pytest.mark.parametrize("head", ["cls", "dist"])
def test_single_head_exports_give_that_heads_predictions(smoke_run: Path, tmp_path: Path, head: str) -> None:
    import timm

    check = run_export(ExportOptions(smoke_run, tmp_path / head, checkpoint="best", head=head))
    exported = timm.create_model(f"local-dir:{tmp_path / head}", pretrained=True).eval()
    student = load_artifact(smoke_run, "best").model
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, dist = student_heads(student, x)
        assert torch.equal(exported(x), cls if head == "cls" else dist)
    best = json.loads((smoke_run / "checkpoints" / "best" / "progress.json").read_text())
    logged = next(r for r in read_metrics(smoke_run) if r["epoch"] == best["epoch"])
    assert check.revalidation.export_top1 == logged[f"val/top1_{head}"]
    # The card shows what the best checkpoint scored, not the final epoch's results.
    card = (tmp_path / head / "README.md").read_text()
    assert f"| epochs | {best['epoch']} (the exported checkpoint's; the run trained 2) |" in card
    assert f"| top-1 class head | {100 * logged['val/top1_cls']:.2f}% |" in card
    assert f"| agreement with teacher | {100 * logged['val/agreement']:.2f}% |" in card
    assert best["epoch"] != read_metrics(smoke_run)[-1]["epoch"]  # so the final epoch's would differ
    assert logged["val/top1_cls"] != read_metrics(smoke_run)[-1]["val/top1_cls"]


@pytest.mark.parametrize("head", ["cls", "dist"])
def test_a_single_head_export_reports_that_head_only_in_every_format(
    smoke_run: Path, tmp_path: Path, head: str
) -> None:
    """The other head is zeros in the timm folder: evaluate reports the kept head alone (the zeroed
    head's "top-1" would be the share of class-0 images), and transformers holds the kept head
    with its own weights, not the doubled ones of the timm folder."""
    from transformers import AutoModelForImageClassification

    from distill.evaluate import main as evaluate_main

    out = tmp_path / head
    assert export_main([str(smoke_run), "--head", head, "--format", "transformers,onnx", "--out", str(out)]) == 0
    final = read_metrics(smoke_run)[-1]
    for path in ("", "transformers", "model.onnx"):
        got = tmp_path / f"{head}{path.replace('/', '_')}.json"
        assert evaluate_main([str(out / path), "--data", str(SMOKE), "--json", str(got)]) == 0
        result = json.loads(got.read_text())
        assert sorted(k for k in result if k.startswith("top")) == [f"top1_{head}", f"top5_{head}"], path
        assert result[f"top1_{head}"] == final[f"val/top1_{head}"], path
    hf = AutoModelForImageClassification.from_pretrained(str(out / "transformers")).eval()
    assert type(hf).__name__ == "DeiTForImageClassification"
    student = load_artifact(smoke_run).model
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls, dist = student_heads(student, x)
        assert (hf(pixel_values=x).logits - (cls if head == "cls" else dist)).abs().max() <= 1e-4
    kept = {"cls": "class", "dist": "distillation"}[head]
    assert f"This export keeps the {kept} head only" in (out / "README.md").read_text()
    assert f"It keeps the {kept} head only" in (out / "transformers" / "README.md").read_text()


def test_a_missing_optional_dependency_names_the_package(
    smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an absent package looks like to import
    with pytest.raises(DistillError, match=r"needs the 'onnxruntime' package.*pip install onnxruntime"):
        run_export(ExportOptions(smoke_run, tmp_path / "x", ("timm", "onnx")))


def test_evaluate_command_reports_every_head(smoke_run: Path, full_export: Path, tmp_path: Path) -> None:
    from distill.evaluate import main

    assert main([str(smoke_run), "--json", str(tmp_path / "run.json")]) == 0
    assert main([str(full_export), "--data", str(SMOKE), "--json", str(tmp_path / "exp.json")]) == 0
    run, exp = json.loads((tmp_path / "run.json").read_text()), json.loads((tmp_path / "exp.json").read_text())
    final = read_metrics(smoke_run)[-1]
    for head in ("cls", "dist", "fused"):
        assert run[f"top1_{head}"] == exp[f"top1_{head}"] == final[f"val/top1_{head}"]
    assert run["images"] == 40 and run["throughput_img_s"] > 0 and run["peak_memory_mb"] > 0
    # Every other format: the same table, the heads it keeps, the run's figures.
    for path, heads in (("transformers", ("cls", "dist", "fused")), ("model.onnx", ("fused",)),
                        ("model.torchscript.pt", ("fused",))):  # fmt: skip
        out = tmp_path / f"{path}.json"
        assert main([str(full_export / path), "--data", str(SMOKE), "--json", str(out)]) == 0
        got = json.loads(out.read_text())
        assert sorted(k for k in got if k.startswith("top1_")) == sorted(f"top1_{h}" for h in heads)
        for head in heads:
            assert got[f"top1_{head}"] == final[f"val/top1_{head}"], (path, head)
    assert main([str(tmp_path / "nothing")]) == 2


def test_a_fresh_process_with_only_timm_reproduces_the_run(smoke_run: Path, full_export: Path, tmp_path: Path) -> None:
    """Dump the validation images as PNG files, then score the export in a process that imports
    timm, torch and PIL only: the fused top-1 must be the run's."""
    from distill.data.sources import load_source
    from distill.recipe.schema import load_recipe

    split = load_source(load_recipe(SMOKE).data)
    for i in range(len(split.val)):
        row = split.val[i]
        row["image"].save(tmp_path / f"{i:04d}_{row['label']}.png")
    script = f"""
import sys, pathlib, timm, torch
from PIL import Image
assert not any(m == "distill" or m.startswith("distill.") for m in sys.modules)
model = timm.create_model("local-dir:{full_export}", pretrained=True).eval()
tf = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
files = sorted(pathlib.Path("{tmp_path}").glob("*.png"))
x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
y = torch.tensor([int(f.stem.split("_")[1]) for f in files])
with torch.no_grad():
    print((model(x).argmax(-1) == y).double().mean().item())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    check_ok(proc)
    assert float(proc.stdout.strip()) == pytest.approx(read_metrics(smoke_run)[-1]["val/top1_fused"], abs=1e-9)


def test_a_student_initialised_from_a_plain_vit_trains(tmp_path: Path, teacher_cache: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from distill.models.student import build_student
    from distill.models.student_init import init_student, resolve_init
    from distill.recipe.schema import StudentConfig

    plain = timm.create_model(
        "deit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    student = build_student(StudentConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), 4)
    report = init_student(student, resolve_init(path))
    assert report.as_dict() == {
        "added": ["dist_token", "pos_embed row 1", "head_dist"],
        "dropped": [],
        "resampled": [],
        "reset": [],
    }
    sd = student.state_dict()
    assert torch.equal(sd["dist_token"], plain.state_dict()["cls_token"])
    assert torch.equal(sd["pos_embed"][:, 2:], plain.state_dict()["pos_embed"][:, 1:])
    assert torch.equal(sd["head_dist.weight"], plain.state_dict()["head.weight"])
    assert torch.equal(sd["blocks.1.mlp.fc2.weight"], plain.state_dict()["blocks.1.mlp.fc2.weight"])
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}",
                     f"student.init={path}", "train.epochs=1", "run.export=false")  # fmt: skip
    check_ok(proc)
    assert "initialised from" in proc.stdout
    assert read_metrics(tmp_path / "smoke")[0]["train/loss"] < 1.5


def test_model_card_says_whose_epochs_it_shows() -> None:
    from distill.exports.card import _epochs_note

    assert _epochs_note({"epochs": 3, "run_epochs": 10}) == " (the exported checkpoint's; the run trained 10)"
    assert _epochs_note({"epochs": 10, "run_epochs": 10}) == ""
    assert _epochs_note({"epochs": 3}) == ""


def test_export_refuses_a_folder_that_already_holds_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"another export")
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files (model.onnx)" in err and "--overwrite" in err
    assert (out / "model.onnx").read_bytes() == b"another export"


def test_an_export_given_as_the_run_is_named(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_main([str(smoke_run / "export"), "--out", str(tmp_path / "x")]) == 2
    assert f"{smoke_run / 'export'} is an export; give the run directory ({smoke_run})" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# A bf16 run with attention=manual evaluates under autocast: near-tied logits swap against the fp32
# re-validation. At one epoch with 400 validation images (seed 0), with 2 threads, the run logs
# 63.50% and fp32 re-scores 63.25%, one image apart, with one argmax flip measured between the
# two settings (with 1 thread the bf16 rounding differs and no image moves: measured 2026-12-02).
BF16 = ["train.precision=bf16", "train.attention=manual", "train.epochs=1", "teacher.train.epochs=1",
        "data.synthetic.val_per_class=100"]  # fmt: skip


def test_a_bf16_run_exports_every_format(tmp_path: Path, teacher_cache: Path) -> None:
    args = [str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}", *BF16]
    check_ok(run_train(*args, env=subprocess_env(OMP_NUM_THREADS="2")))
    run, out = tmp_path / "smoke", tmp_path / "export"
    args = ["--format", ALL_FORMATS, "--calibration-images", "64", "--max-top1-drop", "100", "--out", str(out)]
    assert export_main([str(run), *args]) == 0
    r = read_check(out).revalidation
    assert set(r.formats) == {"timm", "onnx", "torchscript", "transformers"}
    assert all(t == r.student_top1 for t in r.formats.values())  # fp32 on the CPU everywhere: exact
    assert r.run.rule == "tolerance" and r.run.run_setting == "bf16 on cpu, manual attention"
    assert r.run.revalidation_setting == "fp32 on cpu, fused attention"
    assert r.run_logged_top1 == read_metrics(run)[-1]["val/top1_fused"]
    assert r.run.difference_images == round(abs(r.student_top1 - r.run_logged_top1) * 400) == 1
    assert r.run.difference_images <= r.run.tolerance_images
    assert r.run.tolerance_images == max(1, r.run.measured_flips)
    assert "where argmax flips move top-1 by whole images" in (out / "README.md").read_text()
