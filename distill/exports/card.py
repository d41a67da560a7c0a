"""The model card (README.md of an export folder): the run's provenance and results and, after
``python -m distill.export``, what the export checks measured (check_record.ExportCheck)."""

from __future__ import annotations

from typing import Any

import yaml
from torch import nn

from distill.exports.check_record import ExportCheck, Int8Check
from distill.exports.formats import FORMATS, TRANSFORMERS_DIR


def _fmt(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) else "n/a"


HEAD_WORDS = {"cls": "class", "dist": "distillation"}


def model_card(info: dict[str, Any], check: ExportCheck | None = None) -> str:
    """A Hub model card (timm's front matter) carrying the run's provenance and, after
    ``python -m distill.export``, what its checks measured."""
    teacher = info.get("teacher") or {}
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
        *head_lines(info.get("head", "fused")),
        *_distillation_lines(info, teacher),
        *_data_lines(info),
        *_results_lines(info.get("final", {})),
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


def head_lines(head: str) -> list[str]:
    """What the model's output is: the fused heads, or the one head an export kept."""
    rgb = (
        'Feed RGB images (`Image.open(path).convert("RGB")`): the student takes 3 channels, grayscale '
        "data too, and timm's transform does not convert them."
    )
    if head == "fused":
        return [f"At inference the class and distillation heads are fused (mean of their logits). {rgb}", ""]
    kept, other = HEAD_WORDS[head], HEAD_WORDS["dist" if head == "cls" else "cls"]
    return [
        f"This export keeps the {kept} head only: its output is the {kept} head's logits, not the fused "
        f"heads'. In the timm folder the {kept} head's weights are doubled and the {other} head's are zero, "
        f"so that timm's mean of the two is exactly the {kept} head; the {other} head is not a head of this "
        f"model and `python -m distill.evaluate` reports the {kept} head only. The validation results below "
        f"are the run's, for every head. {rgb}",
        "",
    ]


