"""The export formats: their names, files and packages, and the parity check every writer runs.

An export folder holds timm's Hub layout and, next to it, the other formats a user asked for:

    config.json, model.safetensors, README.md   timm (also loads in transformers through TimmWrapper)
    model.onnx                                   ONNX fp32, dynamic batch axis
    model.int8.onnx                              ONNX int8: static QDQ, calibrated on training images
    model.torchscript.pt                         TorchScript (traced)
    transformers/                                transformers' native DeiT (or ViT) with its image processor
    export_check.json                            the proof (check_record.ExportCheck)

Each format has one writer and one reloader (timm_format, onnx_format, torchscript_format,
transformers_format). A reloader gives back an ``nn.Module`` whose call returns the exported
logits (``num_classes`` set; ``output_heads`` naming the heads it reports and ``forward_heads``
where the format keeps the class and distillation heads apart), so export checks and
``distill.evaluate`` measure every format with the same code.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError

PARITY_TOL = 1e-4  # max |exported - PyTorch| on real validation images (fp32)
TRANSFORMERS_DIR = "transformers"
HEADS = ("fused", "cls", "dist")  # --head: the fused mean of the two heads, or one of them


class ExportError(DistillError):
    """An export cannot be written or read back, or fails its checks."""


class MissingPackageError(ExportError):
    """A format's optional package is not installed."""


@dataclass(frozen=True)
class Format:
    name: str  # the --format value
    path: str  # file or sub-folder inside the export folder
    modules: tuple[str, ...]  # importable packages it needs (pip names are the same)
    extra: str | None  # pip install 'distill[<extra>]' brings them


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("timm", "config.json", (), None),
        Format("onnx", "model.onnx", ("onnx", "onnxruntime"), "export"),
        Format("onnx-int8", "model.int8.onnx", ("onnx", "onnxruntime"), "export"),
        Format("torchscript", "model.torchscript.pt", (), None),
        Format(TRANSFORMERS_DIR, TRANSFORMERS_DIR, ("transformers",), "hf"),
    )
}


def require(fmt: Format, purpose: str) -> None:
    """Import ``fmt``'s packages or say which extra brings them (``purpose``: what needed them)."""
    for module in fmt.modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingPackageError(
                f"{purpose} needs the '{module}' package, which is not installed: pip install "
                f"'distill[{fmt.extra}]'  (or pip install {module})"
            ) from None


def file_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    return float((a(images) - b(images)).abs().max())


def parity(reference: nn.Module, reloaded: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """A written format against the PyTorch student on ``images``: the largest logit difference."""
    diff = max_diff(reference.eval(), reloaded, images)
    return {
        "file": path.name,
        "bytes": file_size(path),
        "max_abs_diff": diff,
        "ok": diff <= PARITY_TOL,
        "checked_images": len(images),
    }


@contextmanager
def quiet_tracer() -> Iterator[None]:
    """No TracerWarnings while tracing the student. timm's ViT converts shapes to Python values
    (the patch grid, the sequence length) and the tracer warns that they are fixed in the trace;
    they are fixed by the export's image size, and the parity check on real images proves the
    traced model, so there is nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield
