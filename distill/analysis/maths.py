"""The analyses' maths: pure functions on tensors, pinned on hand-built inputs by
tests/test_analysis.py.

- Mean attention distance (ViT, Dosovitskiy et al. 2021, fig. 7): the attention-weighted pixel
  distance between a patch query and the patches it attends to, and its trend with depth.
- Position-embedding similarity (ViT fig. 7, centre): cosines as a grid of grids, and one number
  for the 2D structure learned (grid neighbours against distant patches).
- Token cosine (DeiT, Touvron et al. 2021, sec. 4), disagreement (DeiT table 4) and attention
  rollout (Abnar & Zuidema 2020).
"""

from __future__ import annotations

import itertools
import math

import torch

from distill.analysis.record import ClassDisagreement


def patch_centres(grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """(N, 2) pixel centres (y, x) of a (rows, cols) patch grid, in timm's row-major token order."""
    rows, cols = grid
    y = (torch.arange(rows, dtype=torch.float64) + 0.5) * patch[0]
    x = (torch.arange(cols, dtype=torch.float64) + 0.5) * patch[1]
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1)


def pairwise_distances(centres: torch.Tensor) -> torch.Tensor:
    """(N, N) Euclidean distances between points."""
    return torch.cdist(centres, centres)


def _patch_keys(attn: torch.Tensor, prefix: int) -> torch.Tensor:
    """Attention over patch keys only, renormalised per query: a prefix token has no position."""
    keys = attn[..., prefix:].double()
    return keys / keys.sum(-1, keepdim=True).clamp_min(1e-30)


def patch_query_distance(attn: torch.Tensor, distances: torch.Tensor, prefix: int) -> torch.Tensor:
    """ViT's mean attention distance: for each image and head, the mean over patch queries of
    sum_k a[q, k] * d(q, k), with ``a`` renormalised over patch keys (attention to the prefix
    tokens is reported apart, by ``prefix_share``). ``attn`` (B, H, T, T), ``distances`` (N, N)
    with T = prefix + N. Returns (B, H)."""
    a = _patch_keys(attn[:, :, prefix:, :], prefix)
    return (a * distances.to(a)).sum(-1).mean(-1)


def prefix_share(attn: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, H): the mean share of a patch query's attention that goes to the prefix tokens."""
    return attn[:, :, prefix:, :prefix].double().sum(-1).mean(-1)


def prefix_query_spread(attn: torch.Tensor, centres: torch.Tensor, prefix: int) -> torch.Tensor:
    """How local a prefix token's attention is: a prefix query has no position, so its distance
    is measured from the centre of mass of its attention over the patches (renormalised), i.e.
    sum_k a[k] * |c_k - sum_j a[j] c_j| in pixels; 0 on one patch, large when spread out.
    Returns (B, H, prefix)."""
    a = _patch_keys(attn[:, :, :prefix, :], prefix)  # (B, H, P, N)
    c = centres.to(a)
    centroid = a @ c  # (B, H, P, 2)
    gap = torch.linalg.vector_norm(c[None, None, None] - centroid[..., None, :], dim=-1)  # (B, H, P, N)
    return (a * gap).sum(-1)


def uniform_distance(grid: tuple[int, int], patch: tuple[int, int]) -> float:
    """The mean distance of uniform attention over the grid: the 'global' reference line."""
    return float(pairwise_distances(patch_centres(grid, patch)).mean())


def attention_rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema (2020): heads averaged, the residual added as 0.5 * A + 0.5 * I, rows
    renormalised, multiplied from the first layer to the last. (B, T, T) per image."""
    result = None
    for attn in attns:
        a = attn.double().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None, "no attention layers"
    return result


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity between the rows of ``vectors`` (N, D)."""
    v = torch.nn.functional.normalize(vectors.double(), dim=-1)
    return v @ v.T


def grid_structure(similarity: torch.Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """How much 2D structure a position-embedding similarity matrix shows.

    ``neighbour``: mean similarity of 4-neighbours on the grid; ``distant``: of pairs at least
    half the grid's larger side apart (Chebyshev distance >= ceil(max(rows, cols) / 2));
    ``same_row_col``: same row or column, not neighbours (ViT: row/column stripes); ``contrast``
    = neighbour - distant (about 0 for unstructured embeddings, larger the more 2D structure).
    """
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    dr, dc = (r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs()
    neighbour = (dr + dc) == 1
    distant = torch.maximum(dr, dc) >= math.ceil(max(rows, cols) / 2)
    line = ((dr == 0) | (dc == 0)) & ((dr + dc) > 1)
    sim = similarity.double()

    def mean(mask: torch.Tensor) -> float:
        return float(sim[mask].mean()) if mask.any() else math.nan

    out = {"neighbour": mean(neighbour), "distant": mean(distant), "same_row_col": mean(line)}
    out["contrast"] = out["neighbour"] - out["distant"]
    return out


def token_cosine(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) cosine similarity between token 0 (class) and token 1 (distillation) of (B, T, D)."""
    return torch.nn.functional.cosine_similarity(tokens[:, 0].double(), tokens[:, 1].double(), dim=-1)


def disagreement_matrix(predictions: dict[str, torch.Tensor]) -> list[list[float]]:
    """DeiT table 4: entry (i, j) is the share of images on which predictions i and j differ."""
    preds = list(predictions.values())
    return [[float((a != b).double().mean()) for b in preds] for a in preds]


def class_disagreement(
    labels: torch.Tensor, predictions: dict[str, torch.Tensor], heads: list[str], class_names: list[str]
) -> list[ClassDisagreement]:
    """Per ground-truth class: images, and how often each head differs from the teacher; sorted
    most-disagreeing first (by the largest head rate, then the class)."""
    rows = []
    for k, name in enumerate(class_names):
        mask = labels == k
        if not mask.any():
            continue
        rates = {h: float((predictions[h][mask] != predictions["teacher"][mask]).double().mean()) for h in heads}
        rows.append(ClassDisagreement(name=name, images=int(mask.sum()), with_teacher=rates))
    return sorted(rows, key=lambda r: (-max(r.with_teacher.values()), r.name))


def depth_trend(per_layer: list[float], tolerance: float = 0.0) -> str:
    """'grows monotonically' (every step up by more than ``tolerance``), 'grows overall' (last
    above first by more than ``tolerance`` and a positive least-squares slope) or 'does not grow'.
    A random-init student attends almost uniformly everywhere: its tiny steps are not growth."""
    if len(per_layer) < 2:
        return "does not grow (one layer)"
    if all(b - a > tolerance for a, b in itertools.pairwise(per_layer)):
        return "grows monotonically"
    x = torch.arange(len(per_layer), dtype=torch.float64)
    y = torch.tensor(per_layer, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    if per_layer[-1] - per_layer[0] > tolerance and slope > 0:
        return "grows overall, not monotonically"
    return "does not grow"


def pos_embed_mosaic(similarity: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """ViT fig. 7 (centre) as one image: tile (r, c) is patch (r, c)'s similarity with every
    patch, laid out on the grid; one NaN row/column between tiles."""
    rows, cols = grid
    out = torch.full((rows * (rows + 1) - 1, cols * (cols + 1) - 1), math.nan, dtype=torch.float64)
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        top, left = r * (rows + 1), c * (cols + 1)
        out[top : top + rows, left : left + cols] = similarity[p].reshape(grid)
    return out