def _distillation_lines(info: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    dist = info["distillation"]
    return [
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
    ]


def _data_lines(info: dict[str, Any]) -> list[str]:
    data = info["data"]
    return [
        "## Data and training",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| data source | {data['source']} {data.get('path') or ''} |",
        f"| train / val images | {data['train_size']} / {data['val_size']} (val from: {data['val_origin']}) |",
        f"| classes | {info['num_classes']} |",
        f"| epochs | {info['epochs']}{_epochs_note(info)} |",
        f"| weights exported | {info.get('weights', 'last')} |",
        f"| initialised from | {init_text(info.get('student_init'))} |",
        "",
    ]


def _results_lines(final: dict[str, Any]) -> list[str]:
    kl = final.get("val/kl")
    return [
        "## Validation results",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| top-1 class head | {_fmt(final.get('val/top1_cls'))} |",
        f"| top-1 distillation head | {_fmt(final.get('val/top1_dist'))} |",
        f"| top-1 fused | {_fmt(final.get('val/top1_fused'))} |",
        f"| top-5 fused | {_fmt(final.get('val/top5_fused'))} |",
        f"| agreement with teacher | {_fmt(final.get('val/agreement'))} |",
        f"| KL(teacher ‖ fused student), τ=1 | {f'{kl:.4g}' if type(kl) is float else 'n/a'} |",
        "",
    ]


def init_text(init: dict[str, Any] | None) -> str:
    """Where the student's weights came from (student.init), for the card and the report."""
    if not init:
        return "random initialisation"
    top1 = init.get("recorded_top1")
    scored = f", recorded fused top-1 {100 * top1:.2f}%" if isinstance(top1, float) else ""
    return f"`{init['path']}` ({init['source']}, sha256 `{init['sha256'][:16]}`{scored})"


def usage_lines(name: str, check: ExportCheck | None) -> list[str]:
    """How to load the folder with timm and with transformers (and the other formats written)."""
    formats = check.formats if check else {}
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
        arch = formats[TRANSFORMERS_DIR].architecture or "DeiTForImageClassificationWithTeacher"
        lines += [
            f"`{TRANSFORMERS_DIR}/` holds the same student as transformers' native `{arch}` (no timm needed): "
            f'`pipeline("image-classification", model="{name}/{TRANSFORMERS_DIR}")`, or the same Auto classes '
            f"on that folder. Its image processor reproduces timm's eval transform.",
            "",
        ]
    written = [*formats, *(check.int8 if check else {})]
    files = [f"`{FORMATS[f].path}` ({f})" for f in written if f not in ("timm", TRANSFORMERS_DIR)]
    if files:
        lines += [f"Also here: {', '.join(files)}; `python -m distill.evaluate <file>` scores any of them.", ""]
    return lines


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MB"


def check_lines(check: ExportCheck | None) -> list[str]:
    """The card's account of the export check: parity and re-validation per format, int8 figures."""
    if not check:
        return []
    reval = check.revalidation
    lines = [
        "## Export check",
        "",
        f"Re-validated on {reval.split}: the student scores {_fmt(reval.student_top1)} top-1. {run_words(check)}",
        "",
        "| format | file | size | max abs diff vs PyTorch | top-1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, c in check.formats.items():
        top1 = reval.formats.get(name)
        lines.append(f"| {name} | `{c.file}` | {_mb(c.bytes)} | {c.max_abs_diff:.2g} | {_fmt(top1)} |")
    for name, q in check.int8.items():
        lines += ["", *int8_lines(name, q)]
    return [*lines, ""]


def run_words(check: ExportCheck) -> str:
    """How the re-validated top-1 compares with the run's logged one, and by which rule."""
    reval, run = check.revalidation, check.revalidation.run
    if reval.run_logged_top1 is None:
        return "The run logged no evaluation at this checkpoint."
    if run.rule == "exact":
        return f"The run logged {_fmt(reval.run_logged_top1)}, measured the same way; they must be equal."
    return (
        f"The run logged {_fmt(reval.run_logged_top1)} in {run.run_setting}; re-validation runs in "
        f"{run.revalidation_setting}, where argmax flips move top-1 by whole images: {run.difference_images} "
        f"image(s) apart, allowed {run.tolerance_images} (one image, or the {run.measured_flips} flip(s) "
        "measured between the two settings here, whichever is more)."
    )


def int8_lines(name: str, q: Int8Check) -> list[str]:
    return [
        f"### {name}",
        "",
        f"`{q.file}`: calibrated on {q.calibration_images} training images (seed {q.calibration_seed}, "
        f"eval transform). Heads compared: {', '.join(q.top1)}{q.heads_note}.",
        "",
        "| | fp32 | int8 |",
        "| --- | --- | --- |",
        *[
            f"| top-1 {h} | {_fmt(t.fp32)} | {_fmt(t.int8)} (drop {t.drop_points:.2f} points) |"
            for h, t in q.top1.items()
        ],
        f"| agreement with fp32 (argmax) | | {_fmt(q.agreement_with_fp32)} |",
        f"| file size | {_mb(q.fp32_bytes)} | {_mb(q.bytes)} ({q.size_ratio:.2f}x) |",
        *[
            f"| CPU latency, batch {b} (median of {v.repeats}) | {v.fp32:.3g} ms | {v.int8:.3g} ms "
            f"({speed_words(v.ratio)}) |"
            for b, v in q.latency_ms.items()
        ],
        "",
        f"Allowed drop: {q.max_top1_drop_points} points; {'passed' if q.ok else 'FAILED'}.",
    ]


def speed_words(ratio: float) -> str:
    """int8 / fp32 latency in words: "int8 is 1.18x slower", "int8 is 1.30x faster"."""
    if ratio > 1:
        return f"int8 is {ratio:.2f}x slower"
    if ratio < 1:
        return f"int8 is {1 / ratio:.2f}x faster"
    return "int8 is as fast as fp32"


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
