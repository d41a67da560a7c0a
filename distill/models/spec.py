"""What a model is fed: its input size, normalisation, eval crop and interpolation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: replaces timm's untyped ``data_config`` dict inside distill."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float  # eval: resize to size / crop_pct, then centre-crop
    interpolation: str

    @classmethod
    def from_timm(cls, data_config: dict[str, Any]) -> InputSpec:
        _, h, w = data_config["input_size"]
        return cls(
            (int(h), int(w)),
            tuple(float(v) for v in data_config["mean"]),  # type: ignore[arg-type]
            tuple(float(v) for v in data_config["std"]),  # type: ignore[arg-type]
            float(data_config.get("crop_pct", 0.875)),
            str(data_config.get("interpolation", "bicubic")),
        )

    def timm_config(self) -> dict[str, Any]:
        """timm's form: for ``create_transform`` and a model's ``pretrained_cfg`` (exports)."""
        return {
            "input_size": (3, *self.size),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }
