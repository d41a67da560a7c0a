"""data.store=tensor: decode once, augment batches as tensors, views keyed by (seed, epoch, index)."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.config import AugmentConfig, load_recipe
from distill.data import load_source
from distill.errors import RecipeError
from distill.tensor_store import BatchAugment, StoredImages, decode_all, uniforms
from tests.conftest import SMOKE, check_ok, read_metrics, run_train, signal_after_checkpoint

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def images(n: int = 6, side: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_uniforms_are_a_function_of_seed_epoch_index_and_draw() -> None:
    u = uniforms(0, 1, np.arange(1000), 5)
    assert u.shape == (1000, 5) and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.02
    assert np.array_equal(uniforms(0, 1, np.array([7, 3]), 5), u[[7, 3]])
    assert not np.array_equal(uniforms(0, 2, np.arange(10), 5), u[:10])
    assert not np.array_equal(uniforms(1, 1, np.arange(10), 5), u[:10])


def test_a_full_crop_is_the_image_and_hflip_mirrors_it() -> None:
    x = images()
    normalised = (x.float() / 255 - 0.5) / 0.25
    keep = BatchAugment(AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0), CFG, seed=0)
    assert torch.allclose(keep(x, torch.arange(6), 0), normalised, atol=1e-5)
    mirror = BatchAugment(AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0), CFG, seed=0)
    assert torch.allclose(mirror(x, torch.arange(6), 0), normalised.flip(-1), atol=1e-5)


def test_views_do_not_depend_on_the_batch_they_are_in() -> None:
    x, aug = images(), BatchAugment(AugmentConfig(scale=(0.3, 1.0), hflip=0.5), CFG, seed=3)
    whole = aug(x, torch.arange(6), 4)
    assert torch.equal(aug(x[[4, 1]], torch.tensor([4, 1]), 4), whole[[4, 1]])
    assert not torch.equal(aug(x, torch.arange(6), 5), whole)  # another epoch, other views


def test_the_store_holds_every_training_image_once() -> None:
    r = load_recipe(SMOKE)
    split = load_source(r.data)
    store = StoredImages(decode_all(split.train), split.train["label"])
    assert store.images.shape == (len(split.train), 3, 16, 16) and store.images.dtype == torch.uint8
    batch = store.__getitems__([5, 0])
    assert batch["label"].tolist() == [split.train[5]["label"], split.train[0]["label"]]
    assert torch.equal(
        batch["image"][0], torch.from_numpy(np.array(split.train[5]["image"].convert("RGB"))).permute(2, 0, 1)
    )


def test_auto_picks_the_tensor_path_only_when_it_can_do_the_augmentation() -> None:
    from distill.trainer import resolve_store

    split = load_source(load_recipe(SMOKE).data)
    assert resolve_store(load_recipe(SMOKE, ["data.store=auto"]).data, split.train) == "tensor"
    ra = ["data.store=auto", "data.augment.auto_augment=rand-m9-mstd0.5-inc1"]
    assert resolve_store(load_recipe(SMOKE, ra).data, split.train) == "decode"
    with pytest.raises(RecipeError, match=r"cannot apply data\.augment\.re_prob=0\.25"):
        resolve_store(load_recipe(SMOKE, ["data.store=tensor", "data.augment.re_prob=0.25"]).data, split.train)


def test_the_tensor_path_resumes_exactly_after_sigkill(tmp_path: Path, teacher_cache: Path) -> None:
    args = [str(SMOKE), f"teacher.cache_dir={teacher_cache}", "data.store=tensor", "run.export=false"]
    check_ok(run_train(*args, f"run.output_dir={tmp_path / 'ref'}"))
    killed = [*args, f"run.output_dir={tmp_path / 'kill'}"]
    signal_after_checkpoint(killed, tmp_path / "kill" / "smoke" / "checkpoints" / "step_00000004", signal.SIGKILL)
    assert not (tmp_path / "kill" / "smoke" / "summary.json").exists()
    check_ok(run_train(*killed))
    assert read_metrics(tmp_path / "kill" / "smoke") == read_metrics(tmp_path / "ref" / "smoke")
