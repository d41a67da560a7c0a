"""One writer and one reloader per export format.

An export folder holds timm's Hub layout and, next to it, the other formats a user asked for:

    config.json, model.safetensors, README.md   timm (also loads in transformers through TimmWrapper)
    model.onnx                                   ONNX fp32, dynamic batch axis
    model.int8.onnx                              ONNX int8: static QDQ, calibrated on training images
    model.torchscript.pt                         TorchScript (traced)
    transformers/                                transformers' native DeiT (or ViT) with its image processor
    export_check.json                            the proof (export.py writes it)

A writer turns the PyTorch student into its format; a reloader gives back an ``nn.Module`` whose
call returns the fused logits (``num_classes`` set; ``output_heads`` and ``forward_heads`` where
the format keeps the class and distillation heads apart), so export checks and
``distill.evaluate`` measure every format with the same code. The preprocessing of a file format
comes from its export folder's ``config.json``; the transformers folder's from its own
``preprocessor_config.json``.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.models.spec import InputSpec

PARITY_TOL = 1e-4  # max |exported - PyTorch| on real validation images (fp32)
TRANSFORMERS_DIR = "transformers"


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


def _file_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, images: torch.Tensor) -> float:
    return float((a(images) - b(images)).abs().max())


def parity(reference: nn.Module, reloaded: nn.Module, path: Path, images: torch.Tensor) -> dict[str, Any]:
    diff = max_diff(reference.eval(), reloaded, images)
    return {
        "file": path.name,
        "bytes": _file_size(path),
        "max_abs_diff": diff,
        "ok": diff <= PARITY_TOL,
        "checked_images": len(images),
    }


# ---------------------------------------------------------------------------------------------
# timm Hub folder


def write_timm(model: nn.Module, out_dir: Path, model_args: dict[str, Any], class_names: list[str], card: str) -> Path:
    """timm's Hub folder, written atomically (temporary name, then rename)."""
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(
        model, str(tmp), model_config={"label_names": list(class_names)}, model_args=model_args,
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


def folder_spec_and_names(folder: Path, what: str) -> tuple[InputSpec, list[str] | None, int]:
    """A timm export folder's preprocessing, class names and class count, for a file format
    (ONNX, TorchScript) that lives in it and records none of its own."""
    config = timm_folder_config(folder)
    if config is None:
        raise ExportError(
            f"{what} is read with the preprocessing of its export folder, but {folder} has no timm "
            "config.json; keep the file in the folder distill.export wrote"
        )
    cfg = config["pretrained_cfg"]
    num_classes = int(config.get("num_classes", cfg.get("num_classes")))
    names = config.get("label_names") or cfg.get("label_names")
    return InputSpec.from_timm(cfg), (list(names) if names else None), num_classes


# ---------------------------------------------------------------------------------------------
# ONNX (fp32 and int8) and TorchScript


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session as a module: pixel values in, the graph's one output (the fused
    logits) out, on the input's device. It runs on the CPU."""

    output_heads = ("fused",)

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
    return {"file": path.name, "bytes": _file_size(path), "calibration_images": len(calibration)}


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with ``prefix`` (ONNX Runtime's quantizer warns on
    the root logger for every layer norm it cannot quantize per channel)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-call progress bars from transformers' weight loading and saving."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class TorchScriptClassifier(nn.Module):
    output_heads = ("fused",)

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
    with torch.no_grad():
        torch.jit.trace(model, (images,)).save(str(path))
    return parity(model, TorchScriptClassifier(path, 0), path, images)


# ---------------------------------------------------------------------------------------------
# transformers' native DeiT


PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def transformers_problem(model: nn.Module) -> str | None:
    """Why transformers' DeiT/ViT classes cannot hold this student exactly, or None."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return f"it is a {type(model).__name__}, not a timm VisionTransformer"
    embed = model.patch_embed
    if hasattr(embed, "backbone"):
        return (
            "its stem is a hybrid (a CNN backbone before the patch embedding); transformers' DeiT embeds "
            "patches with one convolution"
        )
    size, patch = tuple(embed.img_size), tuple(embed.patch_size)
    if size[0] != size[1] or patch[0] != patch[1]:
        return (
            f"its image size {size[0]}x{size[1]} with {patch[0]}x{patch[1]} patches is not square; transformers' "
            "DeiT image processor and position-embedding layout assume a square image and grid"
        )
    checks = {
        "register tokens": model.num_reg_tokens > 0,
        "position embeddings without class-token slots (no_embed_class)": model.no_embed_class,
        "no position embeddings or a dynamic image size": model.pos_embed is None or model.dynamic_img_size,
        f"global_pool={model.global_pool!r} (transformers classifies the class token)": model.global_pool != "token",
        "a norm before the blocks or after pooling": not isinstance(model.norm_pre, nn.Identity)
        or not isinstance(model.fc_norm, nn.Identity),
        "a norm inside the patch embedding": not isinstance(embed.norm, nn.Identity),
    }
    for i, block in enumerate(model.blocks):
        act = getattr(getattr(block, "mlp", None), "act", None)
        checks[f"block {i} is not a pre-norm block with exact GELU, no layer scale, no q/k norm"] = not (
            isinstance(act, nn.GELU)
            and act.approximate == "none"
            and hasattr(block.attn, "qkv")
            and all(isinstance(getattr(block, m, None), nn.Identity) for m in ("ls1", "ls2"))
            and all(
                isinstance(getattr(block.attn, m, nn.Identity()), nn.Identity) for m in ("q_norm", "k_norm", "norm")
            )
        )
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    checks[f"layer norms with different eps {sorted(eps)}"] = len(eps) != 1
    found = [what for what, bad in checks.items() if bad]
    return f"it has {'; '.join(found)}" if found else None


def _hf_config(model: nn.Module, class_names: list[str]) -> Any:
    from transformers import DeiTConfig, ViTConfig

    distilled = hasattr(model, "dist_token")
    block = model.blocks[0]
    common = {
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "hidden_act": "gelu",
        "layer_norm_eps": model.norm.eps,  # timm's 1e-6, not transformers' default 1e-12
        "image_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "num_channels": model.patch_embed.proj.in_channels,
        "qkv_bias": block.attn.qkv.bias is not None,
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
    }
    if distilled:
        return DeiTConfig(**common, architectures=["DeiTForImageClassificationWithTeacher"])
    return ViTConfig(**common, architectures=["ViTForImageClassification"])


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """timm -> transformers key map. transformers' DeiT embeds [cls, dist, patches] like timm's
    VisionTransformerDistilled, with one position embedding per token in that order, so the
    tensors copy unchanged; timm's fused qkv projection is split into q, k and v (rows in that
    order, heads contiguous inside each)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    distilled = "dist_token" in sd
    p = "deit" if distilled else "vit"
    out = {
        f"{p}.embeddings.cls_token": sd["cls_token"],
        f"{p}.embeddings.position_embeddings": sd["pos_embed"],
        f"{p}.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{p}.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        f"{p}.layernorm.weight": sd["norm.weight"],
        f"{p}.layernorm.bias": sd["norm.bias"],
    }
    if distilled:
        out[f"{p}.embeddings.distillation_token"] = sd["dist_token"]
    for i in range(len(model.blocks)):
        b, layer = f"blocks.{i}.", f"{p}.layers.{i}."
        renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj"}
        renames.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{layer}{new}.{kind}"] = sd[f"{b}{old}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{b}attn.qkv.{kind}" in sd:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[f"{layer}attention.{name}.{kind}"] = part.contiguous()
    heads = {"cls_classifier": "head", "distillation_classifier": "head_dist"} if distilled else {"classifier": "head"}
    for new, old in heads.items():
        out[f"{new}.weight"], out[f"{new}.bias"] = sd[f"{old}.weight"], sd[f"{old}.bias"]
    return out


def image_processor_config(spec: InputSpec) -> dict[str, Any]:
    """transformers' DeiT image processor doing timm's eval transform: resize the shortest edge
    to floor(size / crop_pct) (timm's formula), centre-crop to size, rescale, normalise."""
    if spec.interpolation not in PIL_RESAMPLE:
        raise ExportError(f"interpolation {spec.interpolation!r} has no PIL resampling filter in transformers")
    h, w = spec.size
    return {
        "do_resize": True,
        "size": {"shortest_edge": math.floor(h / spec.crop_pct)},
        "resample": PIL_RESAMPLE[spec.interpolation],  # bicubic = PIL 3
        "do_center_crop": True,
        "crop_size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "do_convert_rgb": True,
    }


