"""data.store=tensor: decode once, augment batches as tensors, views keyed by (seed, epoch, index)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data.pipeline import resolve_store
from distill.data.sources import load_source
from distill.data.tensor_store import BatchAugment, StoredImages, decode_all, uniforms
from distill.errors import RecipeError
from distill.models.spec import InputSpec
from distill.recipe.schema import AugmentConfig, load_recipe
from tests.helpers import SMOKE, check_ok, kill_and_resume, read_metrics, run_train

CFG = InputSpec((16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0, "bicubic")


def batch_augment(aug: AugmentConfig, spec: InputSpec, seed: int) -> BatchAugment:
    return BatchAugment(aug, spec.size, spec.mean, spec.std, spec.interpolation, seed)


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
    keep = batch_augment(AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0), CFG, seed=0)
    assert torch.allclose(keep(x, torch.arange(6), 0), normalised, atol=1e-5)
    mirror = batch_augment(AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0), CFG, seed=0)
    assert torch.allclose(mirror(x, torch.arange(6), 0), normalised.flip(-1), atol=1e-5)


PIL_FILTERS = {"bicubic": 3, "bilinear": 2, "lanczos": 1, "box": 4, "hamming": 5}  # PIL.Image.Resampling


def pil_view(image: torch.Tensor, box: list[int], out: int, interpolation: str) -> torch.Tensor:
    """What timm's PIL path makes of one crop box: crop, resize, flip (RandomResizedCrop + flip)."""
    from PIL import Image

    top, left, h, w, flip = box
    im = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
    im = im.resize((out, out), PIL_FILTERS[interpolation])
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float()


@pytest.mark.parametrize("interpolation", sorted(PIL_FILTERS))
@pytest.mark.parametrize(("side", "out"), [(32, 32), (8, 16)])
def test_views_are_pillows_resize_of_timms_crop(interpolation: str, side: int, out: int) -> None:
    # Upscaling crops, as CIFAR (32 px) and digits (8 px -> 16) make: the tensor path must give the
    # pixels the PIL path gives for the same box, so the student trains on what it is tested on.
    x = images(64, side)
    cfg = InputSpec((out, out), (0, 0, 0), (1, 1, 1), 1.0, interpolation)
    aug = batch_augment(AugmentConfig(scale=(0.08, 1.0), hflip=0.5), cfg, seed=1)
    ours = aug(x, np.arange(64), 0) * 255
    boxes = aug.boxes(0, np.arange(64), side, side)
    pil = torch.stack([pil_view(x[i], boxes[i].tolist(), out, interpolation) for i in range(64)])
    diff = (ours - pil).abs()
    # Equal on 99% of pixels; the rest is Pillow's 22-bit fixed point and, for filters with
    # negative lobes, where the clipped intermediate of a ringing edge falls.
    assert (diff > 0.5).float().mean() < 0.01
    assert diff.max() <= 2.0 + 1e-3
    assert boxes[:, 4].sum() not in (0, 64)  # both flipped and unflipped views were compared


def test_downscaled_views_stay_close_to_pillows() -> None:
    # Shrinking widens the filter (antialiasing) as Pillow does. Pillow 13 may run the vertical
    # pass first, which moves a clipped ringing pixel here and there: close, not identical.
    x = images(64, 40)
    cfg = InputSpec((24, 24), (0, 0, 0), (1, 1, 1), 1.0, "bilinear")
    aug = batch_augment(AugmentConfig(scale=(0.5, 1.0)), cfg, seed=2)
    ours = aug(x, np.arange(64), 0) * 255
    boxes = aug.boxes(0, np.arange(64), 40, 40)
    pil = torch.stack([pil_view(x[i], boxes[i].tolist(), 24, "bilinear") for i in range(64)])
    assert (ours - pil).abs().max() <= 1.0 + 1e-3


def test_crops_follow_timms_distribution() -> None:
    # timm's get_params: area fraction uniform in scale, log-aspect uniform in ratio, integer
    # boxes inside the image, 10 attempts then the centre; ours draws from (seed, epoch, index).
    import random

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    random.seed(0)
    image = Image.new("RGB", (32, 24))
    timm_boxes = torch.tensor(
        [RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (0.75, 4 / 3)) for _ in range(20000)]
    ).float()
    aug = batch_augment(AugmentConfig(scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip=0.5), CFG, seed=5)
    ours = aug.boxes(0, np.arange(20000), 24, 32)
    top, left, h, w, flip = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 24).all() and (left + w <= 32).all()
    for column, what in enumerate(("top", "left", "height", "width")):
        assert abs(ours[:, column].float().mean() - timm_boxes[:, column].mean()) < 0.15, what
        assert abs(ours[:, column].float().std() - timm_boxes[:, column].std()) < 0.15, what
    area = (h * w).float()
    assert abs(area.mean() - (timm_boxes[:, 2] * timm_boxes[:, 3]).mean()) < 5
    assert abs(flip.float().mean().item() - 0.5) < 0.02
    full = batch_augment(AugmentConfig(scale=(1.0, 1.0), ratio=(2.0, 2.0)), CFG, seed=5)
    assert full.boxes(0, np.arange(3), 32, 32).tolist() == [[8, 0, 16, 32, 0]] * 3  # timm's fallback


