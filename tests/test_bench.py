"""python -m distill.bench: end to end on tiny models, the FLOP counter, and that our step and the
timm reference compute the same loss. Never asserts speed (the machine is shared)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distill import bench as bench_command
from distill.models.teacher import ConvnetTeacher, FrozenTeacher
from distill.perf import bench
from distill.recipe.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
# Short everything: no warm-up beyond the priming step, 2 steps, 2 repetitions, a small quick matmul peak.
QUICK = ["--warmup", "0", "--steps", "2", "--repeats", "2", "--peak-seconds", "0.05", "--peak-size", "512"]
ROW_KEYS = {
    "key",
    "label",
    "implementation",
    "kind",
    "distillation",
    "precision",
    "optimizer",
    "teacher",
    "compile",
    "batch_size",
    "peak_memory_mb",
    "optimizer_state_mb",
    "flops_per_step",
    "last_loss",
    "img_s",
    "step_ms",
    "gflop_per_step",
    "achieved_gflops",
    "peak_gflops",
    "fraction_of_peak",
}
STATS_KEYS = {"median", "min", "max", "iqr", "values"}


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    assert bench_command.main([*args, *QUICK, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def check_result(result: dict[str, Any], batch: int, repeats: int = 2) -> dict[str, dict[str, Any]]:
    for key in ("tool", "date", "device", "versions", "provenance", "settings", "matmul_peak_gflops", "memory"):
        assert key in result, key
    assert {"type", "name", "threads", "bf16_available"} <= set(result["device"])
    assert {"torch", "timm", "python"} <= set(result["versions"])
    assert "data loading" in result["settings"]["data"]
    assert result["matmul_peak_gflops"]["fp32"] > 0 and result["matmul_peak_size"] == 512
    for precision, samples in result["matmul_peak_samples"].items():  # before the runs + once per repetition
        assert len(samples) == 1 + repeats and result["matmul_peak_gflops"][precision] == max(samples)
    rows = {r["key"]: r for r in result["configurations"]}
    assert {"ours_identical", "reference", "ours_fast", "ours_no_teacher", "ours_eval"} <= set(rows)
    timed = result["settings"]["fast_precision_step_img_s"]  # auto: chosen by timing the recipe's step
    if result["settings"]["fast_precision_reason"] == "requested" or not result["device"]["bf16_available"]:
        assert timed is None
    else:
        assert set(timed) == {"fp32", "bf16"} and min(timed.values()) > 0
        faster = max(timed, key=timed.get)
        assert result["settings"]["fast_precision"] == faster == rows["ours_fast"]["precision"]
        assert result["settings"]["fast_precision_reason"].startswith("the recipe's step: bf16 ")
    for key, row in rows.items():
        assert set(row) >= ROW_KEYS, key
        assert set(row["img_s"]) >= STATS_KEYS and len(row["img_s"]["values"]) == repeats
        assert row["batch_size"] == batch
        assert all(v > 0 for v in row["img_s"]["values"]), key
        assert row["img_s"]["min"] <= row["img_s"]["median"] <= row["img_s"]["max"]
        assert row["step_ms"]["median"] > 0 and row["peak_memory_mb"] >= 0
        assert row["flops_per_step"] > 0 and row["achieved_gflops"] > 0 and row["fraction_of_peak"] > 0
        assert row["peak_gflops"] == result["matmul_peak_gflops"][row["precision"]]
        if row["kind"] == "train":
            assert math.isfinite(row["last_loss"]), key  # ours and the reference both train
            assert row["optimizer_state_mb"] > 0, key
    # The configurations differ in how, never in what: identical FLOPs with the teacher.
    assert rows["ours_identical"]["flops_per_step"] == rows["reference"]["flops_per_step"]
    assert rows["ours_fast"]["flops_per_step"] == rows["reference"]["flops_per_step"]
    assert rows["ours_eval"]["flops_per_step"] < rows["ours_no_teacher"]["flops_per_step"]
    assert rows["ours_no_teacher"]["flops_per_step"] < rows["ours_identical"]["flops_per_step"]
    ratios = result["ratios"]
    for name, ours in (("identical_settings", "ours_identical"), ("fast_path", "ours_fast")):
        ratio = ratios[name]
        expected = rows[ours]["img_s"]["median"] / rows["reference"]["img_s"]["median"]
        assert ratio["value"] == pytest.approx(expected)
        assert ratio["paired_min"] <= ratio["paired_max"]
    # identical settings: fp32, the reference's optimizer implementation, no compile, the teacher
    # under no_grad in the default memory format as timm runs it
    assert rows["ours_identical"]["precision"] == rows["reference"]["precision"] == "fp32"
    assert rows["ours_identical"]["teacher"] == "NG"
    assert rows["ours_identical"]["optimizer"] == rows["reference"]["optimizer"]
    assert "fused" in rows["ours_fast"]["optimizer"]
    return rows


def test_recipe_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_bench(tmp_path, str(SMOKE))
    rows = check_result(result, batch=16)
    assert result["settings"]["mode"] == "recipe"
    assert result["settings"]["distillation"]["type"] == "hard"  # the recipe's
    assert rows["ours_no_teacher"]["distillation"] == "none"
    printed = capsys.readouterr().out
    assert "ratio, identical settings" in printed and "ratio, fast path" in printed
    assert "timm TokenDistillationTask" in printed
    # The recipe's input pipeline, timed against its step: the smoke recipe is crop + flip on
    # 16 px images, so auto resolves to the tensor path (batch 16, 8 batches: 2 warm-up, 6 timed).
    loading = result["data_loading"]
    assert (loading["store"], loading["num_workers"], loading["batch_size"], loading["batches"]) == ("tensor", 0, 16, 6)
    assert loading["img_s"] > 0 and loading["compared_with"] in rows
    step_img_s = rows[loading["compared_with"]]["img_s"]["median"]
    assert loading["ratio_to_step"] == pytest.approx(loading["img_s"] / step_img_s)
    assert loading["keeps_up"] == (loading["ratio_to_step"] >= 1.0)
    assert "data loading (data.store=tensor, 0 workers, batch 16, 6 batches" in printed


def test_named_models_bf16_soft(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        *("--student", "deit_tiny_distilled_patch16_224", "--teacher", "resnet10t"),
        *("--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2"),
        *("--num-classes", "5", "--batch-size", "8", "--kd", "soft", "--fast-precision", "bf16"),
    )
    rows = check_result(result, batch=8)
    assert result["settings"]["mode"] == "models"
    assert result["settings"]["input_size"] == [3, 16, 16]
    assert result["settings"]["student"]["embed_dim"] == 32 and result["settings"]["student"]["depth"] == 1
    assert rows["reference"]["distillation"] == rows["ours_fast"]["distillation"] == "soft"
    assert rows["ours_fast"]["precision"] == "bf16" and "bf16" in result["matmul_peak_gflops"]
    assert "ours_recipe" not in rows  # named models: the fast path is the primary configuration
    assert result["data_loading"] is None  # no recipe, no data to load
    assert rows["ours_eval"]["precision"] == "bf16"


@pytest.mark.parametrize("kd", ["hard", "soft"])
def test_ours_and_reference_compute_the_same_loss(kd: str) -> None:
    """Same weights, batch, loss type, alpha, tau and label smoothing: the two steps are the
    same computation, so a comparison of their speed is fair."""
    recipe = load_recipe(SMOKE)
    problem = bench.build_problem(recipe, 4, kd, torch.device("cpu"))
    p = problem
    module = FrozenTeacher(copy.deepcopy(p.teacher), p.student_mean, p.student_std, p.teacher_mean, p.teacher_std)
    teacher = ConvnetTeacher(module, p.teacher_spec(), "resnet10t", None, False)
    ours = bench.OursStep(problem, bench.Settings("fp32"), kd, teacher)
    reference = bench.ReferenceStep(problem)
    ours_loss, ref_loss = ours.loss().total, reference.loss()
    assert torch.isfinite(ours_loss) and torch.isfinite(ref_loss)
    assert float(ours_loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-4)
    assert torch.isfinite(ours()) and torch.isfinite(reference())  # a whole step each


def test_count_flops_linear_by_hand() -> None:
    """fwd x @ W^T, bwd dX = dY @ W and dW = dY^T @ X: three (b x i x o) products of 2 b i o FLOPs."""
    b, i, o = 8, 32, 16
    layer = nn.Linear(i, o)
    x = torch.randn(b, i, requires_grad=True)
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o


def test_count_flops_sees_cpu_attention() -> None:
    """torch's counter misses the CPU attention kernel; the bench maps the CUDA formula onto it."""
    q = torch.randn(2, 3, 10, 8)
    b, h, s, d = q.shape
    flops = bench.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * b * h * s * s * d)  # q @ k^T and attn @ v


def test_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_command.main([str(SMOKE), "data.source=imagefolder", f"data.path={tmp_path}"]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert bench_command.main([str(SMOKE), "distillation.token=false"]) == 2
    assert "distillation token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_command.main(["--student", "deit_tiny_distilled_patch16_224"])  # no teacher, no recipe


def test_the_recipes_attention_reaches_our_step_and_nothing_else() -> None:
    """train.attention=manual (README Speed): the recipe's rows time it; identical settings keep
    timm's fused attention, as the reference runs it."""
    recipe = load_recipe(SMOKE, ["train.attention=manual"])
    settings = bench.Settings.of_recipe(recipe)
    assert settings.attention == "manual" and bench.Settings().attention == "fused"
    problem = bench.build_problem(recipe, 4, "hard", torch.device("cpu"))

    def fused(s: bench.Settings) -> set[bool]:
        step = bench.OursStep(problem, s, "hard", bench.make_teacher(problem, s))
        return {m.fused_attn for m in step.model.modules() if hasattr(m, "fused_attn")}

    assert fused(settings) == {False} and fused(bench.Settings()) == {True}
