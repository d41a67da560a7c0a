"""Student export: what to export, the checks that prove it, and the model card.

``export/`` holds timm's Hugging Face Hub layout: ``config.json`` (architecture, model arguments,
classes, label names and the preprocessing in ``pretrained_cfg``), ``model.safetensors`` and
``README.md``. It loads offline with ``timm.create_model("local-dir:<dir>", pretrained=True)``
and with transformers' ``AutoModelForImageClassification`` (its TimmWrapper), and can be pushed as
it is. ``python -m distill.export`` adds other formats next to it (export_formats.py writes and
reloads each), proves each against the student, and quantizes to int8 on request.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distill.errors import DistillError
from distill.exports.formats import FORMATS, PARITY_TOL, TRANSFORMERS_DIR, ExportError, require


def _fmt(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"


def model_card(info: dict[str, Any], check: dict[str, Any] | None = None) -> str:
    """A Hub model card (timm's front matter) carrying the run's provenance and, after
    ``python -m distill.export``, what its checks measured (``check``: export_check.json)."""
    final = info.get("final", {})
    teacher = info.get("teacher") or {}
    dist = info["distillation"]
    front = {
        "tags": ["image-classification", "timm", "transformers", "distillation", "deit"],
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
        *(
            ["## Usage", "", f"Not loadable by timm or transformers alone: {info['not_loadable_by_timm']}.", ""]
            if info.get("not_loadable_by_timm")
            else usage_lines(info["name"], check)
        ),
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
        *[  # an ensemble's members (teacher.ensemble): each with its share, file digest and top-1
            f"| teacher member {i} | `{m.get('architecture')}`, weight {m.get('weight', 1.0):.3g}, sha256 "
            f"`{m.get('sha256', 'n/a')}`, val top-1 {_fmt(m.get('val_top1'))} |"
            for i, m in enumerate(teacher.get("members") or [])
        ],
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
        f"| initialised from | {init_text(info.get('student_init'))} |",
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
        *check_lines(check),
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


def init_text(init: dict[str, Any] | None) -> str:
    """Where the student's weights came from (student.init), for the card and the report."""
    if not init:
        return "random initialisation"
    top1 = init.get("recorded_top1")
    scored = f", recorded fused top-1 {100 * top1:.2f}%" if isinstance(top1, float) else ""
    return f"`{init['path']}` ({init['source']}, sha256 `{init['sha256'][:16]}`{scored})"


def usage_lines(name: str, check: dict[str, Any] | None) -> list[str]:
    """How to load the folder with timm and with transformers (and the other formats written)."""
    formats = (check or {}).get("formats", {})
    lines = [
        "## Usage",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("local-dir:{name}", pretrained=True).eval()',
        "# or, once pushed: timm.create_model('hf-hub:<user>/<repo>', pretrained=True)",
        "",
        "# transformers reads the same folder through its TimmWrapper (identical logits, timm's transform):",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline",
        f'model = AutoModelForImageClassification.from_pretrained("{name}").eval()',
        f'processor = AutoImageProcessor.from_pretrained("{name}")',
        f'classify = pipeline("image-classification", model="{name}")  # the label names of config.json',
        "```",
        "",
    ]
    if TRANSFORMERS_DIR in formats:
        arch = formats[TRANSFORMERS_DIR].get("architecture", "DeiTForImageClassificationWithTeacher")
        lines += [
            f"`{TRANSFORMERS_DIR}/` holds the same student as transformers' native `{arch}` (no timm needed): "
            f'`pipeline("image-classification", model="{name}/{TRANSFORMERS_DIR}")`, or the same Auto classes '
            f"on that folder. Its image processor reproduces timm's eval transform.",
            "",
        ]
    written = [*formats, *(check or {}).get("int8", {})]
    files = [f"`{FORMATS[f].path}` ({f})" for f in written if f not in ("timm", TRANSFORMERS_DIR)]
    if files:
        lines += [f"Also here: {', '.join(files)}; `python -m distill.evaluate <file>` scores any of them.", ""]
    return lines


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def check_lines(check: dict[str, Any] | None) -> list[str]:
    """The card's account of export_check.json: parity and re-validation per format, int8 figures."""
    if not check:
        return []
    reval = check["revalidation"]
    lines = [
        "## Export check",
        "",
        f"Re-validated on {reval['split']}: the student scores {_fmt(reval['student_top1'])} top-1.",
        "",
        "| format | file | size | max abs diff vs PyTorch | top-1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, c in check["formats"].items():
        top1 = reval.get("formats", {}).get(name)
        lines.append(
            f"| {name} | `{c['file']}` | {_mb(c['bytes']) if 'bytes' in c else 'n/a'} | "
            f"{c['max_abs_diff']:.2g} | {_fmt(top1)} |"
        )
    for name, q in check.get("int8", {}).items():
        lines += ["", *int8_lines(name, q)]
    return [*lines, ""]


def int8_lines(name: str, q: dict[str, Any]) -> list[str]:
    heads = ", ".join(q["top1"])
    lat = q["latency_ms"]
    return [
        f"### {name}",
        "",
        f"`{q['file']}`: calibrated on {q['calibration_images']} training images (seed {q['calibration_seed']}, "
        f"eval transform). Heads compared: {heads}{q.get('heads_note', '')}.",
        "",
        "| | fp32 | int8 |",
        "| --- | --- | --- |",
        *[
            f"| top-1 {h} | {_fmt(t['fp32'])} | {_fmt(t['int8'])} (drop {t['drop_points']:.2f} points) |"
            for h, t in q["top1"].items()
        ],
        f"| agreement with fp32 (argmax) | | {_fmt(q['agreement_with_fp32'])} |",
        f"| file size | {_mb(q['fp32_bytes'])} | {_mb(q['bytes'])} ({q['size_ratio']:.2f}x) |",
        *[
            f"| CPU latency, batch {b} (median of {v['repeats']}) | {v['fp32']:.3g} ms | {v['int8']:.3g} ms "
            f"({v['ratio']:.2f}x) |"
            for b, v in lat.items()
        ],
        "",
        f"Allowed drop: {q['max_top1_drop_points']} points; {'passed' if q['ok'] else 'FAILED'}.",
    ]


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
    from distill.recipe.schema import recipe_to_dict
    from distill.run.tracking import package_versions

    return {
        "name": name,
        "architecture": model.pretrained_cfg.get("architecture", recipe.student.model),
        "num_classes": num_classes,
        "teacher": summary.get("teacher"),
        "student_init": summary.get("student_init"),
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
    """The timm Hub folder with its model card, written atomically; its config.json also loads in
    transformers (export_formats.write_timm)."""
    from distill.exports.formats import write_timm

    return write_timm(model, out_dir, model_args, class_names, model_card(card_info))


def reload_max_diff(model: nn.Module, export_dir: Path, images: torch.Tensor) -> float:
    """Load the export through timm alone and compare its fused logits with ``model``'s."""
    from distill.exports.formats import load_timm

    reloaded = load_timm(export_dir)
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
    from distill.data.pipeline import eval_transform
    from distill.models.spec import InputSpec
    from distill.models.student import student_model_args

    card = card_info(
        recipe.run.name, student, recipe, split.num_classes, summary, summary["data"], summary["epochs"], "last"
    )
    why = timm_unloadable(student)
    args = student_model_args(recipe.student, split.num_classes)
    if why is not None:
        card["not_loadable_by_timm"] = why
        # config.json records the stem in words: its module cannot be written as a timm argument.
        args["embed_layer"] = f"HybridEmbed over {recipe.student.stem} ({recipe.student.stem_stages} stages): distill"
    export_timm(student, out, args, split.class_names, card)
    if why is not None:  # the weights and card are written; a timm reload would build another model
        return {"path": str(out), "reload_max_abs_diff": None, "timm_loadable": False, "why": why}
    eval_tf = eval_transform(InputSpec.from_timm(student.pretrained_cfg))
    probe = torch.stack([eval_tf(split.val[i]["image"].convert("RGB")) for i in range(min(8, len(split.val)))])
    diff = reload_max_diff(student.cpu(), out, probe)
    student.to(device)
    return {"path": str(out), "reload_max_abs_diff": diff, "timm_loadable": True}


def timm_unloadable(student: nn.Module) -> str | None:
    """Why ``timm.create_model("local-dir:...")`` cannot rebuild this student, or None when it can."""
    if hasattr(student.patch_embed, "backbone"):
        return (
            "a hybrid student (student.stem): timm's config.json names an architecture and keyword "
            "arguments, and cannot name the CNN backbone of its patch embedding, so timm alone would "
            "build a plain ViT; load it with distill (distill.artifacts.load_artifact on the run)"
        )
    return None


# ---------------------------------------------------------------------------------------------
# python -m distill.export: formats, head choice, parity checks, re-validation and int8

DEFAULT_CALIBRATION_IMAGES = 256  # ONNX Runtime's guide: a few hundred representative inputs
DEFAULT_MAX_TOP1_DROP = 1.0  # points of validation top-1 an int8 model may lose against fp32
PROBE_IMAGES = 16  # real validation images for the parity checks
LATENCY_REPEATS = {1: 50, 32: 10}  # batch size -> timed repetitions (median), fp32 and int8 alternating
INT8_HEADS_NOTE = " (the ONNX graph has one output, the fused logits, or with --head cls|dist that head's)"


def resolve_formats(formats: list[str]) -> list[str]:
    """timm first (always written), then the others in the order given; onnx-int8 brings the fp32
    ONNX it is quantized from and compared with."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise DistillError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    wanted = ["timm", *formats]
    if "onnx-int8" in wanted and "onnx" not in wanted:
        wanted.insert(wanted.index("onnx-int8"), "onnx")
    return list(dict.fromkeys(wanted))


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


def run_export(
    run_dir: Path,
    checkpoint: str,
    ema: bool,
    head: str,
    formats: list[str],
    out: Path,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    max_top1_drop: float = DEFAULT_MAX_TOP1_DROP,
    latency: bool = True,
) -> dict[str, Any]:
    """Export one checkpoint of a run and prove the export: parity, re-validation, int8 figures.

    Every refusal that needs no export (a missing package, a student transformers cannot hold, a
    calibration sample larger than the training split) comes before anything is written."""
    from distill.data.sources import load_source
    from distill.exports.artifacts import load_checkpoint_student, resolve_checkpoint
    from distill.exports.formats import transformers_problem
    from distill.models.student import student_model_args
    from distill.run.rundir import RunDir

    wanted, formats = formats, resolve_formats(formats)
    for name in dict.fromkeys([*wanted, *formats]):  # what the user asked for is named first
        require(FORMATS[name], f"--format {name}")
    loaded = load_checkpoint_student(run_dir, resolve_checkpoint(run_dir, checkpoint), ema)
    recipe = loaded.recipe
    split = load_source(recipe.data)
    if "onnx-int8" in formats and not 1 <= calibration_images <= len(split.train):
        raise ExportError(
            f"--calibration-images {calibration_images}: the training split has {len(split.train)} images; "
            f"choose between 1 and {len(split.train)}"
        )
    model = select_head(loaded.model, head)
    if TRANSFORMERS_DIR in formats and (problem := transformers_problem(model)):
        raise ExportError(f"--format transformers cannot represent this student exactly: {problem}")
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

    images = val_images(split, loaded.spec, PROBE_IMAGES)
    check: dict[str, Any] = {"checkpoint": str(loaded.checkpoint), "ema": ema, "head": head}
    check["formats"] = write_formats(model, out, formats, split.class_names, loaded.spec, images)
    check["revalidation"], ours = revalidate(loaded, head, ema, out, formats, split)
    if "onnx-int8" in formats:
        from distill.data.pipeline import data_seed

        sample = calibration_sample(split.train, loaded.spec, calibration_images, data_seed(recipe))
        probe = val_images(split, loaded.spec, max(LATENCY_REPEATS)) if latency else None
        q = check_onnx_int8(out, sample, split, ours, head, probe, recipe.eval.batch_size)
        q.update(calibration_seed=data_seed(recipe), max_top1_drop_points=max_top1_drop)
        q["ok"] = q["top1"]["fused"]["drop_points"] <= max_top1_drop
        check["int8"] = {"onnx-int8": q}
    (out / "export_check.json").write_text(json.dumps(check, indent=1))
    (out / "README.md").write_text(model_card(card, check))
    _raise_on_failures(check, out)
    return check


def val_images(split: Any, spec: Any, n: int) -> torch.Tensor:
    """The first ``n`` validation images through the eval transform (repeated when fewer)."""
    from distill.data.pipeline import eval_transform

    tf = eval_transform(spec)
    return torch.stack([tf(split.val[i % len(split.val)]["image"].convert("RGB")) for i in range(n)])


def calibration_sample(train: Any, spec: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` training images drawn without replacement by ``seed``, through the eval transform
    (what the model sees at inference, so the activation ranges are the deployed ones)."""
    from distill.data.pipeline import eval_transform

    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    tf = eval_transform(spec)
    return torch.stack([tf(train[int(i)]["image"].convert("RGB")) for i in order])


def write_formats(
    model: nn.Module, out: Path, formats: list[str], class_names: list[str], spec: Any, images: torch.Tensor
) -> dict[str, Any]:
    """Each fp32 format written and compared with the PyTorch student on ``images``."""
    from distill.exports.formats import write_onnx, write_torchscript, write_transformers

    checks: dict[str, Any] = {}
    for name in formats:
        path = out / FORMATS[name].path
        if name == "timm":
            diff = reload_max_diff(model, out, images)
            weights = out / "model.safetensors"
            checks[name] = {"file": weights.name, "bytes": weights.stat().st_size, "max_abs_diff": diff}
            checks[name].update(ok=diff == 0.0, checked_images=len(images))
        elif name == "onnx":
            checks[name] = write_onnx(model, path, images)
        elif name == "torchscript":
            checks[name] = write_torchscript(model, path, images)
        elif name == TRANSFORMERS_DIR:
            checks[name] = write_transformers(model, path, class_names, spec, out.name, images)
    return checks


def artifact_path(out: Path, name: str) -> Path:
    """What ``distill.evaluate`` is given for format ``name`` of export folder ``out``."""
    return out if name == "timm" else out / FORMATS[name].path


def revalidate(
    loaded: Any, head: str, ema: bool, out: Path, formats: list[str], split: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every fp32 format, loaded as ``distill.evaluate`` loads it (its own preprocessing), must
    score exactly the student's top-1 on the validation split, and the student what the run logged.
    Returns the figures and the student's scores (with per-image predictions, for int8)."""
    from distill.exports.artifacts import load_artifact, score

    cpu, batch = torch.device("cpu"), loaded.recipe.eval.batch_size
    ours = score(loaded, split.val, batch, device=cpu, predictions=True)
    top1 = {
        name: score(load_artifact(artifact_path(out, name)), split.val, batch, device=cpu)["top1_fused"]
        for name in formats
        if name != "onnx-int8"
    }
    figures = {
        "split": f"val ({split.val_origin}, {len(split.val)} images)",
        "student_top1": ours[f"top1_{head}"],
        "export_top1": top1["timm"],
        "run_logged_top1": _run_metric(loaded, head, ema),
        "formats": top1,
    }
    return figures, ours


def check_onnx_int8(
    out: Path, sample: torch.Tensor, split: Any, ours: dict[str, Any], head: str, probe: torch.Tensor | None,
    batch: int,
) -> dict[str, Any]:  # fmt: skip
    """Quantize model.onnx, then score the int8 model on the validation split against the fp32
    student (top-1, argmax agreement), and compare sizes and CPU latency with the fp32 ONNX."""
    from distill.exports.artifacts import load_artifact, score
    from distill.exports.formats import OnnxClassifier, write_onnx_int8

    fp32_path, path = out / FORMATS["onnx"].path, out / FORMATS["onnx-int8"].path
    q = write_onnx_int8(fp32_path, path, sample)
    int8 = score(load_artifact(path), split.val, batch, device=torch.device("cpu"), predictions=True)
    before, after = ours[f"top1_{head}"], int8["top1_fused"]
    agree = (int8["predictions"]["fused"] == ours["predictions"][head]).double().mean().item()
    q.update(
        heads_note=INT8_HEADS_NOTE,
        top1={"fused": {"fp32": before, "int8": after, "drop_points": 100 * (before - after)}},
        agreement_with_fp32=agree,
        fp32_bytes=fp32_path.stat().st_size,
        size_ratio=q["bytes"] / fp32_path.stat().st_size,
        latency_ms={},
    )
    if probe is not None:
        q["latency_ms"] = compare_latency(OnnxClassifier(fp32_path, 0), OnnxClassifier(path, 0), probe)
    return q


@torch.no_grad()
def compare_latency(fp32: nn.Module, int8: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Median CPU latency (ms) per batch size, the two models alternating so that a busy machine
    slows both alike; two warm-up calls each first."""
    figures: dict[str, Any] = {}
    for batch, repeats in LATENCY_REPEATS.items():
        x = images[:batch].contiguous()
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for model in (fp32, int8, fp32, int8):
            model(x)
        for _ in range(repeats):
            for name, model in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
        med = {name: 1000 * statistics.median(t) for name, t in times.items()}
        figures[str(batch)] = {**med, "ratio": med["int8"] / med["fp32"], "repeats": repeats}
    return figures


def _raise_on_failures(check: dict[str, Any], out: Path) -> None:
    """Parity, then re-validation, then the int8 drop: one message naming what failed."""
    bad = [f for f, c in check["formats"].items() if not c["ok"]]
    if bad:
        raise ExportError(
            f"export parity failed for {', '.join(bad)} (tolerance {PARITY_TOL}); see {out}/export_check.json"
        )
    r = check["revalidation"]
    wrong = {f: t for f, t in r["formats"].items() if t != r["student_top1"]}
    if wrong or (r["run_logged_top1"] is not None and r["run_logged_top1"] != r["student_top1"]):
        raise ExportError(
            f"re-validation mismatch: student top-1 {r['student_top1']}, run logged {r['run_logged_top1']}, "
            f"formats that differ: {wrong or 'none'}; see {out}/export_check.json"
        )
    for name, q in check.get("int8", {}).items():
        if q["ok"]:
            continue
        (out / q["file"]).unlink(missing_ok=True)
        t = q["top1"]["fused"]
        raise ExportError(
            f"{name}: fused top-1 dropped {t['drop_points']:.2f} points under int8 ({100 * t['fp32']:.2f}% fp32 -> "
            f"{100 * t['int8']:.2f}% int8), more than --max-top1-drop {q['max_top1_drop_points']}; {q['file']} was "
            f"removed, the fp32 files stay in {out} (figures in export_check.json). Calibrate on more images "
            "(--calibration-images) or allow a larger drop"
        )


def int8_top1(
    run_dir: Path, checkpoint: str = "last", ema: bool = False, calibration_images: int = DEFAULT_CALIBRATION_IMAGES
) -> dict[str, float]:
    """A run's student quantized as ``--format onnx-int8`` does and scored on its validation
    split, nothing kept: fp32 and int8 fused top-1, the drop in points and the argmax agreement
    (for the study report)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        check = run_export(
            Path(run_dir), checkpoint, ema, "fused", ["onnx-int8"], Path(tmp) / "export", calibration_images,
            max_top1_drop=float("inf"), latency=False,
        )  # fmt: skip
    q = check["int8"]["onnx-int8"]
    t = q["top1"]["fused"]
    return {
        "top1_fp32": t["fp32"],
        "top1_int8": t["int8"],
        "drop_points": t["drop_points"],
        "agreement_with_fp32": q["agreement_with_fp32"],
    }
