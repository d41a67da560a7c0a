"""transformers' native DeiT (or ViT): the writer, the reloader and the image processor.

``transformers/`` holds DeiTForImageClassificationWithTeacher (ViTForImageClassification for a
student without the distillation token) with an image processor that reproduces timm's eval
transform, so that the folder needs no timm. An export of one head (``--head cls|dist``) is a
DeiTForImageClassification, which classifies the first token with one classifier: the kept
head's weights, with the class and distillation tokens swapped for the distillation head.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.exports.formats import FORMATS, PARITY_TOL, TRANSFORMERS_DIR, ExportError, parity, require
from distill.models.spec import InputSpec

WITH_TEACHER = "DeiTForImageClassificationWithTeacher"
ONE_HEAD = "DeiTForImageClassification"


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


def architecture(model: nn.Module, head: str) -> str:
    """The transformers class that holds ``model`` exported with ``head``."""
    if not hasattr(model, "dist_token"):
        return "ViTForImageClassification"  # transformers' DeiT always adds a distillation token
    return WITH_TEACHER if head == "fused" else ONE_HEAD


def _hf_config(model: nn.Module, class_names: list[str], head: str) -> Any:
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
    arch = architecture(model, head)
    if distilled:
        # The head rides along in the config (transformers keeps unknown keys) for the reloader.
        return DeiTConfig(**common, architectures=[arch], **({} if head == "fused" else {"distill_head": head}))
    return ViTConfig(**common, architectures=[arch])


def hf_state_dict(model: nn.Module, head: str = "fused") -> dict[str, torch.Tensor]:
    """timm -> transformers key map. transformers' DeiT embeds [cls, dist, patches] like timm's
    VisionTransformerDistilled, with one position embedding per token in that order, so the
    tensors copy unchanged; timm's fused qkv projection is split into q, k and v (rows in that
    order, heads contiguous inside each). ``head`` cls or dist: see ``_one_head``."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    distilled = "dist_token" in sd
    if distilled and head != "fused":
        return _one_head(sd, len(model.blocks), head)
    out = _body(sd, len(model.blocks))
    heads = {"cls_classifier": "head", "distillation_classifier": "head_dist"} if distilled else {"classifier": "head"}
    for new, old in heads.items():
        out[f"{new}.weight"], out[f"{new}.bias"] = sd[f"{old}.weight"], sd[f"{old}.bias"]
    return out


def _one_head(sd: dict[str, torch.Tensor], depth: int, head: str) -> dict[str, torch.Tensor]:
    """DeiTForImageClassification's weights for one head of a ``select_head`` student.

    That model classifies the first token with ``classifier``. select_head doubled the kept head
    (and zeroed the other) so that timm's fused mean equals it; halving undoes that exactly (a
    power of two). For the distillation head the class and distillation tokens trade places, with
    their position embeddings: attention without a mask treats its tokens as a set, so the first
    token's output becomes the distillation token's and every other token's output is unchanged."""
    kept = "head" if head == "cls" else "head_dist"
    weight, bias = sd[f"{kept}.weight"] / 2, sd[f"{kept}.bias"] / 2
    if head == "dist":
        sd["cls_token"], sd["dist_token"] = sd["dist_token"], sd["cls_token"]
        sd["pos_embed"] = sd["pos_embed"][:, [1, 0, *range(2, sd["pos_embed"].shape[1])]].contiguous()
    out = _body(sd, depth)
    out["classifier.weight"], out["classifier.bias"] = weight, bias
    return out


def _body(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Embeddings, blocks and final norm (everything but the classifiers)."""
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
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj"}
    renames.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for i in range(depth):
        b, layer = f"blocks.{i}.", f"{p}.layers.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{layer}{new}.{kind}"] = sd[f"{b}{old}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{b}attn.qkv.{kind}" in sd:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[f"{layer}attention.{name}.{kind}"] = part.contiguous()
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
    """A transformers image classifier as a module giving its logits: a DeiT with teacher the
    fused ones, and its class and distillation heads through ``forward_heads``; a one-head export
    the kept head's (named by the config's ``distill_head``)."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        require(FORMATS[TRANSFORMERS_DIR], f"reading {folder}")
        from transformers import AutoModelForImageClassification

        with _quiet_transformers():
            self.hf = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        self.num_classes = int(self.hf.config.num_labels)
        if type(self.hf).__name__ == WITH_TEACHER:
            self.output_heads: tuple[str, ...] = ("cls", "dist", "fused")
        else:
            self.output_heads = (str(getattr(self.hf.config, "distill_head", None) or "fused"),)

    def forward_heads(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.hf(pixel_values=images)
        if len(self.output_heads) == 1:
            return {self.output_heads[0]: out.logits}
        return {"cls": out.cls_logits, "dist": out.distillation_logits, "fused": out.logits}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=images).logits


def transformers_card(name: str, architecture: str, head: str) -> str:
    kept = {
        "fused": "",
        "cls": " It keeps the class head only: its logits are the class head's.",
        "dist": " It keeps the distillation head only: its logits are the distillation head's.",
    }[head]
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
            f"from the timm export one folder up (its README.md has the provenance and results).{kept}",
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
    model: nn.Module,
    folder: Path,
    class_names: list[str],
    spec: InputSpec,
    name: str,
    images: torch.Tensor,
    head: str = "fused",
) -> dict[str, Any]:
    """transformers' DeiTForImageClassificationWithTeacher (ViTForImageClassification for a
    student without the distillation token: transformers' DeiT always adds one; a
    DeiTForImageClassification for ``head`` cls or dist, ``model`` then being select_head's), its
    image processor and a card, written atomically and reloaded through the Auto classes; each
    head must match the student's on ``images``."""
    require(FORMATS[TRANSFORMERS_DIR], "--format transformers")
    problem = transformers_problem(model)
    if problem:
        raise ExportError(f"--format transformers cannot represent this student exactly: {problem}")
    import transformers

    arch = architecture(model, head)
    hf = getattr(transformers, arch)(_hf_config(model, class_names, head)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model, head), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"transformers {transformers.__version__} names {arch}'s weights differently from what distill "
            f"maps (missing {missing[:4]}, unexpected {unexpected[:4]}); use the pinned transformers version"
        )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():
        hf.save_pretrained(str(tmp))
    # Written from the PIL class; saved as DeiTImageProcessor, which AutoImageProcessor picks a backend for.
    transformers.DeiTImageProcessorPil(**image_processor_config(spec)).save_pretrained(str(tmp))
    (tmp / "README.md").write_text(transformers_card(name, arch, head))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return _transformers_parity(model, TransformersClassifier(folder), folder, arch, images)


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
