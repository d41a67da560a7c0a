"""The student (timm's distilled ViT): build, initialise from weights, call its heads; and the
safe weights reader that students and teachers share (teacher.py has the teacher)."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import RecipeError, TeacherError
from distill.models.spec import InputSpec
from distill.recipe.schema import Recipe, StudentConfig

REGISTRY_PROVENANCE_KEYS = (
    "tag",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "file",
    "license",
    "paper_ids",
    "paper_name",
    "origin_url",
    "notes",
)
STUDENT_SIZE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


def create_model(name: str, where: str, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"{where} '{name}' is not a timm model{hint}")
    return timm.create_model(name, pretrained=False, **kwargs)


def student_model_args(cfg: StudentConfig, num_classes: int) -> dict[str, Any]:
    """timm.create_model keyword arguments that rebuild the student (stored in exports)."""
    args: dict[str, Any] = {"num_classes": num_classes}
    args.update({k: getattr(cfg, k) for k in STUDENT_SIZE_KEYS if getattr(cfg, k) is not None})
    return args


def plain_counterpart(name: str) -> str:
    """The ViT without a distillation token of the same size: deit_tiny_distilled_* -> deit_tiny_*."""
    import timm

    plain = name.replace("_distilled", "")
    if plain == name or not timm.is_model(plain):
        raise RecipeError(
            f"distillation.token=false needs the plain ViT matching student.model '{name}', but "
            f"'{plain}' is not a timm model; use a '*_distilled_*' student with a plain twin"
        )
    return plain


def hybrid_embed(cfg: StudentConfig) -> Any:
    """timm's HybridEmbed over the first ``stem_stages`` feature stages of ``student.stem``, cut
    after the last of them, so that every stem parameter trains."""
    import timm
    from timm.layers import HybridEmbed

    if not timm.is_model(cfg.stem):
        create_model(str(cfg.stem), "student.stem")  # raises, with suggestions
    try:
        backbone = timm.create_model(cfg.stem, pretrained=False, features_only=True, out_indices=(cfg.stem_stages - 1,))
    except (IndexError, AssertionError, ValueError) as exc:
        raise RecipeError(
            f"student.stem '{cfg.stem}' with student.stem_stages={cfg.stem_stages}: {exc}; use fewer stages"
        ) from None
    cut_stem(backbone)
    size = cfg.img_size or 224
    unused = untrained_parameters(backbone, (size, size) if isinstance(size, int) else size)
    if unused:
        raise RecipeError(
            f"student.stem '{cfg.stem}' with student.stem_stages={cfg.stem_stages} has {len(unused)} parameters "
            f"that get no gradient ({', '.join(unused[:3])}, ...): they would never train, and distributed "
            "training stops on them; choose another student.stem"
        )
    return partial(HybridEmbed, backbone=backbone)


def cut_stem(backbone: nn.Module) -> None:
    """Drop the blocks after the last requested feature stage. timm's EfficientNetFeatures and
    MobileNetV3Features (EfficientNet, MobileNet v2-v4, MixNet, ...) run every block and return
    the requested outputs, so later blocks would cost full compute and get no gradient (under
    DDP: "Expected to have finished reduction"); timm's FeatureListNet (ResNet, ConvNeXt,
    RegNet, ...) already stops at the last requested module."""
    stage_out = getattr(backbone, "_stage_out_idx", None)
    if isinstance(stage_out, dict) and isinstance(getattr(backbone, "blocks", None), nn.Sequential):
        # its keys: how many blocks run before an output is taken (0: the stem conv's output)
        backbone.blocks = backbone.blocks[: max(stage_out)]


def untrained_parameters(backbone: nn.Module, size: tuple[int, int]) -> list[str]:
    """Parameters of ``backbone`` that one backward of its outputs leaves without a gradient
    (a probe in eval mode, so that no BatchNorm statistic moves; empty on the meta device)."""
    params = list(backbone.parameters())
    if not params or params[0].is_meta:
        return []
    training = backbone.training
    backbone.eval()
    try:
        with torch.enable_grad():
            outputs = backbone(torch.zeros(1, 3, *size))
            sum(o.float().sum() for o in outputs).backward()
        return [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        backbone.zero_grad(set_to_none=True)
        backbone.train(training)


def set_attention(model: nn.Module, attention: str) -> int:
    """``train.attention``: 'manual' makes every timm attention block compute softmax(q k^T) v
    with plain matrix products (``fused_attn = False``), 'fused' with
    F.scaled_dot_product_attention. Returns the number of blocks switched."""
    blocks = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in blocks:
        m.fused_attn = attention == "fused"
    return len(blocks)


def build_student(cfg: StudentConfig, num_classes: int, token: bool = True) -> nn.Module:
    """timm's ``VisionTransformerDistilled`` by registry name, resized by the recipe; with
    ``token=False`` the plain ViT of the same size (DeiT's no-distillation-token rows)."""
    from timm.models.deit import VisionTransformerDistilled

    name = cfg.model if token else plain_counterpart(cfg.model)
    args = student_model_args(cfg, num_classes)
    if cfg.stem is not None:
        args["embed_layer"] = hybrid_embed(cfg)
        args.setdefault("patch_size", 1)  # patches of the feature map, not of the image
    model = create_model(name, "student.model", drop_path_rate=cfg.drop_path, **args)
    if token and not isinstance(model, VisionTransformerDistilled):
        raise RecipeError(
            f"student.model '{cfg.model}' is a {type(model).__name__}, not a distilled ViT; use a "
            "'*_distilled_*' model such as deit_tiny_distilled_patch16_224"
        )
    img, patch = model.patch_embed.img_size, model.patch_embed.patch_size
    cut = getattr(model.patch_embed, "feature_size", img)  # a hybrid cuts its feature map
    if cut[0] % patch[0] or cut[1] % patch[1]:
        raise RecipeError(
            f"student image size {tuple(img)} is not divisible by its patch size {tuple(patch)}; "
            "set student.img_size and student.patch_size so that img_size % patch_size == 0"
        )
    # timm keeps the registry's input_size (224) in pretrained_cfg even when img_size changes;
    # transforms and exports read it, so make it the truth.
    # Registry provenance (tag, hub id, license, paper) describes timm's released weights, not
    # ours; an export must not claim it.
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in REGISTRY_PROVENANCE_KEYS}
    model.pretrained_cfg = {**cfg, "input_size": (3, img[0], img[1]), "num_classes": num_classes}
    return model


