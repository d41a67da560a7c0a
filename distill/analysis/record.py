"""analysis.json as a typed record: what one analysis found, with a schema version; the one
writer (``write_analysis``), the one reader (``read_analysis``) and the figures a study report
shows per run (``analysis_summary``).

A file without ``version`` has version 1's layout less that field and is read as version 1; any
other version is refused with a message naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from distill.errors import DistillError

SCHEMA_VERSION = 1
ANALYSIS_FILE = "analysis.json"


class AnalysisError(DistillError):
    """The model or the request cannot be analysed (no attention layers, no images), or an
    analysis.json cannot be read."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Skipped(_Section):
    """An analysis that does not apply to this model, and why."""

    skipped: str


class PrefixQueries(_Section):
    """A prefix token's spread around the centre of mass of its attention over the patches."""

    spread_px_per_head: list[list[float]]  # (layers, heads)
    spread_px_per_layer: list[float]


class AttentionDistance(_Section):
    """ViT fig. 7 (right): mean attention distance of patch queries per layer and head."""

    unit: str = "px"
    grid: tuple[int, int]  # patch rows, columns
    patch_size: tuple[int, int]  # a token's footprint in pixels (h, w)
    uniform_px: float  # uniform attention over the grid: the 'global' reference
    per_head: list[list[float]]  # (layers, heads)
    per_layer: list[float]
    trend: str  # maths.depth_trend's verdict
    prefix_share_per_head: list[list[float]]  # a patch query's attention share on prefix tokens
    prefix_queries: dict[str, PrefixQueries]  # per prefix token: cls, dist, reg1 ...


class PosEmbed(_Section):
    """ViT fig. 7 (centre): the patches' position-embedding cosine and maths.grid_structure."""

    grid: tuple[int, int]
    similarity: list[list[float]]  # (patches, patches)
    neighbour: float
    distant: float
    same_row_col: float
    contrast: float


class TokenSimilarity(_Section):
    """DeiT sec. 4: class/distillation token cosine as learned parameters and per layer."""

    learned_tokens: float
    layers: list[str]  # embedding, block 1 ... block L, norm
    cosine: list[float]  # per layer, mean over images
    heads_output_cosine: float  # cosine of the two heads' softmax outputs
    paper: dict[str, float]


class ClassDisagreement(_Section):
    """One ground-truth class: its images and each head's disagreement with the teacher. On
    disk a flat row ``{"class": ..., "images": ..., "cls": ..., "dist": ..., "fused": ...}``."""

    name: str
    images: int
    with_teacher: dict[str, float]  # head -> share of the class's images

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if isinstance(row, dict) and "class" in row:
            rates = {k: v for k, v in row.items() if k not in ("class", "images")}
            return {"name": row["class"], "images": row.get("images"), "with_teacher": rates}
        return row

    @model_serializer
    def _to_row(self) -> dict[str, Any]:
        return {"class": self.name, "images": self.images, **self.with_teacher}


class Disagreement(_Section):
    """DeiT table 4: pairwise disagreement between ground truth, the teacher and each head.
    With a teacher: ``with_teacher`` and ``classes``; without: ``teacher_skipped`` says why."""

    sources: list[str]  # ground truth, teacher (when there is one), cls, dist, fused
    matrix: list[list[float]]  # (sources, sources) share of images on which the two differ
    top1: dict[str, float]
    paper_teacher: dict[str, float]
    with_teacher: dict[str, float] | None = None
    classes: list[ClassDisagreement] | None = None  # most-disagreeing first
    teacher_skipped: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: Any) -> dict[str, Any]:
        optional = ("with_teacher", "classes", "teacher_skipped")
        return {k: v for k, v in handler(self).items() if v is not None or k not in optional}


class AttentionMaps(_Section):
    """The prefix tokens' attention over the patches (head mean) on the first images."""

    images: list[int]  # validation indices
    maps: dict[str, list[list[list[float]]]]  # "cls last", "dist rollout" ... -> per image (rows, cols)


class ModelInfo(_Section):
    description: str
    path: str | None  # what was given to the command
    run_dir: str | None
    checkpoint: str | None
    progress: dict[str, Any] | None  # the checkpoint's progress.json
    architecture: str
    depth: int
    num_heads: int
    embed_dim: int
    input: dict[str, Any]  # timm's data config of the student


class DataInfo(_Section):
    description: str
    images: int
    indices: list[int]  # validation indices analysed
    classes: list[str]


class Seconds(_Section):
    pass_: float = Field(alias="pass")  # the one pass over the images
    figures: float
    total: float


class AnalysisRecord(_Section):
    """Everything one analysis found: analysis.json."""

    version: int = SCHEMA_VERSION
    model: ModelInfo
    data: DataInfo
    device: str
    attention_distance: AttentionDistance
    pos_embed: PosEmbed | Skipped
    token_similarity: TokenSimilarity | Skipped
    disagreement: Disagreement
    attention_maps: AttentionMaps | Skipped
    figures: dict[str, str]  # figure key -> PNG file name beside analysis.json
    notes: list[str]
    seconds: Seconds
    versions: dict[str, str]  # distill, torch, timm


def write_analysis(record: AnalysisRecord, path: Path) -> None:
    """analysis.json. ``json.dumps`` rather than pydantic's JSON writer: a NaN (a grid too small
    for distant patches) stays NaN, which ``json.loads`` reads back, where pydantic writes null."""
    path.write_text(json.dumps(record.model_dump(by_alias=True), indent=1))


def read_analysis(path: Path) -> AnalysisRecord:
    """An analysis.json of any version this code knows; an error naming the file otherwise."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise AnalysisError(f"cannot read {path} ({exc}); rerun python -m distill.analyze") from None
    if not isinstance(raw, dict):
        raise AnalysisError(f"{path} is not an analysis.json (not a JSON object); rerun python -m distill.analyze")
    version = raw.get("version", SCHEMA_VERSION)  # no version: version 1's layout
    if version != SCHEMA_VERSION:
        raise AnalysisError(
            f"{path} is analysis.json version {version!r}, which this distill cannot read (it reads version "
            f"{SCHEMA_VERSION}); update distill, or rerun python -m distill.analyze to rewrite it"
        )
    try:
        return AnalysisRecord.model_validate({**raw, "version": version})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AnalysisError(f"{path} is not a readable analysis.json ({where}: {first['msg']})") from None


def analysis_summary(source: AnalysisRecord | str | Path) -> dict[str, Any]:
    """The figures a study report shows per run, from an analysis (analysis.json or its record):
    mean attention distance per layer (px) and its trend with depth, the class/distillation
    token cosine per layer (None without the token), and each head's disagreement with the
    teacher (None without a teacher)."""
    record = source if isinstance(source, AnalysisRecord) else read_analysis(Path(source))
    att, tok, pos = record.attention_distance, record.token_similarity, record.pos_embed
    with_token = isinstance(tok, TokenSimilarity)
    return {
        "model": record.model.description,
        "images": record.data.images,
        "attention_distance_px": att.per_layer,
        "attention_distance_trend": att.trend,
        "uniform_distance_px": att.uniform_px,
        "token_cosine": dict(zip(tok.layers, tok.cosine)) if with_token else None,
        "learned_token_cosine": tok.learned_tokens if with_token else None,
        "heads_output_cosine": tok.heads_output_cosine if with_token else None,
        "disagreement_with_teacher": record.disagreement.with_teacher,
        "pos_embed_contrast": pos.contrast if isinstance(pos, PosEmbed) else None,
        "notes": record.notes,
    }
