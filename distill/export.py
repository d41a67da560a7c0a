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
        "At inference the class and distillation heads are fused (mean of their logits).",
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
        f"| epochs | {info['epochs']} |",
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
        f"| KL(teacher ‖ student) | {final.get('val/kl', 'n/a')} |",
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


def read_export_config(export_dir: Path) -> dict[str, Any]:
    return json.loads((Path(export_dir) / "config.json").read_text())
