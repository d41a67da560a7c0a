"""What only a GPU can break (skipped without one; scripts/gpu_check.sh runs them on a lent GPU):
every module on the student's device, fp16 with the gradient scaler and bf16, the tensor data
path augmenting on the GPU, the teacher-output cache filled and replayed on the GPU (bit for
bit, under deterministic algorithms), and train.compile. tests/test_trainer_setup.py has the EMA-on-the-GPU check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.tensor_store import BatchAugment
from distill.recipe.schema import AugmentConfig
from tests.helpers import REPO, SMOKE, check_ok, read_metrics, run_train, subprocess_env

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA)"), pytest.mark.slow]


# Deterministic kernels for runs compared bit for bit: cuBLAS needs a fixed workspace
# (CUBLAS_WORKSPACE_CONFIG, per the CUDA docs on reproducibility) and torch its deterministic
# algorithms; warn_only, so an op without one warns in the log instead of stopping the run.
DETERMINISTIC = (
    "import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
    "from distill.train import main; sys.exit(main(sys.argv[1:]))"
)


def smoke(out: Path, teacher_cache: Path, *extra: str, deterministic: bool = False) -> dict:
    args = (str(SMOKE), f"run.output_dir={out}", f"teacher.cache_dir={teacher_cache}", *extra)
    if deterministic:
        env = subprocess_env(CUBLAS_WORKSPACE_CONFIG=":4096:8")
        proc = subprocess.run(
            [sys.executable, "-c", DETERMINISTIC, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        check_ok(proc)
    else:
        check_ok(run_train(*args))
    return json.loads((out / "smoke" / "summary.json").read_text())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_the_gpu(tmp_path: Path, teacher_cache: Path, precision: str) -> None:
    """fp16 goes through Accelerate's gradient scaler; bf16 needs none. Losses stay finite and the
    student learns (above chance on the smoke recipe's 4 classes)."""
    summary = smoke(tmp_path, teacher_cache, f"train.precision={precision}")
    assert summary["precision"] == precision and summary["world_size"] == 1
    assert all(np.isfinite(row["train/loss"]) for row in read_metrics(tmp_path / "smoke"))
    assert summary["final"]["val/top1_fused"] > 0.4


def test_the_tensor_path_augments_on_the_gpu_as_on_the_cpu() -> None:
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(AugmentConfig(scale=(0.3, 1.0), hflip=0.5), (16, 16), (0.5,) * 3, (0.25,) * 3, "bicubic", 0)
    index = np.arange(8)
    on_cpu = aug(images, index, 1)
    on_gpu = aug(images.cuda(), index, 1)
    assert on_gpu.device.type == "cuda"
    # Pillow's rounding between the passes: a float difference can move a pixel by one grey level.
    assert (on_gpu.cpu() - on_cpu).abs().max() <= 1.0 / 255 / 0.25 + 1e-5


def test_the_tensor_path_trains_on_the_gpu(tmp_path: Path, teacher_cache: Path) -> None:
    summary = smoke(tmp_path, teacher_cache, "data.store=tensor")
    assert summary["data"]["store"] == "tensor"


def test_the_teacher_output_cache_fills_and_replays_on_the_gpu(tmp_path: Path, teacher_cache: Path) -> None:
    cache = ["teacher.output_cache.enabled=true", f"teacher.output_cache.dir={tmp_path / 'outputs'}"]
    filled = smoke(tmp_path / "fill", teacher_cache, *cache, deterministic=True)["teacher_cache"]
    replay = ("teacher.output_cache.verify_every=1",)
    replayed = smoke(tmp_path / "replay", teacher_cache, *cache, *replay, deterministic=True)["teacher_cache"]
    assert filled["key"] == replayed["key"] and replayed["train_replayed_fraction"] == 1.0
    assert read_metrics(tmp_path / "fill" / "smoke") == read_metrics(tmp_path / "replay" / "smoke")


def test_compiled_student_and_teacher_train_on_the_gpu(tmp_path: Path, teacher_cache: Path) -> None:
    eager = smoke(tmp_path / "eager", teacher_cache)
    compiled = smoke(tmp_path / "compiled", teacher_cache, "train.compile=true", "teacher.compile=true")
    assert compiled["final"]["val/top1_fused"] == pytest.approx(eager["final"]["val/top1_fused"], abs=0.1)


def test_every_module_and_the_ema_are_on_the_students_device() -> None:
    from accelerate import Accelerator

    from distill.data.sources import load_source
    from distill.models.student import student_input_spec
    from distill.recipe.schema import load_recipe
    from distill.training.trainer import setup_student

    recipe = load_recipe(SMOKE, ["train.ema_decay=0.99"])
    acc = Accelerator()
    student = setup_student(acc, recipe, load_source(recipe.data), student_input_spec(recipe))
    devices = {t.device for t in student.model.state_dict().values()}
    devices |= {t.device for t in student.ema.module.state_dict().values()}
    assert devices == {acc.device} and acc.device.type == "cuda"
