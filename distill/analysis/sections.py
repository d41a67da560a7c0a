"""From one pass's sums (``collect.Collected``) and the model's parameters to analysis.json's
sections (``record``): means over images, the paper's reference figures beside them."""

from __future__ import annotations

import torch
from torch import nn

from distill.analysis.collect import Collected, Geometry
from distill.analysis.maths import (
    class_disagreement,
    cosine_matrix,
    depth_trend,
    disagreement_matrix,
    grid_structure,
    token_cosine,
    uniform_distance,
)
from distill.analysis.record import (
    AttentionDistance,
    AttentionMaps,
    Disagreement,
    PosEmbed,
    PrefixQueries,
    Skipped,
    TokenSimilarity,
)

# DeiT sec. 4 ("Convnets teachers" / "distillation token"): the learned class and distillation
# tokens have an average cosine similarity of 0.06, their embeddings at the last layer 0.93.
DEIT_TOKEN_COSINE = {"learned tokens": 0.06, "last layer": 0.93}
# DeiT table 4 (DeiT-B with distillation, ImageNet): disagreement with the convnet teacher.
DEIT_TEACHER_DISAGREEMENT = {"cls": 0.112, "dist": 0.100, "fused": 0.102}
# A change in mean attention distance below 1% of uniform attention's is not called growth.
TREND_TOLERANCE = 0.01


def attention_results(col: Collected) -> AttentionDistance:
    g, n = col.geometry, col.images
    assert col.distance is not None and col.share is not None and col.spread is not None
    per_head = (col.distance / n).tolist()
    per_layer = [sum(row) / len(row) for row in per_head]
    spread = col.spread / n
    uniform = uniform_distance(g.grid, g.patch)
    return AttentionDistance(
        grid=g.grid,
        patch_size=g.patch,
        uniform_px=uniform,
        per_head=per_head,
        per_layer=per_layer,
        trend=depth_trend(per_layer, TREND_TOLERANCE * uniform),
        prefix_share_per_head=(col.share / n).tolist(),
        prefix_queries={
            name: PrefixQueries(
                spread_px_per_head=spread[:, :, i].tolist(), spread_px_per_layer=spread[:, :, i].mean(1).tolist()
            )
            for i, name in enumerate(g.prefix_names)
        },
    )


def pos_embed_results(model: nn.Module, g: Geometry) -> PosEmbed | Skipped:
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        return Skipped(skipped="the model has no learned absolute position embedding")
    rows = pos.detach()[0].cpu()
    if not getattr(model, "no_embed_class", False):
        rows = rows[g.prefix :]  # timm/DeiT: the prefix tokens have rows first
    sim = cosine_matrix(rows)
    return PosEmbed(grid=g.grid, similarity=sim.tolist(), **grid_structure(sim, g.grid))


def token_results(model: nn.Module, col: Collected) -> TokenSimilarity | Skipped:
    if not col.geometry.distilled:
        return Skipped(skipped="the student has no distillation token (distillation.token=false)")
    assert col.tokens is not None
    depth = len(model.blocks)
    learned = float(token_cosine(torch.stack([model.cls_token[0, 0], model.dist_token[0, 0]]).detach()[None]))
    return TokenSimilarity(
        learned_tokens=learned,
        layers=["embedding", *[f"block {i + 1}" for i in range(depth)], "norm"],
        cosine=(col.tokens / col.images).tolist(),
        heads_output_cosine=col.heads_cosine / col.images,
        paper=DEIT_TOKEN_COSINE,
    )


def disagreement_results(col: Collected, class_names: list[str], teacher_note: str | None) -> Disagreement:
    labels = torch.cat(col.labels)
    preds = {"ground truth": labels}
    if "teacher" in col.predictions:
        preds["teacher"] = torch.cat(col.predictions["teacher"])
    preds.update({h: torch.cat(col.predictions[h]) for h in col.heads})
    common = {
        "sources": list(preds),
        "matrix": disagreement_matrix(preds),
        "top1": {k: float((v == labels).double().mean()) for k, v in preds.items() if k != "ground truth"},
        "paper_teacher": DEIT_TEACHER_DISAGREEMENT,
    }
    if "teacher" not in preds:
        return Disagreement(**common, teacher_skipped=teacher_note or "no teacher")
    return Disagreement(
        **common,
        with_teacher={h: float((preds[h] != preds["teacher"]).double().mean()) for h in col.heads},
        classes=class_disagreement(labels, preds, col.heads, class_names),
    )


def maps_results(col: Collected, indices: list[int]) -> AttentionMaps | Skipped:
    if not col.maps:
        return Skipped(skipped="the model has no class token, or no images were asked for (--maps 0)")
    shown = len(col.map_images)
    return AttentionMaps(images=indices[:shown], maps={k: [m.tolist() for m in v] for k, v in col.maps.items()})
