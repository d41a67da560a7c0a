"""distill.analysis: the maths on hand-built inputs, attention read from timm's own modules, and
the command on bad input and on a smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distill.analysis import collect, figures, inputs, maths, record, runner, sections
from distill.analyze import main
from tests.helpers import SMOKE

# ---------------------------------------------------------------------------------------------
# Attention distance


def closed_form_uniform(rows: int, cols: int, ph: float, pw: float) -> float:
    """Mean distance between two patch centres drawn uniformly from a rows x cols grid: offsets
    (dy, dx) occur (rows - |dy|)(cols - |dx|) times among the (rows * cols)^2 ordered pairs."""
    total = sum(
        (rows - abs(dy)) * (cols - abs(dx)) * math.hypot(dy * ph, dx * pw)
        for dy in range(-rows + 1, rows)
        for dx in range(-cols + 1, cols)
    )
    return total / (rows * cols) ** 2


def uniform_attention(batch: int, heads: int, tokens: int) -> torch.Tensor:
    return torch.full((batch, heads, tokens, tokens), 1.0 / tokens)


def test_uniform_attention_2x2_by_hand() -> None:
    # From any patch of a 2x2 grid: itself (0), two neighbours (p), one diagonal (p * sqrt 2).
    p = 4
    d = maths.pairwise_distances(maths.patch_centres((2, 2), (p, p)))
    got = maths.patch_query_distance(uniform_attention(1, 1, 4), d, prefix=0)
    assert got.item() == pytest.approx(p * (2 + math.sqrt(2)) / 4, rel=1e-12)


@pytest.mark.parametrize(("grid", "patch"), [((3, 3), (4, 4)), ((4, 4), (16, 16)), ((2, 5), (4, 4)), ((3, 2), (2, 6))])
@pytest.mark.parametrize("prefix", [0, 2])
def test_uniform_attention_matches_closed_form(grid: tuple[int, int], patch: tuple[int, int], prefix: int) -> None:
    # Uniform over every token, prefix ones included: renormalised over the patches it is uniform there.
    centres = maths.patch_centres(grid, patch)
    n = grid[0] * grid[1]
    got = maths.patch_query_distance(uniform_attention(2, 3, prefix + n), maths.pairwise_distances(centres), prefix)
    expected = closed_form_uniform(*grid, *patch)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, torch.full((2, 3), expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert maths.uniform_distance(grid, patch) == pytest.approx(expected, rel=1e-12)
    if prefix:
        share = maths.prefix_share(uniform_attention(2, 3, prefix + n), prefix)
        torch.testing.assert_close(share, torch.full((2, 3), prefix / (prefix + n), dtype=torch.float64))


def test_attention_to_itself_is_distance_zero() -> None:
    grid, prefix = (3, 4), 2
    n = grid[0] * grid[1]
    attn = torch.zeros(1, 2, prefix + n, prefix + n)
    attn[0, :, torch.arange(prefix + n), torch.arange(prefix + n)] = 1.0
    d = maths.pairwise_distances(maths.patch_centres(grid, (4, 4)))
    assert maths.patch_query_distance(attn, d, prefix).abs().max().item() == 0.0


def test_patch_centres_row_major() -> None:
    c = maths.patch_centres((2, 3), (4, 6))  # timm flattens (rows, cols) row by row
    assert c.tolist() == [[2, 3], [2, 9], [2, 15], [6, 3], [6, 9], [6, 15]]


def test_prefix_query_spread() -> None:
    grid, prefix = (2, 2), 2
    attn = torch.zeros(1, 1, 6, 6)
    attn[0, 0, 0, prefix + 3] = 1.0  # the class token looks at one patch: no spread
    attn[0, 0, 1, prefix:] = 0.25  # the distillation token at all four: each is p/sqrt(2) from the centre
    spread = maths.prefix_query_spread(attn, maths.patch_centres(grid, (4, 4)), prefix)
    assert spread[0, 0].tolist() == pytest.approx([0.0, 4 / math.sqrt(2)], abs=1e-12)


def test_rollout_of_identity_is_identity_and_rows_sum_to_one() -> None:
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(maths.attention_rollout([eye, eye]), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    rand = torch.rand(2, 3, 5, 5).softmax(-1)
    rolled = maths.attention_rollout([rand, rand.flip(-1)])
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    # One layer: 0.5 * mean over heads + 0.5 * I (rows already sum to one).
    torch.testing.assert_close(maths.attention_rollout([rand]), 0.5 * rand.double().mean(1) + 0.5 * torch.eye(5))


@pytest.mark.parametrize(
    ("values", "trend"),
    [([1.0, 2.0, 3.0], "grows monotonically"), ([1.0, 3.0, 2.5], "grows overall, not monotonically"),
     ([3.0, 2.0, 2.5], "does not grow"), ([2.0], "does not grow (one layer)"),
     ([8.03, 8.031, 8.032], "does not grow")],
)  # fmt: skip
def test_depth_trend(values: list[float], trend: str) -> None:
    assert maths.depth_trend(values, tolerance=0.01) == trend


# ---------------------------------------------------------------------------------------------
# Position embeddings


def smooth_embedding(rows: int, cols: int, a: float) -> torch.Tensor:
    """e(r, c) = (cos ar, sin ar, cos ac, sin ac): cos(e(p), e(q)) = (cos a dr + cos a dc) / 2."""
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)
    return torch.stack([torch.cos(a * r), torch.sin(a * r), torch.cos(a * c), torch.sin(a * c)], dim=1)


@pytest.mark.parametrize("grid", [(4, 4), (3, 6)])
def test_smooth_position_embedding_contrast(grid: tuple[int, int]) -> None:
    rows, cols = grid
    a = math.pi / 4
    got = maths.grid_structure(maths.cosine_matrix(smooth_embedding(rows, cols, a)), grid)
    # Neighbours differ by one step in one direction: (cos a + 1) / 2 exactly.
    assert got["neighbour"] == pytest.approx((math.cos(a) + 1) / 2, abs=1e-12)
    far = math.ceil(max(grid) / 2)
    offsets = [
        (r1 - r2, c1 - c2)
        for r1 in range(rows) for c1 in range(cols) for r2 in range(rows) for c2 in range(cols)
        if max(abs(r1 - r2), abs(c1 - c2)) >= far
    ]  # fmt: skip
    distant = sum((math.cos(a * dr) + math.cos(a * dc)) / 2 for dr, dc in offsets) / len(offsets)
    assert got["distant"] == pytest.approx(distant, abs=1e-12)
    assert got["contrast"] == pytest.approx((math.cos(a) + 1) / 2 - distant, abs=1e-12)
    assert got["contrast"] > 0.3


def test_unstructured_position_embedding_has_no_contrast() -> None:
    g = torch.Generator().manual_seed(0)
    got = maths.grid_structure(maths.cosine_matrix(torch.randn(64, 4096, generator=g)), (8, 8))
    assert abs(got["contrast"]) < 0.02


def test_pos_embed_mosaic_places_each_patch_tile() -> None:
    grid = (2, 3)
    sim = maths.cosine_matrix(smooth_embedding(*grid, 0.7))
    mosaic = maths.pos_embed_mosaic(sim, grid)
    assert mosaic.shape == (2 * 3 - 1, 3 * 4 - 1)
    # Tile of patch (1, 2) starts at row 1 * 3, column 2 * 4; its own cell is (1, 2) within it.
    assert mosaic[3 + 1, 8 + 2].item() == pytest.approx(1.0)
    torch.testing.assert_close(mosaic[3:5, 8:11], sim[5].reshape(grid))
    assert torch.isnan(mosaic[2]).all()


# ---------------------------------------------------------------------------------------------
# Tokens and disagreement


def test_identical_tokens_have_cosine_one() -> None:
    t = torch.randn(3, 1, 8)
    assert maths.token_cosine(torch.cat([t, t, torch.randn(3, 4, 8)], 1)).tolist() == pytest.approx([1.0] * 3)


def test_disagreement_matrix_by_hand() -> None:
    preds = {
        "ground truth": torch.tensor([0, 1, 2, 3]),
        "teacher": torch.tensor([0, 1, 2, 0]),
        "cls": torch.tensor([0, 1, 0, 0]),
        "dist": torch.tensor([0, 1, 2, 0]),
    }
    assert maths.disagreement_matrix(preds) == [
        [0.0, 0.25, 0.5, 0.25],
        [0.25, 0.0, 0.25, 0.0],
        [0.5, 0.25, 0.0, 0.25],
        [0.25, 0.0, 0.25, 0.0],
    ]
    rows = maths.class_disagreement(preds["ground truth"], preds, ["cls", "dist"], ["a", "b", "c", "d"])
    assert rows[0] == record.ClassDisagreement(name="c", images=1, with_teacher={"cls": 1.0, "dist": 0.0})
    assert rows[0].model_dump() == {"class": "c", "images": 1, "cls": 1.0, "dist": 0.0}  # the row on disk
    assert [r.name for r in rows] == ["c", "a", "b", "d"]


# ---------------------------------------------------------------------------------------------
# Reading timm's attention


def test_recorded_attention_equals_hand_computation() -> None:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    block.attn.fused_attn = True
    with torch.no_grad():
        fused_out = block(x)
        with collect.AttentionRecorder([block.attn]) as rec:
            assert block.attn.fused_attn is False
            out = block(x)
            got = rec.attn[0]
    assert block.attn.fused_attn is True  # restored
    torch.testing.assert_close(out, fused_out, rtol=1e-5, atol=1e-6)  # the same block, unfused
    with torch.no_grad():
        qkv = block.attn.qkv(block.norm1(x)).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        expected = (q @ k.transpose(-2, -1) / math.sqrt(8)).softmax(-1)
    assert got is not None and got.shape == (2, 2, 5, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def tiny_vit(
    distilled: bool = True, img_size: int | tuple[int, int] = 16, depth: int = 2, classes: int = 3
) -> torch.nn.Module:
    import timm

    name = "deit_tiny_distilled_patch16_224" if distilled else "deit_tiny_patch16_224"
    torch.manual_seed(0)
    return timm.create_model(
        name,
        pretrained=False,
        img_size=img_size,
        patch_size=4,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        num_classes=classes,
    ).eval()


def batches(n: int, size: tuple[int, int], count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, *size, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(count)]


def test_identical_class_and_distillation_tokens_stay_identical() -> None:
    model = tiny_vit()
    with torch.no_grad():
        model.dist_token.copy_(model.cls_token)
        model.pos_embed[:, 1].copy_(model.pos_embed[:, 0])
        model.head_dist.load_state_dict(model.head.state_dict())
    col = collect.collect(model, iter(batches(4, (16, 16))))
    tok = sections.token_results(model, col)
    assert isinstance(tok, record.TokenSimilarity)
    assert tok.learned_tokens == pytest.approx(1.0)
    assert tok.layers == ["embedding", "block 1", "block 2", "norm"]
    assert tok.cosine == pytest.approx([1.0] * 4, abs=1e-6)
    assert tok.heads_output_cosine == pytest.approx(1.0, abs=1e-6)


def test_collect_on_a_non_square_grid() -> None:
    model = tiny_vit(img_size=(8, 20), depth=3)  # 2 x 5 patches of 4 px
    col = collect.collect(model, iter(batches(3, (8, 20))), maps=4)
    assert col.geometry == collect.Geometry((2, 5), (4, 4), 2, ("cls", "dist"))
    att = sections.attention_results(col)
    assert len(att.per_head) == 3 and len(att.per_head[0]) == 2
    assert all(0 < d < 20 for layer in att.per_head for d in layer)  # inside the 8 x 20 image
    assert att.uniform_px == pytest.approx(closed_form_uniform(2, 5, 4, 4))
    assert set(col.maps) == {"cls last", "dist last", "cls rollout", "dist rollout"}
    assert len(col.map_images) == 4 and col.maps["cls rollout"][0].shape == (2, 5)
    pos = sections.pos_embed_results(model, col.geometry)
    assert isinstance(pos, record.PosEmbed)
    assert len(pos.similarity) == 10 and pos.similarity[3][3] == pytest.approx(1.0)
    assert col.images == 6 and [len(torch.cat(v)) for v in col.predictions.values()] == [6, 6, 6]


def test_plain_vit_skips_the_token_analyses() -> None:
    model = tiny_vit(distilled=False)
    col = collect.collect(model, iter(batches(2, (16, 16))))
    assert col.heads == ["cls"] and col.geometry.prefix_names == ("cls",)
    tok = sections.token_results(model, col)
    assert isinstance(tok, record.Skipped) and "distillation token" in tok.skipped
    assert set(col.maps) == {"cls last", "cls rollout"}


def test_select_images_is_seeded_and_sorted() -> None:
    assert runner.select_images(10, 20) == list(range(10))
    picked = runner.select_images(100, 7)
    assert picked == sorted(picked) and len(set(picked)) == 7 and picked == runner.select_images(100, 7)


# ---------------------------------------------------------------------------------------------
# analysis.json


def unversioned_analysis() -> dict:
    """An analysis.json in the layout written before the file carried a version: a 1 x 2 grid,
    one block, a teacher. ``same_row_col`` is NaN there (no pair in a line that is not a
    neighbour pair) and ``json`` writes it as NaN."""
    return {
        "model": {
            "description": "run r (checkpoint step_00000016)", "path": "r", "run_dir": "r",
            "checkpoint": "r/checkpoints/step_00000016", "progress": {"epoch": 2, "global_step": 16},
            "architecture": "VisionTransformerDistilled", "depth": 1, "num_heads": 2, "embed_dim": 32,
            "input": {"input_size": [3, 4, 8], "interpolation": "bilinear"},
        },
        "data": {"description": "synthetic val", "images": 4, "indices": [0, 1, 2, 3], "classes": ["a", "b"]},
        "device": "cpu",
        "attention_distance": {
            "unit": "px", "grid": [1, 2], "patch_size": [4, 4], "uniform_px": 2.0, "per_head": [[1.0, 3.0]],
            "per_layer": [2.0], "trend": "does not grow (one layer)", "prefix_share_per_head": [[0.25, 0.5]],
            "prefix_queries": {
                "cls": {"spread_px_per_head": [[1.5, 2.5]], "spread_px_per_layer": [2.0]},
                "dist": {"spread_px_per_head": [[0.5, 0.5]], "spread_px_per_layer": [0.5]},
            },
        },
        "pos_embed": {
            "grid": [1, 2], "similarity": [[1.0, 0.5], [0.5, 1.0]], "neighbour": 0.5, "distant": 0.5,
            "same_row_col": math.nan, "contrast": 0.0,
        },
        "token_similarity": {
            "learned_tokens": 0.06, "layers": ["embedding", "block 1", "norm"], "cosine": [0.1, 0.9, 0.8],
            "heads_output_cosine": 0.99, "paper": {"learned tokens": 0.06, "last layer": 0.93},
        },
        "disagreement": {
            "sources": ["ground truth", "teacher", "cls", "dist", "fused"],
            "matrix": [[0.0, 0.25, 0.5, 0.25, 0.25], [0.25, 0.0, 0.25, 0.0, 0.0], [0.5, 0.25, 0.0, 0.25, 0.25],
                       [0.25, 0.0, 0.25, 0.0, 0.0], [0.25, 0.0, 0.25, 0.0, 0.0]],
            "top1": {"teacher": 0.75, "cls": 0.5, "dist": 0.75, "fused": 0.75},
            "paper_teacher": {"cls": 0.112, "dist": 0.1, "fused": 0.102},
            "with_teacher": {"cls": 0.25, "dist": 0.0, "fused": 0.0},
            "classes": [{"class": "b", "images": 2, "cls": 0.5, "dist": 0.0, "fused": 0.0},
                        {"class": "a", "images": 2, "cls": 0.0, "dist": 0.0, "fused": 0.0}],
        },
        "attention_maps": {"skipped": "the model has no class token, or no images were asked for (--maps 0)"},
        "figures": {"attention_distance": "attention_distance.png"},
        "notes": ["a note"],
        "seconds": {"pass": 1.5, "figures": 0.5, "total": 2.0},
        "versions": {"distill": "0.1.0", "torch": "2.5.1", "timm": "1.0.31"},
    }  # fmt: skip


def test_an_unversioned_analysis_is_read_and_rewritten_in_the_same_layout(tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(unversioned_analysis(), indent=1))
    got = record.read_analysis(old)
    assert got.version == 1 and got.seconds.pass_ == 1.5
    assert isinstance(got.pos_embed, record.PosEmbed) and math.isnan(got.pos_embed.same_row_col)
    assert isinstance(got.attention_maps, record.Skipped)
    assert got.disagreement.classes is not None and got.disagreement.classes[0].with_teacher["cls"] == 0.5
    new = tmp_path / "new.json"
    record.write_analysis(got, new)
    written = json.loads(new.read_text())
    assert next(iter(written)) == "version" and written.pop("version") == 1
    assert json.dumps(written) == json.dumps(unversioned_analysis())  # NaN compares as text
    assert record.analysis_summary(old) == {
        "model": "run r (checkpoint step_00000016)", "images": 4, "attention_distance_px": [2.0],
        "attention_distance_trend": "does not grow (one layer)", "uniform_distance_px": 2.0,
        "token_cosine": {"embedding": 0.1, "block 1": 0.9, "norm": 0.8}, "learned_token_cosine": 0.06,
        "heads_output_cosine": 0.99, "disagreement_with_teacher": {"cls": 0.25, "dist": 0.0, "fused": 0.0},
        "pos_embed_contrast": 0.0, "notes": ["a note"],
    }  # fmt: skip


def test_a_newer_analysis_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps({"version": 2, **unversioned_analysis()}))
    with pytest.raises(record.AnalysisError, match=r"analysis\.json version 2, which this distill cannot read"):
        record.read_analysis(path)


def test_a_broken_analysis_names_the_field(tmp_path: Path) -> None:
    broken = unversioned_analysis()
    del broken["attention_distance"]["per_layer"]
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(record.AnalysisError, match=r"not a readable analysis\.json \(attention_distance\.per_layer: "):
        record.read_analysis(path)
    path.write_text("[]")
    with pytest.raises(record.AnalysisError, match=r"not an analysis\.json \(not a JSON object\)"):
        record.analysis_summary(path)


@pytest.mark.parametrize(
    ("teacher", "weights"),
    [(None, None), ({}, None), ({"weights": None}, None), ({"weights": "None"}, None),
     ({"weights": "runs/teachers/resnet-1/model.safetensors"}, Path("runs/teachers/resnet-1/model.safetensors"))],
)  # fmt: skip
def test_recorded_teacher_weights(teacher: dict | None, weights: Path | None) -> None:
    assert inputs.recorded_weights(teacher) == weights


# ---------------------------------------------------------------------------------------------
# Files, summary and the command


@pytest.mark.slow
def test_analyze_writes_every_file(tmp_path: Path) -> None:
    """A hand-built student on the smoke recipe's synthetic data, no teacher: every figure, the
    JSON, the markdown and the summary."""
    from distill.data.sources import load_source
    from distill.exports.artifacts import LoadedModel
    from distill.models.spec import InputSpec
    from distill.recipe.schema import load_recipe

    model = tiny_vit(classes=4)  # the smoke data's 4 classes
    spec = InputSpec((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
    loaded = LoadedModel(model, spec, "a hand-built student")
    data = inputs.AnalysisData(load_source(load_recipe(SMOKE).data), "synthetic val", own=False)
    options = runner.AnalysisOptions(images=12, maps=3, batch_size=5)
    result = runner.analyze(loaded, data, tmp_path, options, teacher_note="no teacher here")
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"analysis.json", "analysis.md", *figures.FIGURES.values()}
    stored = record.read_analysis(tmp_path / "analysis.json")
    assert stored == result and stored.version == record.SCHEMA_VERSION
    assert stored.data.images == 12 and len(stored.data.indices) == 12
    assert stored.disagreement.sources == ["ground truth", "cls", "dist", "fused"]
    assert stored.disagreement.teacher_skipped == "no teacher here" and stored.disagreement.with_teacher is None
    assert isinstance(stored.attention_maps, record.AttentionMaps)
    assert stored.attention_maps.images == stored.data.indices[:3]
    md = (tmp_path / "analysis.md").read_text()
    for figure in figures.FIGURES.values():
        assert f"]({figure})" in md
    assert "DeiT-B: 0.06 -> 0.93" in md and "Teacher rows skipped: no teacher here." in md
    summary = record.analysis_summary(tmp_path / "analysis.json")
    assert summary["attention_distance_px"] == result.attention_distance.per_layer
    assert list(summary["token_cosine"]) == ["embedding", "block 1", "block 2", "norm"]
    assert summary["disagreement_with_teacher"] is None


def test_missing_path_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere does not exist" in err and "Traceback" not in err


def test_convnet_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet10t", pretrained=False, num_classes=3), str(tmp_path / "teacher"))
    assert main([str(tmp_path / "teacher"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ResNet has no timm attention layers") and "not a convnet teacher" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("images", ["0", "-3"])
def test_images_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str], images: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path), "--images", images]) == 2
    assert capsys.readouterr().err == f"error: --images must be at least 1 (or 'all'), got {images}\n"


def test_a_split_folder_is_data(tmp_path: Path) -> None:
    """A folder of class folders, no train/: read as one split, as python -m distill.evaluate reads it."""
    from PIL import Image

    from distill.exports.artifacts import LoadedModel
    from distill.models.spec import InputSpec

    for k, name in enumerate(["ant", "bee"]):
        (tmp_path / "holdout" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * k, 10 * i, 0)).save(tmp_path / "holdout" / name / f"{i}.png")
    spec = InputSpec((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bilinear")
    data = inputs.analysis_data(str(tmp_path / "holdout"), LoadedModel(tiny_vit(), spec, "a student"))
    assert data.split.class_names == ["ant", "bee"] and len(data.split.val) == 6
    assert data.description == f"imagefolder {tmp_path.resolve()}/holdout" and not data.own


def test_device_must_be_cpu_or_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--device", "gpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: invalid choice: 'gpu' (choose from 'cpu', 'cuda')" in err and "Traceback" not in err


def test_cuda_without_a_gpu_is_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([str(tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "error: --device cuda but torch sees no GPU; pass --device cpu or leave --device out\n"
    )


@pytest.mark.slow
def test_smoke_run_end_to_end(smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(smoke_run), "--images", "all", "--out", str(tmp_path / "run"), "--maps", "2"]) == 0
    out = capsys.readouterr().out
    assert "Mean attention distance" in out and "(DeiT-B: 0.06 -> 0.93)" in out
    result = record.read_analysis(tmp_path / "run" / "analysis.json")
    assert result.data.images == 40  # the smoke recipe's 4 x 10 validation images
    assert result.model.checkpoint is not None and result.model.checkpoint.endswith("step_00000016")
    assert result.notes == []
    dis = result.disagreement
    assert dis.sources == ["ground truth", "teacher", "cls", "dist", "fused"] and dis.with_teacher is not None
    summary_json = json.loads((smoke_run / "summary.json").read_text())
    # Same images, same teacher, same student: the run's own final figures.
    final = summary_json["final"]
    assert dis.top1["fused"] == pytest.approx(final["val/top1_fused"])
    assert dis.top1["teacher"] == pytest.approx(final["val/teacher_top1"])
    assert 1 - dis.with_teacher["fused"] == pytest.approx(final["val/agreement"])
    # The export: no teacher (a note), the run's data given explicitly.
    assert main([str(smoke_run / "export"), "--data", str(SMOKE), "--images", "8", "--out", str(tmp_path / "e")]) == 0
    exported = record.read_analysis(tmp_path / "e" / "analysis.json")
    assert exported.notes == ["an export carries no teacher"]
    assert exported.data.images == 8 and exported.disagreement.sources == ["ground truth", "cls", "dist", "fused"]
    assert set(exported.figures) == {"attention_distance", "pos_embed", "tokens", "disagreement", "maps"}