def student_heads(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls logits, dist logits) in any mode, without timm's train/eval output switch. A plain
    ViT has one head, which then plays both parts."""
    feats = model.forward_features(images)
    if not hasattr(model, "head_dist"):
        logits = model.forward_head(feats)
        return logits, logits
    return model.head(feats[:, 0]), model.head_dist(feats[:, 1])


def as_heads(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training forward's output as (cls, dist): a plain ViT's single head plays both."""
    return output if isinstance(output, tuple) else (output, output)


# ---------------------------------------------------------------------------------------------
# Weights files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or torch files under ``weights_only=True`` (no pickle code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TeacherError(
            f"cannot read teacher checkpoint {path}: {type(exc).__name__}: {exc}. It must be a "
            "safetensors file or a torch state dict loadable with weights_only=True"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):  # DeiT/timm/lightning nestings
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TeacherError(f"teacher checkpoint {path} does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}


def student_input_spec(recipe: Recipe) -> InputSpec:
    """The student's input: size and normalisation from its timm config, eval crop and
    interpolation from the recipe where it sets them.

    The distilled student is built on the meta device (no memory, no weights, no RNG draws): the
    same code path as training (sizes, divisibility checks, timm's config) without a full-size
    probe. Its registry config gives the spec whether or not the run keeps the token."""
    from timm.data import resolve_model_data_config

    with torch.device("meta"):
        probe = build_student(recipe.student, 2)
    spec = InputSpec.from_timm(resolve_model_data_config(probe))
    aug = recipe.data.augment
    return InputSpec(
        spec.size,
        spec.mean,
        spec.std,
        aug.crop_pct or spec.crop_pct,
        aug.interpolation or spec.interpolation,
    )
