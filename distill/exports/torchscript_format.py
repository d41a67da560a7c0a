"""TorchScript (traced): the writer and the reloader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.exports.formats import ExportError, parity, quiet_tracer


class TorchScriptClassifier(nn.Module):
    output_heads: tuple[str, ...] = ("fused",)

    def __init__(self, path: Path, num_classes: int) -> None:
        super().__init__()
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as exc:
            raise ExportError(f"{path} is not a TorchScript file distill.export wrote ({exc})".split("\n")[0]) from None
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def write_torchscript(model: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    model = model.eval()
    with torch.no_grad(), quiet_tracer():
        torch.jit.trace(model, (images,)).save(str(path))
    return parity(model, TorchScriptClassifier(path, 0), path, images)
