"""Looking inside the student: the ViT and DeiT papers' analyses, measured on one model.

- Mean attention distance per layer and head (ViT, Dosovitskiy et al. 2021, fig. 7): the
  attention-weighted pixel distance between a patch query and the patches it attends to.
- Position-embedding similarity (ViT fig. 7, centre): the cosine of each patch's learned
  position embedding with every other one, as a grid of grids, and one number for the 2D
  structure learned (grid neighbours against distant patches).
- Class/distillation token similarity per layer (DeiT, Touvron et al. 2021, sec. 4: the learned
  tokens have cosine 0.06, the last layer's 0.93) and between the two heads' outputs.
- Disagreement between ground truth, the teacher and each head (DeiT table 4).
- The class and distillation tokens' attention maps, last layer and rollout (Abnar & Zuidema
  2020), over validation images.

Attention probabilities are read from timm's own ``Attention`` modules, not re-implemented: the
fused kernel (``F.scaled_dot_product_attention``) never materialises them, so each module's
``fused_attn`` is switched off for the analysis only and the input of ``attn_drop`` (the softmax
output; timm 1.0.31 ``timm/layers/attention.py``) is captured by a forward hook.

The maths are pure tensor functions pinned by tests/test_analysis.py; ``collect`` makes one pass
over the images; ``analyze`` writes analysis.json, the figures and analysis.md; and
``analysis_summary`` is what the study report reads back.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.errors import DistillError

# DeiT sec. 4 ("Convnets teachers" / "distillation token"): the learned class and distillation
# tokens have an average cosine similarity of 0.06, their embeddings at the last layer 0.93.
DEIT_TOKEN_COSINE = {"learned tokens": 0.06, "last layer": 0.93}
# DeiT table 4 (DeiT-B with distillation, ImageNet): disagreement with the convnet teacher.
DEIT_TEACHER_DISAGREEMENT = {"cls": 0.112, "dist": 0.100, "fused": 0.102}
# A change in mean attention distance below 1% of uniform attention's is not called growth.
TREND_TOLERANCE = 0.01
ANALYSIS_FILE = "analysis.json"
FIGURES = {
    "attention_distance": "attention_distance.png",
    "pos_embed": "pos_embed_similarity.png",
    "tokens": "token_similarity.png",
    "disagreement": "disagreement.png",
    "maps": "attention_maps.png",
}


class AnalysisError(DistillError):
    """The model or the request cannot be analysed (no attention layers, no images)."""


# ---------------------------------------------------------------------------------------------
# Geometry and the maths (pure functions on tensors)


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
) -> list[dict[str, Any]]:
    """Per ground-truth class: images, and how often each head differs from the teacher; sorted
    most-disagreeing first (by the largest head rate, then the class)."""
    rows = []
    for k, name in enumerate(class_names):
        mask = labels == k
        if not mask.any():
            continue
        row: dict[str, Any] = {"class": name, "images": int(mask.sum())}
        for h in heads:
            row[h] = float((predictions[h][mask] != predictions["teacher"][mask]).double().mean())
        rows.append(row)
    return sorted(rows, key=lambda r: (-max(r[h] for h in heads), r["class"]))


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


# ---------------------------------------------------------------------------------------------
# Reading the model


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The blocks' timm ``Attention`` modules, in depth order (an error when there are none)."""
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    found = [b.attn for b in blocks if isinstance(getattr(b, "attn", None), Attention)] if blocks else []
    if not found:
        raise AnalysisError(
            f"{type(model).__name__} has no timm attention layers to look inside; distill-analyze "
            "takes a ViT student (a run, a checkpoint or its export), not a convnet teacher"
        )
    if len(found) != len(blocks):
        raise AnalysisError(f"{type(model).__name__}: only {len(found)} of its {len(blocks)} blocks use timm Attention")
    return found


