"""The analysis figures (matplotlib, Agg), drawn from analysis.json's typed sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.analysis.maths import pos_embed_mosaic
from distill.analysis.record import AnalysisRecord, AttentionDistance, Disagreement, PosEmbed, TokenSimilarity
from distill.analysis.sections import DEIT_TOKEN_COSINE
from distill.models.spec import InputSpec

FIGURES = {
    "attention_distance": "attention_distance.png",
    "pos_embed": "pos_embed_similarity.png",
    "tokens": "token_similarity.png",
    "disagreement": "disagreement.png",
    "maps": "attention_maps.png",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention_distance(att: AttentionDistance, path: Path) -> None:
    """ViT fig. 7 (right): each head's mean attention distance against depth, plus the prefix
    tokens' spread; uniform attention over the grid as the dashed 'global' line."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    layers = list(range(1, len(att.per_layer) + 1))
    for layer, heads in zip(layers, att.per_head):
        ax.scatter([layer] * len(heads), heads, s=18, color="tab:blue", alpha=0.7)
    ax.plot(layers, att.per_layer, color="tab:blue", label="mean of heads")
    for a in (ax, bx):
        a.axhline(att.uniform_px, ls="--", color="grey", label="uniform attention")
        a.set_xlabel("layer (block)")
        a.set_xticks(layers)
    ax.set_ylabel("mean attention distance (px)")
    ax.set_title("patch queries, one dot per head")
    for name, q in att.prefix_queries.items():
        bx.plot(layers, q.spread_px_per_layer, marker="o", label=f"{name} token")
    bx.set_title("prefix queries: spread around their centre")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pos_embed(pos: PosEmbed, path: Path) -> None:
    plt = _pyplot()
    grid = pos.grid
    mosaic = pos_embed_mosaic(torch.tensor(pos.similarity), grid)
    fig, ax = plt.subplots(figsize=(6.5, 6.5 * grid[0] / grid[1] + 0.6))
    image = ax.imshow(mosaic.numpy(), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (grid[1] + 1) + (grid[1] - 1) / 2 for c in range(grid[1])], [str(c + 1) for c in range(grid[1])])
    ax.set_yticks([r * (grid[0] + 1) + (grid[0] - 1) / 2 for r in range(grid[0])], [str(r + 1) for r in range(grid[0])])
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"position embedding similarity (neighbour - distant = {pos.contrast:.2f})")
    fig.colorbar(image, ax=ax, fraction=0.046, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens(tok: TokenSimilarity, path: Path) -> None:
    """The class/distillation token cosine through the network, DeiT's two figures beside it."""
    plt = _pyplot()
    labels = ["learned", *tok.layers]
    values = [tok.learned_tokens, *tok.cosine]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(values)), values, marker="o", label="this student (mean over images)")
    paper = (DEIT_TOKEN_COSINE["learned tokens"], DEIT_TOKEN_COSINE["last layer"])
    ax.scatter([0, len(values) - 2], paper, marker="*", s=140,
               color="tab:red", zorder=3, label="DeiT-B (paper): 0.06 -> 0.93")  # fmt: skip
    ax.set_xticks(range(len(values)), labels, rotation=30, ha="right")
    ax.set_ylim(min(-0.1, min(values) - 0.05), 1.05)
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_ylabel("cosine(class token, distillation token)")
    ax.set_title(f"token similarity; heads' output distributions: {tok.heads_output_cosine:.4f}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_disagreement(dis: Disagreement, path: Path) -> None:
    plt = _pyplot()
    names, matrix = dis.sources, dis.matrix
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


def plot_maps(maps: dict[str, list[torch.Tensor]], images: list[torch.Tensor], spec: InputSpec, path: Path) -> None:
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


def draw_figures(record: AnalysisRecord, maps: dict[str, list[torch.Tensor]], images: list[torch.Tensor],
                 spec: InputSpec, out: Path) -> dict[str, str]:  # fmt: skip
    """Every figure that applies to ``record`` into ``out``: figure key -> file name. The maps
    come from the pass (``collect.Collected``) with the images they are drawn over."""
    drawn = {}
    plot_attention_distance(record.attention_distance, out / FIGURES["attention_distance"])
    drawn["attention_distance"] = FIGURES["attention_distance"]
    if isinstance(record.pos_embed, PosEmbed):
        plot_pos_embed(record.pos_embed, out / FIGURES["pos_embed"])
        drawn["pos_embed"] = FIGURES["pos_embed"]
    if isinstance(record.token_similarity, TokenSimilarity):
        plot_tokens(record.token_similarity, out / FIGURES["tokens"])
        drawn["tokens"] = FIGURES["tokens"]
    plot_disagreement(record.disagreement, out / FIGURES["disagreement"])
    drawn["disagreement"] = FIGURES["disagreement"]
    if maps:
        plot_maps(maps, images, spec, out / FIGURES["maps"])
        drawn["maps"] = FIGURES["maps"]
    return drawn
