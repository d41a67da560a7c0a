"""python -m distill.bench: end to end on tiny models, the FLOP counter, that our step and the
timm reference compute the same loss, the fast path's search and train.attention's auto rule.
Never asserts speed (the machine is shared)."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distill import bench as bench_command
from distill.models.teacher import ConvnetTeacher, FrozenTeacher
from distill.perf import fastpath, measure
from distill.perf import steps as bench
from distill.recipe.schema import load_recipe

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "recipes" / "smoke.yaml"
# Short everything: no warm-up beyond the priming step, 2 steps, 2 repetitions, a small quick matmul
# peak, no compile (Inductor's C++ build takes a minute on 2 cores).
QUICK = ["--warmup", "0", "--steps", "2", "--repeats", "2", "--peak-seconds", "0.05", "--peak-size", "512"]
QUICK += ["--compile", "no"]
ROW_KEYS = {
    "key",
    "label",
    "implementation",
    "kind",
    "distillation",
    "precision",
    "attention",
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
    s = result["settings"]
    timed = s["fast_precision_step_img_s"]  # auto: chosen by timing the recipe's step
    assert (s["fast_precision"], s["fast_attention"]) == (
        rows["ours_fast"]["precision"],
        rows["ours_fast"]["attention"],
    )
    if s["fast_precision_reason"] == "requested":
        assert timed is None
    else:
        precisions = ["fp32", "bf16"] if result["device"]["bf16_available"] else ["fp32"]
        assert set(timed) == {f"{p} {a}" for p in precisions for a in ("fused", "manual")}
        assert min(timed.values()) > 0
        assert f"{s['fast_precision']} {s['fast_attention']}" == max(timed, key=timed.get)
        assert s["fast_precision_reason"].startswith("the recipe's step, img/s median of 3 alternated: ")
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
    if rows["ours_fast"]["attention"] == "fused":
        assert rows["ours_fast"]["flops_per_step"] == rows["reference"]["flops_per_step"]
    else:  # manual attention's products are counted as bmm, SDPA's by torch's formulas (backward differs)
        assert rows["ours_fast"]["flops_per_step"] == pytest.approx(rows["reference"]["flops_per_step"], rel=0.01)
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


@pytest.mark.slow
def test_recipe_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_bench(tmp_path, str(SMOKE))
    rows = check_result(result, batch=16)
    assert result["settings"]["mode"] == "recipe"
    assert result["settings"]["distillation"]["type"] == "hard"  # the recipe's
    assert rows["ours_no_teacher"]["distillation"] == "none"
    printed = capsys.readouterr().out
    assert "ratio, identical settings" in printed and "ratio, fast path (ours " in printed
    assert f"fast path: {result['settings']['fast_choice']['settings']} (the recipe's step" in printed
    assert result["settings"]["compile"] is False and "compile" not in result["settings"]["fast_precision_reason"]
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


@pytest.mark.slow
def test_named_models_bf16_soft(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        *("--student", "deit_tiny_distilled_patch16_224", "--teacher", "resnet10t"),
        *("--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2"),
        *("--num-classes", "5", "--batch-size", "8", "--kd", "soft", "--fast-precision", "bf16"),
        *("--fast-attention", "manual"),
    )
    rows = check_result(result, batch=8)
    assert result["settings"]["mode"] == "models"
    assert result["settings"]["input_size"] == [3, 16, 16]
    assert result["settings"]["student"]["embed_dim"] == 32 and result["settings"]["student"]["depth"] == 1
    assert rows["reference"]["distillation"] == rows["ours_fast"]["distillation"] == "soft"
    assert rows["ours_fast"]["precision"] == "bf16" and "bf16" in result["matmul_peak_gflops"]
    assert rows["ours_fast"]["attention"] == "manual" and result["settings"]["fast_precision_reason"] == "requested"
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
    ours = bench.OursStep(problem, bench.Settings(precision="fp32"), kd, teacher)
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
    assert measure.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * b * i * o


def test_count_flops_sees_cpu_attention() -> None:
    """torch's counter misses the CPU attention kernel; the bench maps the CUDA formula onto it."""
    q = torch.randn(2, 3, 10, 8)
    b, h, s, d = q.shape
    flops = measure.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * b * h * s * s * d)  # q @ k^T and attn @ v


