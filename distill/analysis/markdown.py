"""analysis.md: the analysis record as text for people, one section per analysis, each figure
beside the numbers it draws."""

from __future__ import annotations

from pathlib import Path

from distill.analysis.figures import FIGURES
from distill.analysis.record import (
    AnalysisRecord,
    AttentionDistance,
    AttentionMaps,
    Disagreement,
    PosEmbed,
    Skipped,
    TokenSimilarity,
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def attention_sentence(att: AttentionDistance) -> str:
    first, last = att.per_layer[0], att.per_layer[-1]
    heads = [d for layer in att.per_head for d in layer]
    grid = "x".join(str(v) for v in att.grid)
    patch = "x".join(str(v) for v in att.patch_size)
    return (
        f"Mean attention distance {att.trend} with depth: {first:.2f} px in block 1, {last:.2f} px in "
        f"block {len(att.per_layer)} (heads from {min(heads):.2f} to {max(heads):.2f} px; uniform attention "
        f"over this {grid} grid of {patch} px patches would give {att.uniform_px:.2f} px)."
    )


def _attention_section(att: AttentionDistance) -> list[str]:
    names = list(att.prefix_queries)
    rows = []
    for i, (mean, heads) in enumerate(zip(att.per_layer, att.per_head)):
        share = sum(att.prefix_share_per_head[i]) / len(heads)
        spreads = [f"{att.prefix_queries[n].spread_px_per_layer[i]:.2f}" for n in names]
        rows.append([f"block {i + 1}", f"{mean:.2f}", ", ".join(f"{h:.2f}" for h in heads), *spreads, f"{share:.3f}"])
    header = ["layer", "mean px", "per head px", *[f"{n} query spread px" for n in names], "patch attention on prefix"]
    return ["## Attention distance", "", attention_sentence(att), "", _table(header, rows), "",
            f"![attention distance]({FIGURES['attention_distance']})", ""]  # fmt: skip


def _pos_section(pos: PosEmbed | Skipped) -> list[str]:
    head = ["## Position-embedding similarity", ""]
    if isinstance(pos, Skipped):
        return [*head, f"Skipped: {pos.skipped}.", ""]
    sentence = (
        f"Grid neighbours' position embeddings have mean cosine {pos.neighbour:.2f} against "
        f"{pos.distant:.2f} for distant patches (same row or column: {pos.same_row_col:.2f}), a contrast "
        f"of {pos.contrast:.2f}: about 0 would mean the embedding learned no 2D structure."
    )
    return [*head, sentence, "", f"![position embedding similarity]({FIGURES['pos_embed']})", ""]


def _token_section(tok: TokenSimilarity | Skipped) -> list[str]:
    head = ["## Class and distillation tokens", ""]
    if isinstance(tok, Skipped):
        return [*head, f"Skipped: {tok.skipped}.", ""]
    sentence = (
        f"The class and distillation tokens have cosine {tok.learned_tokens:.2f} as learned parameters and "
        f"{tok.cosine[-2]:.2f} after the last block (DeiT-B: 0.06 -> 0.93); the two heads' output "
        f"distributions have cosine {tok.heads_output_cosine:.4f}."
    )
    rows = [["learned tokens", f"{tok.learned_tokens:.3f}", "0.06"]]
    last = len(tok.layers) - 2
    rows += [[n, f"{c:.3f}", "0.93" if i == last else ""] for i, (n, c) in enumerate(zip(tok.layers, tok.cosine))]
    table = _table(["layer", "cosine (mean over images)", "DeiT-B"], rows)
    return [*head, sentence, "", table, "", f"![token similarity]({FIGURES['tokens']})", ""]


def disagreement_sentence(dis: Disagreement, images: int) -> str:
    w = dis.with_teacher
    if w is None:
        return f"Teacher rows skipped: {dis.teacher_skipped}."
    if "dist" not in w:
        return f"On {images} validation images the student disagrees with the teacher on {100 * w['cls']:.1f}% of them."
    return (
        f"On {images} validation images the distillation head disagrees with the teacher on {100 * w['dist']:.1f}% "
        f"of them, the class head on {100 * w['cls']:.1f}% and the fused output on {100 * w['fused']:.1f}% "
        "(DeiT-B on ImageNet: 10.0%, 11.2% and 10.2%)."
    )


def _disagreement_section(dis: Disagreement, images: int) -> list[str]:
    rows = [[n, *(f"{v:.3f}" for v in row)] for n, row in zip(dis.sources, dis.matrix)]
    lines = [
        "## Disagreement (DeiT table 4)",
        "",
        disagreement_sentence(dis, images),
        "",
        _table(["", *dis.sources], rows),
        "",
    ]
    if dis.classes and dis.with_teacher:
        heads = list(dis.with_teacher)
        worst = [[c.name, str(c.images), *(f"{c.with_teacher[h]:.3f}" for h in heads)] for c in dis.classes[:5]]
        lines += ["Classes where the heads and the teacher disagree most:", "",
                  _table(["class", "images", *[f"{h} vs teacher" for h in heads]], worst), ""]  # fmt: skip
    return [*lines, f"![disagreement]({FIGURES['disagreement']})", ""]


def _maps_section(maps: AttentionMaps | Skipped) -> list[str]:
    head = ["## Attention maps", ""]
    if isinstance(maps, Skipped):
        return [*head, f"Skipped: {maps.skipped}.", ""]
    return [
        *head,
        "The prefix tokens' attention over the patches (mean over heads) on the first "
        f"{len(maps.images)} of these images, in the last layer and rolled out across layers: brighter is "
        "more attention.",
        "",
        f"![attention maps]({FIGURES['maps']})",
        "",
    ]


def write_markdown(record: AnalysisRecord, path: Path) -> None:
    lines = [
        f"# Inside {record.model.description}",
        "",
        f"{record.data.images} validation images of {record.data.description}, on {record.device}, in "
        f"{record.seconds.total:.1f} s.",
        "",
        *_attention_section(record.attention_distance),
        *_pos_section(record.pos_embed),
        *_token_section(record.token_similarity),
        *_disagreement_section(record.disagreement, record.data.images),
        *_maps_section(record.attention_maps),
    ]
    if record.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in record.notes], ""]
    path.write_text("\n".join(lines))