class AttentionRecorder:
    """Within ``with recorder:``, each forward of ``modules`` stores its attention probabilities
    (B, H, T, T) in ``recorder.attn[i]``. The fused kernel is switched off on entry and restored
    on exit; the softmax output is the input of ``attn_drop`` (timm 1.0.31 Attention.forward)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.attn: list[torch.Tensor | None] = [None] * len(modules)
        self._fused: list[bool] = []
        self._hooks: list[Any] = []

    def _hook(self, i: int) -> Callable[..., None]:
        def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            self.attn[i] = inputs[0].detach()

        return capture

    def __enter__(self) -> AttentionRecorder:
        self._fused = [bool(m.fused_attn) for m in self.modules]
        for i, m in enumerate(self.modules):
            m.fused_attn = False
            self._hooks.append(m.attn_drop.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        for m, fused in zip(self.modules, self._fused):
            m.fused_attn = fused
        self._hooks, self.attn = [], [None] * len(self.modules)


@contextmanager
def token_recorder(model: nn.Module, prefix: int) -> Iterator[list[torch.Tensor | None]]:
    """The prefix tokens (B, prefix, D) entering the first block, leaving each block and after
    the final norm: ``[embedding, block 1, ..., block L, norm]``, filled at each forward."""
    blocks = list(model.blocks)
    found: list[torch.Tensor | None] = [None] * (len(blocks) + 2)

    def keep(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            found[i] = output[:, :prefix].detach()

        return hook

    def first(_m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        found[0] = inputs[0][:, :prefix].detach()

    hooks = [blocks[0].register_forward_pre_hook(first)]
    hooks += [b.register_forward_hook(keep(i + 1)) for i, b in enumerate(blocks)]
    hooks.append(model.norm.register_forward_hook(keep(len(blocks) + 1)))
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


@dataclass(frozen=True)
class Geometry:
    """Where the patches are: the grid (rows, cols), the patch size (h, w) in pixels, the number
    of prefix tokens and their names (cls, dist, reg1 ...)."""

    grid: tuple[int, int]
    patch: tuple[int, int]
    prefix: int
    prefix_names: tuple[str, ...]

    @property
    def distilled(self) -> bool:
        return self.prefix_names[:2] == ("cls", "dist")

    @classmethod
    def of(cls, model: nn.Module) -> Geometry:
        pe = model.patch_embed
        prefix = int(model.num_prefix_tokens)
        names = ["cls"] if getattr(model, "cls_token", None) is not None else []
        if getattr(model, "dist_token", None) is not None:
            names.append("dist")
        names += [f"reg{i + 1}" for i in range(prefix - len(names))]
        grid = tuple(int(v) for v in pe.grid_size)
        # A token's footprint in pixels: the patch, or for a hybrid student the patch of the
        # CNN feature map times the map's stride (timm's feat_ratio covers both).
        ratio = pe.feat_ratio(as_scalar=False) if hasattr(pe, "feat_ratio") else pe.patch_size
        patch = tuple(int(v) for v in ratio)
        return cls(grid, patch, prefix, tuple(names))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# One pass over the images


@dataclass
class Collected:
    """What one pass over the images gathers (sums over images, then divided by ``images``)."""

    geometry: Geometry
    heads: list[str]  # the student's prediction heads: cls, dist, fused (or cls alone)
    images: int = 0
    distance: torch.Tensor | None = None  # (L, H) summed patch-query distance
    share: torch.Tensor | None = None  # (L, H) summed prefix share
    spread: torch.Tensor | None = None  # (L, H, P) summed prefix-query spread
    tokens: torch.Tensor | None = None  # (L + 2,) summed cls/dist cosine
    heads_cosine: float = 0.0  # summed cosine of softmax(cls) and softmax(dist)
    labels: list[torch.Tensor] = field(default_factory=list)
    predictions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    maps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per prefix token: last / rollout
    map_images: list[torch.Tensor] = field(default_factory=list)

    def add(self, name: str, value: torch.Tensor) -> None:
        current = getattr(self, name)
        setattr(self, name, value if current is None else current + value)


def _batch_attention(col: Collected, attns: list[torch.Tensor], distances: torch.Tensor, centres: torch.Tensor) -> None:
    g = col.geometry
    col.add("distance", torch.stack([patch_query_distance(a, distances, g.prefix).sum(0) for a in attns]).cpu())
    col.add("share", torch.stack([prefix_share(a, g.prefix).sum(0) for a in attns]).cpu())
    col.add("spread", torch.stack([prefix_query_spread(a, centres, g.prefix).sum(0) for a in attns]).cpu())


def _batch_maps(col: Collected, attns: list[torch.Tensor], images: torch.Tensor, want: int) -> None:
    """The prefix tokens' attention over the patches (head mean), last layer and rollout."""
    take = min(want - len(col.map_images), images.shape[0])
    if take <= 0:
        return
    g = col.geometry
    last = attns[-1][:take].double().mean(1)
    rollout = attention_rollout([a[:take] for a in attns])
    for kind, attn in (("last", last), ("rollout", rollout)):  # class beside distillation token
        for i, name in enumerate(g.prefix_names[:2]):
            col.maps.setdefault(f"{name} {kind}", []).extend(attn[:, i, g.prefix :].reshape(take, *g.grid).cpu())
    col.map_images.extend(images[:take].cpu())


