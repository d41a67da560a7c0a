"""timm's Hub folder: the writer, the reloader, and what a file format of the folder reads from it.

``config.json`` (architecture, model arguments, classes, label names, the preprocessing in
``pretrained_cfg``), ``model.safetensors`` and ``README.md``. It loads offline with
``timm.create_model("local-dir:<dir>", pretrained=True)`` and with transformers'
``AutoModelForImageClassification`` (its TimmWrapper). ONNX and TorchScript files record no
preprocessing, class names or head: they take them from the folder's ``config.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distill.exports.formats import ExportError
from distill.models.spec import InputSpec

# config.json key naming the head whose logits the folder's models give ("cls", "dist" or
# "fused"); absent means fused. timm and transformers ignore root keys they do not know.
HEAD_KEY = "distill_head"


def write_timm(
    model: nn.Module, out_dir: Path, model_args: dict[str, Any], class_names: list[str], card: str, head: str = "fused"
) -> Path:
    """timm's Hub folder, written atomically (temporary name, then rename)."""
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(
        model, str(tmp), model_config={"label_names": list(class_names), HEAD_KEY: head}, model_args=model_args,
        safe_serialization=True,
    )  # fmt: skip
    _drop_model_args_num_classes(tmp / "config.json")
    (tmp / "README.md").write_text(card)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _drop_model_args_num_classes(config_file: Path) -> None:
    """transformers' TimmWrapper builds the model as create_model(arch, num_classes=num_labels,
    **model_args): a num_classes inside model_args (timm 1.0.31's save_for_hf records one) fails
    with "got multiple values for keyword argument 'num_classes'". The root-level num_classes
    stays: timm copies it into pretrained_cfg and builds both heads from it (a timm load that sees
    no num_classes at all silently re-initialises head and head_dist), and transformers reads it
    as num_labels."""
    config = json.loads(config_file.read_text())
    if config.get("num_classes") is None:
        raise ExportError(f"{config_file} records no root-level num_classes; timm could not rebuild the heads")
    config.get("model_args", {}).pop("num_classes", None)
    config_file.write_text(json.dumps(config, indent=2))


def load_timm(folder: Path) -> nn.Module:
    import timm

    return timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()


def timm_folder_config(folder: Path) -> dict[str, Any] | None:
    """The folder's config.json when it is a timm Hub config (architecture + pretrained_cfg)."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return config if "architecture" in config and "pretrained_cfg" in config else None


def folder_head(config: dict[str, Any]) -> str:
    """The head a timm folder's models give: ``--head`` at export time."""
    return str(config.get(HEAD_KEY) or "fused")


@dataclass(frozen=True)
class FolderInfo:
    """What a file format (ONNX, TorchScript) takes from its export folder's config.json."""

    spec: InputSpec
    class_names: list[str] | None
    num_classes: int
    head: str


def folder_info(folder: Path, what: str) -> FolderInfo:
    """A timm export folder's preprocessing, class names, class count and head, for a file format
    that lives in it and records none of its own."""
    config = timm_folder_config(folder)
    if config is None:
        raise ExportError(
            f"{what} is read with the preprocessing of its export folder, but {folder} has no timm "
            "config.json; keep the file in the folder distill.export wrote"
        )
    cfg = config["pretrained_cfg"]
    num_classes = int(config.get("num_classes", cfg.get("num_classes")))
    names = config.get("label_names") or cfg.get("label_names")
    return FolderInfo(InputSpec.from_timm(cfg), list(names) if names else None, num_classes, folder_head(config))