def test_views_do_not_depend_on_the_batch_they_are_in() -> None:
    x, aug = images(), batch_augment(AugmentConfig(scale=(0.3, 1.0), hflip=0.5), CFG, seed=3)
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
    split = load_source(load_recipe(SMOKE).data)
    assert resolve_store(load_recipe(SMOKE, ["data.store=auto"]).data, split.train) == "tensor"
    ra = ["data.store=auto", "data.augment.auto_augment=rand-m9-mstd0.5-inc1"]
    assert resolve_store(load_recipe(SMOKE, ra).data, split.train) == "decode"
    with pytest.raises(RecipeError, match=r"cannot apply data\.augment\.re_prob=0\.25"):
        resolve_store(load_recipe(SMOKE, ["data.store=tensor", "data.augment.re_prob=0.25"]).data, split.train)
    # nearest is not one of Pillow's convolution filters: auto decodes, tensor says why not
    assert resolve_store(load_recipe(SMOKE, ["data.store=auto"]).data, split.train, "nearest") == "decode"
    with pytest.raises(RecipeError, match=r"cannot apply interpolation 'nearest'"):
        resolve_store(load_recipe(SMOKE, ["data.store=tensor"]).data, split.train, "nearest")


@pytest.mark.slow
def test_the_tensor_path_resumes_exactly_after_sigkill(tmp_path: Path, teacher_cache: Path) -> None:
    args = [str(SMOKE), f"teacher.cache_dir={teacher_cache}", "data.store=tensor", "run.export=false"]
    check_ok(run_train(*args, f"run.output_dir={tmp_path / 'ref'}"))
    killed = [*args, f"run.output_dir={tmp_path / 'kill'}"]
    kill_and_resume(killed, tmp_path / "kill" / "smoke")
    assert read_metrics(tmp_path / "kill" / "smoke") == read_metrics(tmp_path / "ref" / "smoke")


def test_repeated_views_on_the_tensor_path() -> None:
    x, aug = images(), batch_augment(AugmentConfig(scale=(0.3, 1.0), hflip=0.5), CFG, seed=3)
    index = np.arange(6)
    plain = aug(x, index, 2)
    assert torch.equal(aug(x, index, 2, np.zeros(6, dtype=np.int64)), plain)  # repeat 0: today's view
    other = aug(x, index, 2, np.ones(6, dtype=np.int64))
    assert all(not torch.equal(plain[i], other[i]) for i in range(6))
    assert torch.equal(aug(x, index, 2, np.ones(6, dtype=np.int64)), other)


def test_stored_images_decode_the_repeat_from_the_sampler_key() -> None:
    store = StoredImages(images(4), [0, 1, 2, 3])
    batch = store.__getitems__([1, 5, 2, 6])  # image 1 repeats 0 and 1, image 2 repeats 0 and 1
    assert batch["index"].tolist() == [1, 1, 2, 2] and batch["repeat"].tolist() == [0, 1, 0, 1]
    assert batch["repeat_host"].tolist() == [0, 1, 0, 1]
    assert torch.equal(batch["image"][0], batch["image"][1])


def test_a_training_step_never_waits_for_the_device(tmp_path: Path) -> None:
    """One epoch of the smoke recipe on the tensor path with the teacher-output cache, counted by
    tests/count_waits.py: no read of a device tensor and no blocking copy in any step (batches
    copied non-blocking, the resampling matrices built on the device, the loss count added in
    place, the cache's rows sliced on the device); mean and std are copied once per run."""
    import subprocess
    import sys

    from tests.helpers import REPO, SMOKE, subprocess_env

    args = [
        str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={tmp_path / 'teachers'}", "data.store=tensor",
        "teacher.output_cache.enabled=true", "teacher.output_cache.verify_every=0", "train.epochs=1",
        "run.export=false", "run.log_every_steps=100",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "tests/count_waits.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    waits = json.loads(proc.stdout.rsplit("waits: ", 1)[1])
    assert waits == {"steps": 8, "to(device) blocking": 2}
