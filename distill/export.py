"""Student export in timm's Hugging Face Hub layout, with a model card.

``export/`` holds ``config.json`` (architecture, model arguments, classes, label names and the
preprocessing in ``pretrained_cfg``), ``model.safetensors`` and ``README.md``; it loads offline
with ``timm.create_model("local-dir:<dir>", pretrained=True)`` and can be pushed as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.errors import DistillError


def _fmt(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"


def model_card(info: dict[str, Any]) -> str:
    """A Hub model card (timm's front matter) carrying the run's provenance."""
    final = info.get("final", {})
    teacher = info.get("teacher") or {}
    dist = info["distillation"]
    front = {
        "tags": ["image-classification", "timm", "distillation", "deit"],
        "library_name": "timm",
        "pipeline_tag": "image-classification",
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        f"# {info['name']}",
        "",
        f"A `{info['architecture']}` student distilled DeiT-style (class token + distillation "
        f"token) from a `{teacher.get('architecture', 'none')}` teacher with **distill**.",
        "",
        "## Usage",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{info["name"]}", pretrained=True).eval()',
        "# or, once pushed: timm.create_model('hf-hub:<user>/<repo>', pretrained=True)",
        "```",
        "",
        "At inference the class and distillation heads are fused (mean of their logits). Feed RGB "
        'images (`Image.open(path).convert("RGB")`): the student takes 3 channels, grayscale data too, '
        "and timm's transform does not convert them.",
        "",
        "## Distillation",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| teacher | `{teacher.get('architecture', 'none')}` |",
        f"| teacher weights sha256 | `{teacher.get('sha256', 'n/a')}` |",
        f"| teacher val top-1 | {_fmt(teacher.get('val_top1'))} |",
        f"| type | {dist['type']} |",
        f"| alpha | {dist['alpha']} |",
        f"| tau | {dist['tau']} |",
        f"| soft KL normalisation | {dist['kl_norm']} |",
        "",
        "## Data and training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| data source | {info['data']['source']} {info['data'].get('path') or ''} |",
        f"| train / val images | {info['data']['train_size']} / {info['data']['val_size']} "
        f"(val from: {info['data']['val_origin']}) |",
        f"| classes | {info['num_classes']} |",
        f"| epochs | {info['epochs']}{_epochs_note(info)} |",
        f"| weights exported | {info.get('weights', 'last')} |",
        "",
        "## Validation results",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| top-1 class head | {_fmt(final.get('val/top1_cls'))} |",
        f"| top-1 distillation head | {_fmt(final.get('val/top1_dist'))} |",
        f"| top-1 fused | {_fmt(final.get('val/top1_fused'))} |",
        f"| top-5 fused | {_fmt(final.get('val/top5_fused'))} |",
        f"| agreement with teacher | {_fmt(final.get('val/agreement'))} |",
        f"| KL(teacher ‖ fused student), τ=1 | {f'{v:.4g}' if type(v := final.get('val/kl')) is float else 'n/a'} |",
        "",
        "## Software",
        "",
        "| package | version |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in info.get("packages", {}).items()],
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(info["recipe"], sort_keys=False).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _epochs_note(info: dict[str, Any]) -> str:
    """Whose epoch count the card shows: the exported checkpoint's, when not the run's last."""
    total = info.get("run_epochs")
    if total is None or total == info["epochs"]:
        return ""
    return f" (the exported checkpoint's; the run trained {total})"


def card_info(
    name: str,
    model: nn.Module,
    recipe: Any,
    num_classes: int,
    summary: dict[str, Any],
    data: dict[str, Any],
    epochs: int,
    weights: str,
) -> dict[str, Any]:
    """What the model card shows, from the run's recipe and (possibly partial) summary."""
    from distill.config import recipe_to_dict
    from distill.tracking import package_versions

    return {
        "name": name,
        "architecture": model.pretrained_cfg.get("architecture", recipe.student.model),
        "num_classes": num_classes,
        "teacher": summary.get("teacher"),
        "distillation": recipe.distillation.model_dump(mode="json"),
        "data": data,
        "epochs": epochs,
        "run_epochs": summary.get("epochs"),  # how far the run got (summary.json), if it finished
        "final": summary.get("final", {}),
        "packages": package_versions(),
        "recipe": recipe_to_dict(recipe),
        "weights": weights,
    }


def export_timm(
    model: nn.Module,
    out_dir: Path,
    model_args: dict[str, Any],
    class_names: list[str],
    card_info: dict[str, Any],
) -> Path:
    """Write the timm Hub folder atomically (temporary name, then rename)."""
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(
        model,
        str(tmp),
        model_config={"label_names": list(class_names)},
        model_args=model_args,
        safe_serialization=True,
    )
    (tmp / "README.md").write_text(model_card(card_info))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def reload_max_diff(model: nn.Module, export_dir: Path, images: torch.Tensor) -> float:
    """Load the export through timm alone and compare its fused logits with ``model``'s."""
    import timm

    reloaded = timm.create_model(f"local-dir:{Path(export_dir).resolve()}", pretrained=True).eval()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        diff = (reloaded(images) - model(images)).abs().max().item()
    model.train(was_training)
    return diff


def export_run_student(
    student: nn.Module, out: Path, recipe: Any, split: Any, summary: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """A finished run's export: the timm folder with its card, reloaded through timm alone on a
    few real validation images (a broken export fails the run here)."""
    from distill.models import student_model_args
    from distill.pipeline import InputSpec, eval_transform

    card = card_info(
        recipe.run.name, student, recipe, split.num_classes, summary, summary["data"], summary["epochs"], "last"
    )
    export_timm(student, out, student_model_args(recipe.student, split.num_classes), split.class_names, card)
    eval_tf = eval_transform(InputSpec.from_timm(student.pretrained_cfg))
    probe = torch.stack([eval_tf(split.val[i]["image"].convert("RGB")) for i in range(min(8, len(split.val)))])
    diff = reload_max_diff(student.cpu(), out, probe)
    student.to(device)
    return {"path": str(out), "reload_max_abs_diff": diff}


# ---------------------------------------------------------------------------------------------
# python -m distill.export: formats, head choice, parity checks and re-validation

FORMATS = ("timm", "onnx", "torchscript")
PARITY_TOL = 1e-4  # max |exported - PyTorch| on real validation images (fp32)


def select_head(model: nn.Module, head: str) -> nn.Module:
    """A classifier whose output is exactly one head's logits, in timm's own architecture.

    The distilled model returns (head(cls token) + head_dist(dist token)) / 2 and the tokens
    differ, so neither head can be copied onto the other. Instead the chosen head is doubled and
    the other zeroed: (2 * h(t) + 0) / 2 = h(t), bit for bit in floating point (scaling by 2 is
    exact). timm loads the result as the same architecture; the distillation token still takes
    part in attention, as it did in training.
    """
    if head == "fused" or not hasattr(model, "head_dist"):
        return model
    keep, drop = (model.head, model.head_dist) if head == "cls" else (model.head_dist, model.head)
    with torch.no_grad():
        for p in keep.parameters():
            p.mul_(2.0)
        for p in drop.parameters():
            p.zero_()
    return model


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DistillError(
            f"this export format needs the '{package}' package, which is not installed: "
            f"pip install {package}  (or pip install 'distill[export]')"
        ) from None


def export_onnx(model: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """ONNX with a dynamic batch axis (TorchScript-based exporter: the dynamo one needs onnxscript),
    checked with ONNX Runtime against PyTorch on ``images``."""
    _require("onnx", "onnx")
    ort = _require("onnxruntime", "onnxruntime")
    model = model.eval()
    torch.onnx.export(
        model, (images,), str(path), dynamo=False, opset_version=17,
        input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(images).numpy()
    got = session.run(["logits"], {"pixel_values": images.numpy()})[0]
    diff = float(abs(got - ref).max())
    return {"file": path.name, "max_abs_diff": diff, "ok": diff <= PARITY_TOL, "checked_images": len(images)}


def export_torchscript(model: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, (images,))
        traced.save(str(path))
        reloaded = torch.jit.load(str(path))
        diff = float((reloaded(images) - model(images)).abs().max())
    return {"file": path.name, "max_abs_diff": diff, "ok": diff <= PARITY_TOL, "checked_images": len(images)}


def _run_metric(loaded: Any, head: str, ema: bool) -> float | None:
    """What the run itself logged for this checkpoint's epoch and head, if it evaluated it."""
    row = loaded.logged_row()
    return None if row is None else row.get(f"{'val_ema' if ema else 'val'}/top1_{head}")


def _card_results(loaded: Any, summary: dict[str, Any], ema: bool) -> dict[str, Any]:
    """The validation results of the exported weights: the row logged at their checkpoint (the
    EMA's under val/* names for an EMA export), else the run's final ones."""
    row = loaded.logged_row()
    if row is None:
        return summary.get("final", {})
    prefix = "val_ema/" if ema else "val/"
    return {f"val/{k[len(prefix) :]}": v for k, v in row.items() if k.startswith(prefix)}


def run_export(run_dir: Path, checkpoint: str, ema: bool, head: str, formats: list[str], out: Path) -> dict[str, Any]:
    """Export one checkpoint of a run and prove the export: parity and re-validation."""
    from distill.artifacts import load_checkpoint_student, load_export, resolve_checkpoint, score
    from distill.data import load_source
    from distill.models import student_model_args
    from distill.pipeline import eval_transform
    from distill.rundir import RunDir

    loaded = load_checkpoint_student(run_dir, resolve_checkpoint(run_dir, checkpoint), ema)
    recipe = loaded.recipe
    split = load_source(recipe.data)
    model = select_head(loaded.model, head)
    summary = RunDir(run_dir).summary()
    data = summary.get("data") or {
        "source": recipe.data.source, "path": recipe.data.path, "train_size": len(split.train),
        "val_size": len(split.val), "val_origin": split.val_origin,
    }  # fmt: skip
    weights = f"{Path(loaded.checkpoint).name}{' EMA' if ema else ''}, head {head}"
    # The card shows what these weights scored (for --checkpoint best, not the final epoch's).
    shown = {**summary, "final": _card_results(loaded, summary, ema)}
    card = card_info(out.name, model, recipe, split.num_classes, shown, data, loaded.progress["epoch"], weights)
    export_timm(model, out, student_model_args(recipe.student, split.num_classes), split.class_names, card)

    tf = eval_transform(loaded.spec)
    images = torch.stack([tf(split.val[i]["image"].convert("RGB")) for i in range(min(16, len(split.val)))])
    check: dict[str, Any] = {"checkpoint": str(loaded.checkpoint), "ema": ema, "head": head, "formats": {}}
    check["formats"]["timm"] = {"max_abs_diff": reload_max_diff(model, out, images), "checked_images": len(images)}
    check["formats"]["timm"]["ok"] = check["formats"]["timm"]["max_abs_diff"] == 0.0
    if "onnx" in formats:
        check["formats"]["onnx"] = export_onnx(model, out / "model.onnx", images)
    if "torchscript" in formats:
        check["formats"]["torchscript"] = export_torchscript(model, out / "model.torchscript.pt", images)

    # Re-validation: the export, loaded by timm alone, must score exactly what the run's student
    # scores on the same split with the same preprocessing and batch size.
    batch = recipe.eval.batch_size
    ours = score(loaded, split.val, batch, device=torch.device("cpu"))
    theirs = score(load_export(out), split.val, batch, device=torch.device("cpu"))
    logged = _run_metric(loaded, head, ema)
    check["revalidation"] = {
        "split": f"val ({split.val_origin}, {len(split.val)} images)",
        "student_top1": ours[f"top1_{head}"],
        "export_top1": theirs["top1_fused"],
        "run_logged_top1": logged,
    }
    (out / "export_check.json").write_text(json.dumps(check, indent=1))
    bad = [f for f, c in check["formats"].items() if not c["ok"]]
    if bad:
        raise DistillError(
            f"export parity failed for {', '.join(bad)} (tolerance {PARITY_TOL}); see {out}/export_check.json"
        )
    if theirs["top1_fused"] != ours[f"top1_{head}"] or (logged is not None and logged != ours[f"top1_{head}"]):
        raise DistillError(
            f"re-validation mismatch: export top-1 {theirs['top1_fused']}, student {ours[f'top1_{head}']}, "
            f"run logged {logged}; see {out}/export_check.json"
        )
    return check


def main(argv: list[str] | None = None) -> int:
    import argparse

    from distill.cli import run_guarded

    parser = argparse.ArgumentParser(prog="distill-export", description="Export a student from a run's checkpoint.")
    parser.add_argument("run", help="run directory")
    parser.add_argument("--checkpoint", default="last", help="last (default), best, or a checkpoint directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--head", choices=("fused", "cls", "dist"), default="fused")
    parser.add_argument("--format", default="timm", help="comma-separated: timm (always), onnx, torchscript")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it already holds files")
    args = parser.parse_args(argv)

    def go() -> None:
        formats = [f.strip() for f in args.format.split(",") if f.strip()]
        unknown = sorted(set(formats) - set(FORMATS))
        if unknown:
            raise DistillError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        out = Path(args.out)
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            # The folder is replaced as a whole (atomically): other formats or files in it would go.
            held = ", ".join(sorted(p.name for p in out.iterdir())[:6])
            raise DistillError(
                f"--out {out} already holds files ({held}); choose an empty or new folder, or pass "
                "--overwrite to replace it with this export"
            )
        check = run_export(Path(args.run), args.checkpoint, args.ema, args.head, formats, Path(args.out))
        for name, c in check["formats"].items():
            print(f"{name:12s} max |diff| {c['max_abs_diff']:.2e}  {'ok' if c['ok'] else 'FAILED'}")
        r = check["revalidation"]
        print(f"re-validation top-1: export {100 * r['export_top1']:.2f}% = student {100 * r['student_top1']:.2f}%")
        print(f"exported to {args.out}")

    return run_guarded(go)


if __name__ == "__main__":
    import sys

    sys.exit(main())