def spec_from_image_processor(cfg: dict[str, Any], where: str) -> InputSpec:
    """The InputSpec that reproduces a DeiT-style preprocessor_config.json (what we write)."""
    size, crop = cfg.get("size") or {}, cfg.get("crop_size") or {}
    if not (cfg.get("do_resize") and cfg.get("do_center_crop") and "shortest_edge" in size and crop):
        raise ExportError(
            f"{where}: distill evaluates a transformers folder whose image processor resizes the shortest "
            "edge and centre-crops (as distill.export writes it); this one does not"
        )
    h, w, short = int(crop["height"]), int(crop["width"]), int(size["shortest_edge"])
    # A crop_pct with floor(h / crop_pct) == short, the resize timm computes from it.
    crop_pct = next(c for c in (h / short, h / (short + 0.5)) if math.floor(h / c) == short)
    names = {v: k for k, v in PIL_RESAMPLE.items()}
    return InputSpec(
        (h, w),
        tuple(float(v) for v in cfg["image_mean"]),  # type: ignore[arg-type]
        tuple(float(v) for v in cfg["image_std"]),  # type: ignore[arg-type]
        crop_pct,
        names[int(cfg.get("resample", 3))],
    )


class TransformersClassifier(nn.Module):
    """A transformers image classifier as a module giving fused logits; a DeiT with teacher also
    gives its class and distillation heads through ``forward_heads``."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        require(FORMATS[TRANSFORMERS_DIR], f"reading {folder}")
        from transformers import AutoModelForImageClassification

        with _quiet_transformers():
            self.hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        self.num_classes = int(self.hf.config.num_labels)
        distilled = type(self.hf).__name__ == "DeiTForImageClassificationWithTeacher"
        self.output_heads = ("cls", "dist", "fused") if distilled else ("fused",)

    def forward_heads(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.hf(pixel_values=images)
        if len(self.output_heads) == 1:
            return {"fused": out.logits}
        return {"cls": out.cls_logits, "dist": out.distillation_logits, "fused": out.logits}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).logits


def transformers_card(name: str, architecture: str) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: image-classification",
            "tags: [image-classification, distillation, deit]",
            "---",
            f"# {name} (transformers)",
            "",
            f"The distilled student as transformers' native `{architecture}` (inference only), converted "
            "from the timm export one folder up (its README.md has the provenance and results).",
            "",
            "```python",
            "from transformers import pipeline",
            f'classify = pipeline("image-classification", model="{TRANSFORMERS_DIR}")',
            'print(classify(Image.open(path).convert("RGB")))',
            "```",
            "",
        ]
    )


def write_transformers(
    model: nn.Module, folder: Path, class_names: list[str], spec: InputSpec, name: str, images: torch.Tensor
) -> dict[str, Any]:
    """transformers' DeiTForImageClassificationWithTeacher (ViTForImageClassification for a
    student without the distillation token: transformers' DeiT always adds one), its image
    processor and a card, written atomically and reloaded through the Auto classes; each head
    must match the student's on ``images``."""
    require(FORMATS[TRANSFORMERS_DIR], "--format transformers")
    problem = transformers_problem(model)
    if problem:
        raise ExportError(f"--format transformers cannot represent this student exactly: {problem}")
    import transformers
    from transformers import DeiTForImageClassificationWithTeacher, DeiTImageProcessorPil, ViTForImageClassification

    config = _hf_config(model, class_names)
    cls = DeiTForImageClassificationWithTeacher if hasattr(model, "dist_token") else ViTForImageClassification
    hf = cls(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"transformers {transformers.__version__} names {cls.__name__}'s weights differently from what distill "
            f"maps (missing {missing[:4]}, unexpected {unexpected[:4]}); use the pinned transformers version"
        )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        hf.save_pretrained(str(tmp))
    # Written from the PIL class; saved as DeiTImageProcessor, which AutoImageProcessor picks a backend for.
    DeiTImageProcessorPil(**image_processor_config(spec)).save_pretrained(str(tmp))
    (tmp / "README.md").write_text(transformers_card(name, cls.__name__))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return _transformers_parity(model, TransformersClassifier(folder), folder, cls.__name__, images)


@torch.no_grad()
def _transformers_parity(
    model: nn.Module, reloaded: TransformersClassifier, folder: Path, architecture: str, images: torch.Tensor
) -> dict[str, Any]:
    from distill.models.student import student_heads

    check = parity(model, reloaded, folder, images)
    if len(reloaded.output_heads) == 3:
        cls, dist = student_heads(model.eval(), images)
        got = reloaded.forward_heads(images)
        check["max_abs_diff_cls"] = float((got["cls"] - cls).abs().max())
        check["max_abs_diff_dist"] = float((got["dist"] - dist).abs().max())
        check["ok"] = check["ok"] and max(check["max_abs_diff_cls"], check["max_abs_diff_dist"]) <= PARITY_TOL
    check["architecture"] = architecture
    return check
