"""python -m distill.profile_step: runs end to end on the smoke recipe and its figures add up.
Never asserts speed (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill import profile_step as profile_step_command
from distill.perf import step_profile as profile_step
from distill.perf.measure import bf16_available

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "recipes" / "smoke.yaml")
QUICK = ["--steps", "2", "--repeats", "2", "--peak-seconds", "0.05", "--peak-size", "256"]


def test_category_and_gemm_flops() -> None:
    assert profile_step.category_of("aten::addmm") == "matmul"
    assert profile_step.category_of("aten::mm") == "matmul"
    assert profile_step.category_of("aten::native_layer_norm_backward") == "norms"
    assert profile_step.category_of("aten::_to_copy") == "casts and copies"
    assert profile_step.category_of("aten::copy_") == "casts and copies"
    assert profile_step.category_of("aten::addcdiv_") == "optimizer"
    assert profile_step.category_of("aten::gelu_backward") == "activations and softmax"
    assert profile_step.category_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profile_step.category_of("aten::mkldnn_convolution") == "convolution"
    assert profile_step.category_of("aten::_fused_adamw_") == "optimizer"
    assert profile_step.category_of("aten::mul") == "other"
    assert profile_step.category_of("forward + loss") == "other"
    assert profile_step.gemm_flops("aten::mm", [[8, 4], [4, 3]]) == 2 * 8 * 4 * 3
    assert profile_step.gemm_flops("aten::addmm", [[3], [8, 4], [4, 3]]) == 2 * 8 * 4 * 3
    assert profile_step.gemm_flops("aten::bmm", [[2, 8, 4], [2, 4, 3]]) == 2 * 2 * 8 * 4 * 3
    assert profile_step.gemm_flops("aten::mm", [[8]]) == 0


@pytest.mark.slow
def test_profile_smoke_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    precisions = "fp32,bf16" if bf16_available(torch.device("cpu")) else "fp32"
    out = tmp_path / "profile.json"
    # aot_eager: the compile path without inductor's C++ build (seconds, not a minute)
    args = [SMOKE, "--precisions", precisions, "--attention", "fused,manual", "--compile", "--backend", "aot_eager"]
    assert profile_step_command.main([*args, *QUICK, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    keys = [f"{p}{a}" for p in precisions.split(",") for a in ("", " manual")]
    assert set(r["variants"]) == set(keys) | {f"{k} compiled" for k in keys}
    assert {v["attention"] for v in r["variants"].values()} == {"fused", "manual"}
    assert r["gflop_per_step"] > 0 and r["compile_backend"] == "aot_eager"
    for v in r["variants"].values():
        assert len(v["img_s_values"]) == 2 and v["img_s"] > 0
        assert v["achieved_gflops"] == pytest.approx(r["gflop_per_step"] / r["batch_size"] * v["img_s"])
        if v["compiled"]:
            assert v["compile_s"] > 0 and "profile" not in v
            continue
        p = v["profile"]
        assert sum(p["share"].values()) == pytest.approx(1.0)
        assert set(p["phases_ms"]) == set(profile_step.PHASES)
        # the smoke student's 2 blocks: qkv, proj, fc1, fc2 forward, each with backward products
        assert p["share"]["matmul"] > 0 and len(p["gemms"]) >= 4 and p["gemm_gflops"] > 0
        assert all(g["flops_per_call"] > 0 for g in p["gemms"])
    # manual attention: the attention's own products appear as bmm (q k^T and attn v, per head)
    assert any(g["op"] == "bmm" for g in r["variants"]["fp32 manual"]["profile"]["gemms"])
    assert not any(g["op"] == "bmm" for g in r["variants"]["fp32"]["profile"]["gemms"])
    m, k, n = r["largest_gemm"]["mkn"]
    fp32 = r["variants"]["fp32"]["profile"]["gemms"]
    assert [[k], [m, k], [k, n]] in [g["shapes"] for g in fp32 if g["op"] == "addmm"] or [[m, k], [k, n]] in [
        g["shapes"] for g in fp32
    ]
    assert (m, k, n) == (16 * 18, 32, 128)  # the tie-break: fc1's forward (batch 16 x 18 tokens, 32 -> 128)
    assert min(r["largest_gemm"]["bare_mm_gflops"].values()) > 0
    text = capsys.readouterr().out
    assert "where the time goes" in text and "the largest product alone" in text


def test_refuses_unknown_precision_and_attention() -> None:
    assert profile_step_command.main([SMOKE, "--precisions", "fp8", *QUICK]) == 2
    assert profile_step_command.main([SMOKE, "--attention", "sparse", *QUICK]) == 2


def test_profile_eager_only_with_overrides_after_options(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A dotted override after the options (intermixed parsing); on a CPU, none of the profiler's
    console noise reaches the user."""
    out = tmp_path / "profile.json"
    args = [SMOKE, "--precisions", "fp32", "--attention", "fused", *QUICK, "train.batch_size=8", "--json", str(out)]
    assert profile_step_command.main(args) == 0
    r = json.loads(out.read_text())
    assert r["batch_size"] == 8 and set(r["variants"]) == {"fp32"}
    assert r["variants"]["fp32"]["step_ms"] == pytest.approx(8 / r["variants"]["fp32"]["img_s"] * 1e3)
    err = capfd.readouterr().err
    if not torch.cuda.is_available():
        for noise in ("USDT", "gpuGetDeviceCount", "No CUDA runtime is found"):
            assert noise not in err
