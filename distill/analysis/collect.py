"""Reading a student's attention from timm's own modules, in one pass over the images.

Attention probabilities are read from timm's ``Attention`` modules, not re-implemented: the
fused kernel (``F.scaled_dot_product_attention``) never materialises them, so each module's
``fused_attn`` is switched off for the analysis only and the input of ``attn_drop`` (the softmax
output; timm 1.0.31 ``timm/layers/attention.py``) is captured by a forward hook. The prefix
tokens are read by hooks on the blocks. ``collect`` sums what the maths measure per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.analysis.maths import (
    attention_rollout,
    pairwise_distances,
    patch_centres,
    patch_query_distance,
    prefix_query_spread,
    prefix_share,
    token_cosine,
)
from distill.analysis.record import AnalysisError


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