@torch.no_grad()
def collect(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    maps: int = 6,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    """One pass: attention statistics, token similarity, every head's and the teacher's
    predictions, and the first ``maps`` images' attention maps. ``batches`` yields (images in
    the model's input space, labels in its output indices)."""
    from distill.models.student import student_heads

    device = device or torch.device("cpu")
    g = Geometry.of(model)
    two_heads = hasattr(model, "head_dist")
    col = Collected(g, ["cls", "dist", "fused"] if two_heads else ["cls"])
    centres = patch_centres(g.grid, g.patch).to(device)
    distances = pairwise_distances(centres)
    with AttentionRecorder(attention_modules(model)) as rec, token_recorder(model, g.prefix) as tokens:
        for images, labels in batches:
            images = images.to(device)
            cls, dist = student_heads(model, images)
            attns = [a for a in rec.attn if a is not None]
            _batch_attention(col, attns, distances, centres)
            _batch_maps(col, attns, images, maps)
            if g.distilled:
                col.add("tokens", torch.stack([token_cosine(t).sum() for t in tokens if t is not None]).cpu())
                col.heads_cosine += float(token_cosine(torch.stack([cls.softmax(-1), dist.softmax(-1)], 1)).sum())
            preds = {"cls": cls.argmax(-1)}
            if two_heads:
                preds.update(dist=dist.argmax(-1), fused=((cls + dist) / 2).argmax(-1))
            if teacher is not None:
                preds["teacher"] = teacher(images).argmax(-1)
            for k, v in preds.items():
                col.predictions.setdefault(k, []).append(v.cpu())
            col.labels.append(labels.cpu())
            col.images += images.shape[0]
            if progress is not None:
                progress(images.shape[0])
    return col


# ---------------------------------------------------------------------------------------------
# Results (plain data for analysis.json)


def attention_results(col: Collected) -> dict[str, Any]:
    g, n = col.geometry, col.images
    assert col.distance is not None and col.share is not None and col.spread is not None
    per_head = (col.distance / n).tolist()
    per_layer = [sum(row) / len(row) for row in per_head]
    spread = col.spread / n
    uniform = uniform_distance(g.grid, g.patch)
    return {
        "unit": "px",
        "grid": list(g.grid),
        "patch_size": list(g.patch),
        "uniform_px": uniform,
        "per_head": per_head,
        "per_layer": per_layer,
        "trend": depth_trend(per_layer, TREND_TOLERANCE * uniform),
        "prefix_share_per_head": (col.share / n).tolist(),
        "prefix_queries": {
            name: {
                "spread_px_per_head": spread[:, :, i].tolist(),
                "spread_px_per_layer": spread[:, :, i].mean(1).tolist(),
            }
            for i, name in enumerate(g.prefix_names)
        },
    }


def pos_embed_results(model: nn.Module, g: Geometry) -> dict[str, Any]:
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        return {"skipped": "the model has no learned absolute position embedding"}
    rows = pos.detach()[0].cpu()
    if not getattr(model, "no_embed_class", False):
        rows = rows[g.prefix :]  # timm/DeiT: the prefix tokens have rows first
    sim = cosine_matrix(rows)
    return {"grid": list(g.grid), "similarity": sim.tolist(), **grid_structure(sim, g.grid)}


def token_results(model: nn.Module, col: Collected) -> dict[str, Any]:
    g = col.geometry
    if not g.distilled:
        return {"skipped": "the student has no distillation token (distillation.token=false)"}
    assert col.tokens is not None
    depth = len(model.blocks)
    learned = float(token_cosine(torch.stack([model.cls_token[0, 0], model.dist_token[0, 0]]).detach()[None]))
    return {
        "learned_tokens": learned,
        "layers": ["embedding", *[f"block {i + 1}" for i in range(depth)], "norm"],
        "cosine": (col.tokens / col.images).tolist(),
        "heads_output_cosine": col.heads_cosine / col.images,
        "paper": DEIT_TOKEN_COSINE,
    }


def disagreement_results(col: Collected, class_names: list[str], teacher_note: str | None) -> dict[str, Any]:
    labels = torch.cat(col.labels)
    preds = {"ground truth": labels}
    if "teacher" in col.predictions:
        preds["teacher"] = torch.cat(col.predictions["teacher"])
    preds.update({h: torch.cat(col.predictions[h]) for h in col.heads})
    out: dict[str, Any] = {
        "sources": list(preds),
        "matrix": disagreement_matrix(preds),
        "top1": {k: float((v == labels).double().mean()) for k, v in preds.items() if k != "ground truth"},
        "paper_teacher": DEIT_TEACHER_DISAGREEMENT,
    }
    if "teacher" in preds:
        out["with_teacher"] = {h: float((preds[h] != preds["teacher"]).double().mean()) for h in col.heads}
        out["classes"] = class_disagreement(labels, preds, col.heads, class_names)
    else:
        out["teacher_skipped"] = teacher_note or "no teacher"
    return out


def maps_results(col: Collected, indices: list[int]) -> dict[str, Any]:
    if not col.maps:
        return {"skipped": "the model has no class token, or no images were asked for (--maps 0)"}
    shown = len(col.map_images)
    return {"images": indices[:shown], "maps": {k: [m.tolist() for m in v] for k, v in col.maps.items()}}


# ---------------------------------------------------------------------------------------------
# The summary the study report reads


def analysis_summary(analysis_json: dict[str, Any] | str | Path) -> dict[str, Any]:
    """The figures a study report shows per run, from analysis.json (a path or its content):
    mean attention distance per layer (px) and its trend with depth, the class/distillation
    token cosine per layer (None without the token), and each head's disagreement with the
    teacher (None without a teacher)."""
    data = analysis_json if isinstance(analysis_json, dict) else json.loads(Path(analysis_json).read_text())
    att, tok, dis = data["attention_distance"], data["token_similarity"], data["disagreement"]
    return {
        "model": data["model"]["description"],
        "images": data["data"]["images"],
        "attention_distance_px": att["per_layer"],
        "attention_distance_trend": att["trend"],
        "uniform_distance_px": att["uniform_px"],
        "token_cosine": None if "skipped" in tok else dict(zip(tok["layers"], tok["cosine"])),
        "learned_token_cosine": tok.get("learned_tokens"),
        "heads_output_cosine": tok.get("heads_output_cosine"),
        "disagreement_with_teacher": dis.get("with_teacher"),
        "pos_embed_contrast": data["pos_embed"].get("contrast"),
        "notes": data["notes"],
    }


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention_distance(att: dict[str, Any], path: Path) -> None:
    """ViT fig. 7 (right): each head's mean attention distance against depth, plus the prefix
    tokens' spread; uniform attention over the grid as the dashed 'global' line."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    layers = list(range(1, len(att["per_layer"]) + 1))
    for layer, heads in zip(layers, att["per_head"]):
        ax.scatter([layer] * len(heads), heads, s=18, color="tab:blue", alpha=0.7)
    ax.plot(layers, att["per_layer"], color="tab:blue", label="mean of heads")
    for a in (ax, bx):
        a.axhline(att["uniform_px"], ls="--", color="grey", label="uniform attention")
        a.set_xlabel("layer (block)")
        a.set_xticks(layers)
    ax.set_ylabel("mean attention distance (px)")
    ax.set_title("patch queries, one dot per head")
    for name, q in att["prefix_queries"].items():
        bx.plot(layers, q["spread_px_per_layer"], marker="o", label=f"{name} token")
    bx.set_title("prefix queries: spread around their centre")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot_pos_embed(pos: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    grid = tuple(pos["grid"])
    mosaic = pos_embed_mosaic(torch.tensor(pos["similarity"]), grid)  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * grid[0] / grid[1] + 0.6))
    image = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (grid[1] + 1) + (grid[1] - 1) / 2 for c in range(grid[1])], [str(c + 1) for c in range(grid[1])])
    ax.set_yticks([r * (grid[0] + 1) + (grid[0] - 1) / 2 for r in range(grid[0])], [str(r + 1) for r in range(grid[0])])
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"position embedding similarity (neighbour - distant = {pos['contrast']:.2f})")
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens(tok: dict[str, Any], path: Path) -> None:
    """The class/distillation token cosine through the network, DeiT's two figures beside it."""
    plt = _pyplot()
    labels = ["learned", *tok["layers"]]
    values = [tok["learned_tokens"], *tok["cosine"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(values)), values, marker="o", label="this student (mean over images)")
    paper = tok["paper"]
    ax.scatter([0, len(values) - 2], [paper["learned tokens"], paper["last layer"]], marker="*", s=140,
               color="tab:red", zorder=3, label="DeiT-B (paper): 0.06 -> 0.93")  # fmt: skip
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right")
    ax.set_ylim(min(-0.1, min(values) - 0.05), 1.05)
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_ylabel("cosine(class token, distillation token)")
    ax.set_title(f"token similarity; heads' output distributions: {tok['heads_output_cosine']:.4f}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_disagreement(dis: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names, matrix = dis["sources"], dis["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.2))
    top = max(0.05, max(max(r) for r in matrix))
    image = ax.imshow(matrix, cmap="Reds", vmin=0, vmax=top)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=9, color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("disagreement rate (share of images)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_maps(maps: dict[str, list[torch.Tensor]], images: list[torch.Tensor], spec: Any, path: Path) -> None:
    """Each image (as the model sees it, un-normalised) beside its prefix tokens' attention maps,
    upsampled bilinearly and overlaid."""
    plt = _pyplot()
    kinds = list(maps)
    fig, axes = plt.subplots(len(images), len(kinds) + 1, figsize=(2.1 * (len(kinds) + 1), 2.1 * len(images)),
                             squeeze=False)  # fmt: skip
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for row, image in enumerate(images):
        rgb = (image.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        height, width = rgb.shape[:2]
        axes[row][0].imshow(rgb, interpolation="nearest")
        for col, kind in enumerate(kinds, start=1):
            ax = axes[row][col]
            ax.imshow(rgb.mean(-1), cmap="gray", interpolation="nearest")
            ax.imshow(maps[kind][row].numpy(), cmap="inferno", alpha=0.6, interpolation="bilinear",
                      extent=(-0.5, width - 0.5, height - 0.5, -0.5))  # fmt: skip
        if row == 0:
            axes[0][0].set_title("image", fontsize=9)
            for col, kind in enumerate(kinds, start=1):
                axes[0][col].set_title(kind.replace("cls", "class").replace("dist", "distillation"), fontsize=9)
    for ax in (a for r in axes for a in r):
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# analysis.md


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def attention_sentence(att: dict[str, Any]) -> str:
    first, last = att["per_layer"][0], att["per_layer"][-1]
    heads = [d for layer in att["per_head"] for d in layer]
    grid = "x".join(str(v) for v in att["grid"])
    patch = "x".join(str(v) for v in att["patch_size"])
    return (
        f"Mean attention distance {att['trend']} with depth: {first:.2f} px in block 1, {last:.2f} px in "
        f"block {len(att['per_layer'])} (heads from {min(heads):.2f} to {max(heads):.2f} px; uniform attention "
        f"over this {grid} grid of {patch} px patches would give {att['uniform_px']:.2f} px)."
    )


def _attention_section(att: dict[str, Any]) -> list[str]:
    names = list(att["prefix_queries"])
    rows = []
    for i, (mean, heads) in enumerate(zip(att["per_layer"], att["per_head"])):
        share = sum(att["prefix_share_per_head"][i]) / len(heads)
        spreads = [f"{att['prefix_queries'][n]['spread_px_per_layer'][i]:.2f}" for n in names]
        rows.append([f"block {i + 1}", f"{mean:.2f}", ", ".join(f"{h:.2f}" for h in heads), *spreads, f"{share:.3f}"])
    header = ["layer", "mean px", "per head px", *[f"{n} query spread px" for n in names], "patch attention on prefix"]
    return ["## Attention distance", "", attention_sentence(att), "", _table(header, rows), "",
            f"![attention distance]({FIGURES['attention_distance']})", ""]  # fmt: skip


def _pos_section(pos: dict[str, Any]) -> list[str]:
    head = ["## Position-embedding similarity", ""]
    if "skipped" in pos:
        return [*head, f"Skipped: {pos['skipped']}.", ""]
    sentence = (
        f"Grid neighbours' position embeddings have mean cosine {pos['neighbour']:.2f} against "
        f"{pos['distant']:.2f} for distant patches (same row or column: {pos['same_row_col']:.2f}), a contrast "
        f"of {pos['contrast']:.2f}: about 0 would mean the embedding learned no 2D structure."
    )
    return [*head, sentence, "", f"![position embedding similarity]({FIGURES['pos_embed']})", ""]


def _token_section(tok: dict[str, Any]) -> list[str]:
    head = ["## Class and distillation tokens", ""]
    if "skipped" in tok:
        return [*head, f"Skipped: {tok['skipped']}.", ""]
    sentence = (
        f"The class and distillation tokens have cosine {tok['learned_tokens']:.2f} as learned parameters and "
        f"{tok['cosine'][-2]:.2f} after the last block (DeiT-B: 0.06 -> 0.93); the two heads' output "
        f"distributions have cosine {tok['heads_output_cosine']:.4f}."
    )
    rows = [["learned tokens", f"{tok['learned_tokens']:.3f}", "0.06"]]
    last = len(tok["layers"]) - 2
    rows += [[n, f"{c:.3f}", "0.93" if i == last else ""] for i, (n, c) in enumerate(zip(tok["layers"], tok["cosine"]))]
    table = _table(["layer", "cosine (mean over images)", "DeiT-B"], rows)
    return [*head, sentence, "", table, "", f"![token similarity]({FIGURES['tokens']})", ""]


def disagreement_sentence(dis: dict[str, Any], images: int) -> str:
    if "with_teacher" not in dis:
        return f"Teacher rows skipped: {dis['teacher_skipped']}."
    w = dis["with_teacher"]
    if "dist" not in w:
        return f"On {images} validation images the student disagrees with the teacher on {100 * w['cls']:.1f}% of them."
    return (
        f"On {images} validation images the distillation head disagrees with the teacher on {100 * w['dist']:.1f}% "
        f"of them, the class head on {100 * w['cls']:.1f}% and the fused output on {100 * w['fused']:.1f}% "
        "(DeiT-B on ImageNet: 10.0%, 11.2% and 10.2%)."
    )


def _disagreement_section(dis: dict[str, Any], images: int) -> list[str]:
    names = dis["sources"]
    rows = [[n, *(f"{v:.3f}" for v in row)] for n, row in zip(names, dis["matrix"])]
    lines = [
        "## Disagreement (DeiT table 4)",
        "",
        disagreement_sentence(dis, images),
        "",
        _table(["", *names], rows),
        "",
    ]
    if dis.get("classes"):
        heads = list(dis["with_teacher"])
        worst = [[c["class"], str(c["images"]), *(f"{c[h]:.3f}" for h in heads)] for c in dis["classes"][:5]]
        lines += ["Classes where the heads and the teacher disagree most:", "",
                  _table(["class", "images", *[f"{h} vs teacher" for h in heads]], worst), ""]  # fmt: skip
    return [*lines, f"![disagreement]({FIGURES['disagreement']})", ""]


def write_markdown(result: dict[str, Any], path: Path) -> None:
    data, model = result["data"], result["model"]
    lines = [
        f"# Inside {model['description']}",
        "",
        f"{data['images']} validation images of {data['description']}, on {result['device']}, in "
        f"{result['seconds']['total']:.1f} s.",
        "",
        *_attention_section(result["attention_distance"]),
        *_pos_section(result["pos_embed"]),
        *_token_section(result["token_similarity"]),
        *_disagreement_section(result["disagreement"], data["images"]),
        "## Attention maps",
        "",
    ]
    if "skipped" in result["attention_maps"]:
        lines += [f"Skipped: {result['attention_maps']['skipped']}.", ""]
    else:
        lines += [
            "The prefix tokens' attention over the patches (mean over heads) on the first "
            f"{len(result['attention_maps']['images'])} of these images, in the last layer and rolled out "
            "across layers: brighter is more attention.",
            "",
            f"![attention maps]({FIGURES['maps']})",
            "",
        ]
    if result["notes"]:
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The analysis of one model: data, teacher, pass, files


@dataclass
class AnalysisData:
    """The validation images to look at."""

    split: Any  # distill.data.SplitData; its .val is analysed
    description: str
    own: bool  # the run's own data: its teacher's outputs are in these classes' order


def analysis_data(data: str | None, loaded: Any) -> AnalysisData:
    """The run's validation split, or that of ``data`` (a recipe YAML, or an image-folder root
    with ``train/`` and ``val/`` or ``test/``); an export has no data of its own."""
    from distill.data.sources import load_source
    from distill.recipe.schema import load_recipe

    if data is None:
        if loaded.recipe is None:
            raise AnalysisError("an export records no data: pass --data RECIPE.yaml or an image-folder root")
        cfg = loaded.recipe.data
    elif Path(data).is_dir():
        cfg = load_recipe(None, ["data.source=imagefolder", f"data.path={data}"]).data
    elif Path(data).is_file():
        cfg = load_recipe(data).data
    else:
        raise AnalysisError(f"--data {data} does not exist; give a recipe YAML or an image-folder root")
    split = load_source(cfg)
    what = f"{cfg.source} {cfg.path or ''} val".replace("  ", " ")
    own = loaded.recipe is not None and cfg == loaded.recipe.data
    return AnalysisData(split, what, own)


def _recorded_teacher(loaded: Any) -> tuple[Path | None, str | None]:
    """The teacher folder a finished run's summary.json names, checked by its sha256: (folder,
    None), (None, why not), or (None, None) when the run recorded none (unfinished)."""
    from distill.models.student import file_sha256
    from distill.run.rundir import RunDir

    summary = RunDir(loaded.run_dir).summary()
    recorded = (summary.teacher if summary is not None else None) or {}
    # "None": the string that summaries written before the typed record held for no file.
    if not recorded.get("weights") or recorded["weights"] == "None":
        return None, None
    weights = Path(recorded["weights"])
    # A relative <run.output_dir>/teachers/... path was relative to where the run was started.
    moved = RunDir(Path(loaded.run_dir).resolve()).teachers / weights.parent.name / weights.name
    found = next((w for w in (weights, moved) if w.is_file()), None)
    if found is None:
        return None, f"the teacher the run recorded ({weights}) is gone"
    if file_sha256(found) != recorded.get("sha256"):
        return None, f"the teacher the run recorded ({found}) has changed since (its sha256 differs)"
    return found.parent, None


def _cached_teacher(loaded: Any, recipe: Any, data: AnalysisData) -> tuple[Path | None, str | None]:
    """The trained-teacher cache folder the run's recipe keys today (an unfinished run)."""
    from distill.run.records import TrainedTeacher
    from distill.run.rundir import RunDir
    from distill.training.teacher_stage import cache_dir, teacher_key

    if recipe.teacher.cache_dir is None and loaded.run_dir is not None:  # <run.output_dir>/teachers, any cwd
        teacher_cfg = recipe.teacher.model_copy(update={"cache_dir": RunDir(Path(loaded.run_dir).resolve()).teachers})
        recipe = recipe.model_copy(update={"teacher": teacher_cfg})
    key = teacher_key(recipe, loaded.spec, data.split.num_classes)
    folder = cache_dir(recipe) / f"{recipe.teacher.model}-{key}"
    if not TrainedTeacher.exists(folder):
        return None, f"the run's trained teacher is not in {folder} (an analysis does not train one)"
    return folder, None


def run_teacher(loaded: Any, data: AnalysisData, device: torch.device) -> tuple[Any, str | None]:
    """The run's teacher as the run obtained it, or (None, why not). ``teacher.checkpoint`` is
    loaded as the run loaded it; a teacher the pipeline trained is the one the run's summary.json
    names (same sha256), else (unfinished run) the cache folder its recipe keys. An analysis
    never trains a teacher."""
    from accelerate import Accelerator

    from distill.training.teacher_stage import obtain_teacher

    recipe = loaded.recipe
    if recipe is None:
        return None, "an export carries no teacher"
    if not data.own:
        return None, "--data is not the run's data: the teacher rows are only computed on the run's own classes"
    cfg = recipe.teacher
    if cfg.checkpoint is None and cfg.train is None:
        return None, "the run had no teacher (no teacher.checkpoint and no teacher.train)"
    if cfg.checkpoint is None:
        folder, why = _recorded_teacher(loaded)
        if folder is None and why is None:
            folder, why = _cached_teacher(loaded, recipe, data)
        if folder is None:
            return None, why
        recipe = recipe.model_copy(update={"teacher": cfg.model_copy(update={"checkpoint": folder, "train": None})})
    try:
        teacher = obtain_teacher(Accelerator(cpu=device.type == "cpu"), recipe, data.split, loaded.spec)
    except DistillError as exc:
        return None, f"the run's teacher cannot be loaded ({exc})"
    return teacher, None


def select_images(total: int, n: int | None, seed: int = 0) -> list[int]:
    """``n`` validation indices drawn without replacement (seeded, sorted), or all of them: a
    folder's validation split is ordered by class, so its first n would be one class."""
    if n is None or n >= total:
        return list(range(total))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:n].tolist())