def test_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_command.main([str(SMOKE), "data.source=imagefolder", f"data.path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"error: data.path: no folder {tmp_path / 'train'} to count classes in; give data.path=<folder holding "
        "train/<class>/<image>> or --num-classes N\n"
    )
    assert bench_command.main([str(SMOKE), "distillation.token=false"]) == 2
    assert "distillation token" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_command.main(["--student", "deit_tiny_distilled_patch16_224"])  # no teacher, no recipe


def test_the_recipes_attention_reaches_our_step_and_nothing_else() -> None:
    """train.attention=manual (README Speed): the recipe's rows time it; identical settings keep
    timm's fused attention, as the reference runs it."""
    recipe = load_recipe(SMOKE, ["train.attention=manual"])
    settings = bench.Settings.of_recipe(recipe, torch.device("cpu"))
    assert settings.attention == "manual" and bench.Settings().attention == "fused"
    problem = bench.build_problem(recipe, 4, "hard", torch.device("cpu"))

    def fused(s: bench.Settings) -> set[bool]:
        step = bench.OursStep(problem, s, "hard", bench.make_teacher(problem, s))
        return {m.fused_attn for m in step.model.modules() if hasattr(m, "fused_attn")}

    assert fused(settings) == {False} and fused(bench.Settings()) == {True}


def test_overrides_anywhere_on_the_line() -> None:
    """argparse's intermixed parsing, as distill.train: a dotted override after an option."""
    args, recipe, overrides = bench_command.parse_args(
        [str(SMOKE), "--steps", "3", "train.batch_size=8", "--kd", "soft"]
    )
    assert (recipe, overrides, args.steps, args.kd) == (str(SMOKE), ["train.batch_size=8"], 3, "soft")
    assert args.compile == "auto"  # the fast path compiles where that pays back
    assert bench_command.parse_args([str(SMOKE), "--compile"])[0].compile == "yes"
    assert bench_command.parse_args(["--compile", "no", str(SMOKE)])[0].compile == "no"


def test_image_folder_classes_are_counted(tmp_path: Path) -> None:
    for name in ("cat", "dog", "eel", ".cache"):  # hidden folders are not classes
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    recipe = load_recipe(SMOKE, ["data.source=imagefolder", f"data.path={tmp_path}"])
    assert bench.num_classes_of(recipe, None) == 3
    assert bench.num_classes_of(recipe, 7) == 7  # --num-classes wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from distill import profile_step as profile_step_command

    assert bench_command.main([str(SMOKE), "--device", "cuda", *QUICK]) == 2
    assert capsys.readouterr().err == "error: --device cuda but torch sees no GPU\n"
    assert profile_step_command.main([str(SMOKE), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda but torch sees no GPU\n"


def test_expected_cpu_noise_is_silenced_and_the_rest_kept(capfd: pytest.CaptureFixture[str]) -> None:
    """Kineto writes to file descriptor 2 directly; the lines a user cannot act on go, others stay."""
    cpu = torch.device("cpu")
    noise = (
        "USDT:2026-12-02 05:27:37 11655:11655 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
        "ERROR:2026-12-02 05:27:38 11655:11655 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
    )
    with measure.filtered_stderr(cpu):
        os.write(2, (noise + "ERROR: something else failed\n").encode())
    assert capfd.readouterr().err == "ERROR: something else failed\n"
    measure.quiet_cpu_imports(cpu)
    logger = logging.getLogger("torch.utils.cpp_extension")
    record = logger.makeRecord(logger.name, logging.WARNING, "", 0, "No CUDA runtime is found, using %s", ("x",), None)
    assert not logger.filter(record)
    other = logger.makeRecord(logger.name, logging.WARNING, "", 0, "Error building extension", (), None)
    assert logger.filter(other)


@pytest.mark.parametrize(
    ("attention", "precision", "device", "resolved"),
    [
        ("auto", "bf16", "cpu", "manual"),  # CPU flash attention in bf16 is the bottleneck
        ("auto", "fp32", "cpu", "fused"),
        ("auto", "bf16", "cuda", "fused"),
        ("auto", "fp16", "cuda", "fused"),
        ("fused", "bf16", "cpu", "fused"),  # an explicit choice is kept
        ("manual", "fp32", "cuda", "manual"),
    ],
)
def test_train_attention_auto_rule(attention: str, precision: str, device: str, resolved: str) -> None:
    recipe = load_recipe(SMOKE, [f"train.attention={attention}", f"train.precision={precision}"])
    assert recipe.train.attention_on(device) == resolved


def test_attention_defaults_to_auto_and_the_smoke_recipe_keeps_fused() -> None:
    recipe = load_recipe(SMOKE)
    assert recipe.train.attention == "auto" and recipe.train.precision == "fp32"
    assert bench.Settings.of_recipe(recipe, torch.device("cpu")).attention == "fused"


def test_fast_path_candidates() -> None:
    """precision x attention, narrowed by the options; fp16 refused on a CPU."""
    problem = bench.build_problem(load_recipe(SMOKE), 4, "hard", torch.device("cpu"))
    texts = [s.text() for s in fastpath.candidates(fastpath.FastOptions(), problem)]
    bf16 = ["bf16 fused", "bf16 manual"] if measure.bf16_available(problem.device) else []
    assert texts == ["fp32 fused", "fp32 manual", *bf16]
    only = fastpath.candidates(fastpath.FastOptions(precision="fp32", attention="manual"), problem)
    assert only == [bench.Settings(precision="fp32", attention="manual", fused=True)]
    assert fastpath.choose_fast(problem, fastpath.FastOptions(precision="fp32", attention="manual")).reason == (
        "requested"
    )
    with pytest.raises(fastpath.LaunchError, match="--fast-precision fp16 needs a GPU"):
        fastpath.candidates(fastpath.FastOptions(precision="fp16"), problem)


def test_compile_auto_without_recipe_steps_is_not_tried() -> None:
    problem = bench.build_problem(load_recipe(SMOKE), 4, "hard", torch.device("cpu"))
    opts = fastpath.FastOptions(precision="fp32", attention="fused", compile="auto", recipe_steps=None)
    choice = fastpath.choose_fast(problem, opts)
    assert choice.settings.compile is False and choice.compiled is None
    assert choice.reason == "requested; compile not tried: no recipe steps to pay back its compile time"


@pytest.mark.slow
def test_compile_yes_measures_compile_time_and_keeps_it() -> None:
    """--compile yes: the chosen settings compiled (student and teacher), with the figures that
    decide pay-back under auto."""
    problem = bench.build_problem(load_recipe(SMOKE), 4, "hard", torch.device("cpu"))
    opts = fastpath.FastOptions(precision="fp32", attention="fused", compile="yes", steps=2, recipe_steps=100)
    choice = fastpath.choose_fast(problem, opts)
    assert choice.settings.compile and choice.settings.teacher_compile and choice.compiled is not None
    check = choice.compiled
    assert check.taken and check.compile_s > 0 and check.eager_img_s > 0 and check.compiled_img_s > 0
    per_step = problem.batch_size / check.eager_img_s - problem.batch_size / check.compiled_img_s
    assert check.saved_s == pytest.approx(per_step * 100)
    assert ": requested" in choice.reason
