"""ONNX, fp32 and int8: the writers and the reloader (an ONNX Runtime session as a module)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.exports.formats import FORMATS, file_size, parity, quiet_tracer, require


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session as a module: pixel values in, the graph's one output (the fused
    logits, or with ``--head cls|dist`` that head's) out, on the input's device. It runs on the CPU."""

    output_heads: tuple[str, ...] = ("fused",)

    def __init__(self, path: Path, num_classes: int) -> None:
        super().__init__()
        require(FORMATS["onnx"], f"reading {path}")
        import onnxruntime as ort

        self.path = Path(path)
        self.num_classes = num_classes
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"pixel_values": x})[0]).to(images.device)


def write_onnx(model: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    """ONNX with a dynamic batch axis (TorchScript-based exporter: the dynamo one needs onnxscript),
    checked in ONNX Runtime against PyTorch on ``images``."""
    require(FORMATS["onnx"], "--format onnx")
    with quiet_tracer():
        torch.onnx.export(
            model.eval(), (images,), str(path), dynamo=False, opset_version=17,
            input_names=["pixel_values"], output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    return parity(model, OnnxClassifier(path, 0), path, images)


class CalibrationReader:
    """ONNX Runtime's calibration data reader: ``images`` in batches."""

    def __init__(self, images: torch.Tensor, batch_size: int = 32) -> None:
        self._batches: Iterator[torch.Tensor] = iter(images.split(batch_size))

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"pixel_values": batch.contiguous().numpy()}


def write_onnx_int8(fp32_path: Path, path: Path, calibration: torch.Tensor) -> dict[str, Any]:
    """Static int8 quantization of the fp32 ONNX student with ONNX Runtime: QDQ format, weights
    int8 per output channel, activations uint8, ranges (min-max) from ``calibration``, a batch of
    training images through the eval transform. Pre-processing (shape inference, graph
    optimisation) first, as ONNX Runtime's quantization guide asks.

    Every op type ONNX Runtime can quantize is quantized (its default). Measured on the quickstart
    and smoke students (README): quantizing only MatMul/Gemm/Conv gave the quickstart +0.3 points
    but put the smoke student at chance (25% against 65% fp32, per-tensor or per-channel,
    min-max or entropy ranges), while the default kept it within 2.5 points."""
    require(FORMATS["onnx-int8"], "--format onnx-int8")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = path.with_name(path.stem + ".prep.onnx")
    quiet = _DropMessages("Axis 1 is out-of-range for weight")  # 1-D LayerNorm weights: per-tensor instead
    logging.getLogger().addFilter(quiet)
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared), str(path), CalibrationReader(calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    finally:
        logging.getLogger().removeFilter(quiet)
        prepared.unlink(missing_ok=True)
    return {"file": path.name, "bytes": file_size(path), "calibration_images": len(calibration)}


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with ``prefix`` (ONNX Runtime's quantizer warns on
    the root logger for every layer norm it cannot quantize per channel)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)