def _zeroed_dist_head(model: nn.Module) -> bool:
    """An export made with --head cls zeroes head_dist (its output is then the class head alone)."""
    head = getattr(model, "head_dist", None)
    return isinstance(head, nn.Linear) and not head.weight.any() and (head.bias is None or not head.bias.any())


def _model_info(loaded: Any, model: nn.Module, source: Path | None) -> dict[str, Any]:
    return {
        "description": loaded.description,
        "path": str(source) if source is not None else None,
        "run_dir": str(loaded.run_dir) if loaded.run_dir is not None else None,
        "checkpoint": str(loaded.checkpoint) if loaded.checkpoint is not None else None,
        "progress": loaded.progress,
        "architecture": type(model).__name__,
        "depth": len(model.blocks),
        "num_heads": model.blocks[0].attn.num_heads,
        "embed_dim": int(model.embed_dim),
        "input": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.spec.timm_config().items()},
    }


def analyze(
    loaded: Any,
    data: AnalysisData,
    out: Path,
    images: int | None = 512,
    maps: int = 6,
    batch_size: int = 64,
    device: torch.device | None = None,
    teacher: Any = None,
    teacher_note: str | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """Every analysis of ``loaded`` (an artifacts.LoadedModel) on ``images`` of ``data``'s
    validation split (None: all): writes analysis.json, the figures and analysis.md to ``out``
    and returns what analysis.json holds."""
    from tqdm import tqdm

    from distill.data.pipeline import eval_loader
    from distill.exports.artifacts import match_classes

    start = time.perf_counter()
    attention_modules(loaded.model)  # a convnet stops here, before any work
    if images is not None and images < 1:
        raise AnalysisError(f"--images must be at least 1 (or 'all'), got {images}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    indices = select_images(len(data.split.val), images)
    names = data.split.class_names
    targets = match_classes(names, loaded.class_names, loaded.model.num_classes, loaded.description)
    model = loaded.model.to(device).eval()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in eval_loader(data.split.val.select(indices), loaded.spec, batch_size):
            yield batch["image"], batch["label"] if targets is None else targets[batch["label"]]

    with tqdm(total=len(indices), unit="img", desc="analyze", dynamic_ncols=True) as bar:
        col = collect(model, batches(), teacher, maps, device, bar.update)
    pass_s = time.perf_counter() - start
    if targets is not None and "teacher" in col.predictions:  # teacher outputs follow the data's classes
        col.predictions["teacher"] = [targets[p] for p in col.predictions["teacher"]]
    notes = [teacher_note] if teacher_note else []
    if _zeroed_dist_head(model):
        notes.append("the distillation head is zeroed (an export made with --head cls): its rows show class 0")
    result: dict[str, Any] = {
        "model": _model_info(loaded, model, source),
        "data": {
            "description": data.description,
            "images": col.images,
            "indices": indices,
            "classes": loaded.class_names or names,
        },
        "device": str(device),
        "attention_distance": attention_results(col),
        "pos_embed": pos_embed_results(model, col.geometry),
        "token_similarity": token_results(model, col),
        "disagreement": disagreement_results(col, loaded.class_names or names, teacher_note),
        "attention_maps": maps_results(col, indices),
        "figures": {},
        "notes": notes,
    }
    for key in ("pos_embed", "token_similarity"):
        if "skipped" in result[key]:
            notes.append(f"{key.replace('_', ' ')} skipped: {result[key]['skipped']}")
    result["seconds"] = {"pass": pass_s}
    write_outputs(result, col, loaded.spec, out, start)
    return result


def write_outputs(result: dict[str, Any], col: Collected, spec: Any, out: Path, start: float) -> None:
    """The figures, analysis.json and analysis.md in ``out``."""
    import timm

    from distill import __version__

    out.mkdir(parents=True, exist_ok=True)
    figures_start = time.perf_counter()
    plot_attention_distance(result["attention_distance"], out / FIGURES["attention_distance"])
    result["figures"]["attention_distance"] = FIGURES["attention_distance"]
    if "skipped" not in result["pos_embed"]:
        plot_pos_embed(result["pos_embed"], out / FIGURES["pos_embed"])
        result["figures"]["pos_embed"] = FIGURES["pos_embed"]
    if "skipped" not in result["token_similarity"]:
        plot_tokens(result["token_similarity"], out / FIGURES["tokens"])
        result["figures"]["tokens"] = FIGURES["tokens"]
    plot_disagreement(result["disagreement"], out / FIGURES["disagreement"])
    result["figures"]["disagreement"] = FIGURES["disagreement"]
    if col.maps:
        plot_maps(col.maps, col.map_images, spec, out / FIGURES["maps"])
        result["figures"]["maps"] = FIGURES["maps"]
    now = time.perf_counter()
    result["seconds"].update(figures=now - figures_start, total=now - start)
    result["versions"] = {"distill": __version__, "torch": torch.__version__, "timm": timm.__version__}
    write_markdown(result, out / "analysis.md")
    (out / ANALYSIS_FILE).write_text(json.dumps(result, indent=1))


def analyze_run(run_dir: Path, images: int | None = 512, device: torch.device | None = None) -> Path:
    """The analysis of a finished run's last checkpoint into ``<run>/analysis`` (a study calls
    it for every run); returns the analysis.json path."""
    from distill.exports.artifacts import load_artifact
    from distill.run.rundir import RunDir

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_artifact(Path(run_dir), "last", False)
    attention_modules(loaded.model)
    data = analysis_data(None, loaded)
    teacher, note = run_teacher(loaded, data, device)
    out = RunDir(Path(run_dir)).analysis_dir
    analyze(loaded, data, out, images, 6, 64, device, teacher, note, source=Path(run_dir))
    return out / "analysis.json"
