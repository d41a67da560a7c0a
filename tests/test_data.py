"""Data sources, the (seed, epoch, index) augmentation contract, samplers and loaders (distill/data/)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from distill.data.pipeline import (
    ORDER_KEY,
    AugmentedDataset,
    EpochSampler,
    build_mixup,
    build_transforms,
    make_loader,
)
from distill.data.sources import SplitData, load_source, sample_seed
from distill.errors import DataError
from distill.models.spec import InputSpec
from distill.recipe.schema import AugmentConfig, DataConfig, load_recipe

DATA_CONFIG = InputSpec((16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "bicubic")


def synthetic_cfg(*overrides: str) -> DataConfig:
    return load_recipe(None, ["data.source=synthetic", *overrides]).data


@pytest.fixture(scope="module")
def synthetic() -> SplitData:
    return load_source(synthetic_cfg())


@pytest.fixture(scope="module")
def transforms() -> tuple[Any, Any]:
    return build_transforms(AugmentConfig(), DATA_CONFIG)


@pytest.fixture()
def train_ds(synthetic: SplitData, transforms: tuple[Any, Any]) -> AugmentedDataset:
    return AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)


def image_key(image: Any) -> tuple[bytes, tuple[int, ...]]:
    arr = np.asarray(image)
    return arr.tobytes(), arr.shape


# Sources --------------------------------------------------------------------------------------


def test_synthetic_source_sizes_and_classes(synthetic: SplitData) -> None:
    # defaults: 4 classes x 32 train / 8 val images
    assert len(synthetic.train) == 4 * 32
    assert len(synthetic.val) == 4 * 8
    assert synthetic.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert synthetic.num_classes == 4
    assert synthetic.val_origin == "validation"
    assert Counter(synthetic.train["label"]) == {0: 32, 1: 32, 2: 32, 3: 32}
    assert Counter(synthetic.val["label"]) == {0: 8, 1: 8, 2: 8, 3: 8}
    image = synthetic.train[0]["image"]
    assert image.size == (16, 16)
    assert image.mode == "RGB"


def test_synthetic_source_respects_its_config() -> None:
    split = load_source(
        synthetic_cfg(
            "data.synthetic.num_classes=3",
            "data.synthetic.train_per_class=5",
            "data.synthetic.val_per_class=2",
            "data.synthetic.image_size=8",
        )
    )
    assert (len(split.train), len(split.val)) == (15, 6)
    assert split.class_names == ["class_0", "class_1", "class_2"]
    assert split.train[0]["image"].size == (8, 8)


def test_synthetic_source_is_deterministic(synthetic: SplitData) -> None:
    again = load_source(synthetic_cfg())
    assert [image_key(i) for i in again.train["image"]] == [image_key(i) for i in synthetic.train["image"]]
    assert [image_key(i) for i in again.val["image"]] == [image_key(i) for i in synthetic.val["image"]]


def test_max_train_samples_is_a_stratified_subset() -> None:
    split = load_source(synthetic_cfg("data.max_train_samples=40", "data.max_val_samples=8"))
    assert len(split.train) == 40
    assert len(split.val) == 8
    assert Counter(split.train["label"]) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert Counter(split.val["label"]) == {0: 2, 1: 2, 2: 2, 3: 2}


def test_missing_train_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"data\.train_split 'nope'"):
        load_source(synthetic_cfg("data.train_split=nope"))


def test_missing_val_split_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"data\.val_split 'nope'"):
        load_source(synthetic_cfg("data.val_split=nope"))


@pytest.fixture(scope="module")
def digits() -> SplitData:
    return load_source(load_recipe(None, ["data.source=digits"]).data)


def test_digits_split_sizes(digits: SplitData) -> None:
    # 1797 images, 20% held out: ceil(0.2 * 1797) = 360 validation, 1437 train
    assert len(digits.train) == 1437
    assert len(digits.val) == 360
    assert digits.class_names == [str(d) for d in range(10)]
    assert digits.val_origin == "held-out"
    assert digits.train[0]["image"].size == (8, 8)


def test_digits_split_is_stratified(digits: SplitData) -> None:
    from sklearn.datasets import load_digits

    totals = Counter(load_digits().target.tolist())
    val_counts = Counter(digits.val["label"])
    train_counts = Counter(digits.train["label"])
    for label, total in totals.items():
        assert abs(val_counts[label] - 0.2 * total) <= 1.0, (label, val_counts[label], total)
        assert train_counts[label] + val_counts[label] == total


def test_digits_split_is_a_partition(digits: SplitData) -> None:
    # Every image lands in exactly one split (compared as a multiset of (pixels, label)).
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    full = Counter((p.tobytes(), int(t)) for p, t in zip(pixels, bunch.target))
    rows = Counter(
        (np.asarray(image).tobytes(), label)
        for split in (digits.train, digits.val)
        for image, label in zip(split["image"], split["label"], strict=True)
    )
    assert rows == full


def test_digits_split_is_seeded(digits: SplitData) -> None:
    again = load_source(load_recipe(None, ["data.source=digits"]).data)
    assert again.val["label"] == digits.val["label"]
    assert [image_key(i) for i in again.val["image"]] == [image_key(i) for i in digits.val["image"]]
    assert again.train["label"] == digits.train["label"]


# sample_seed ----------------------------------------------------------------------------------


def test_sample_seed_is_deterministic() -> None:
    assert sample_seed(0, 3, 17) == sample_seed(0, 3, 17)
    value = sample_seed(5, 1, 2)
    assert isinstance(value, int)
    assert 0 <= value < 2**32


def test_sample_seed_differs_across_seed_epoch_index() -> None:
    seeds = {sample_seed(s, e, i) for s in range(2) for e in range(5) for i in range(100)}
    assert len(seeds) == 2 * 5 * 100
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)  # not symmetric in epoch/index
    assert sample_seed(0, 0, ORDER_KEY) not in seeds


# AugmentedDataset -----------------------------------------------------------------------------

INDICES = [0, 5, 17, 33, 64, 90, 101, 127]


def views(ds: AugmentedDataset, indices: list[int]) -> dict[int, torch.Tensor]:
    return {i: ds[i][0] for i in indices}


def test_augmented_item_layout(train_ds: AugmentedDataset, synthetic: SplitData) -> None:
    image, label, index, repeat = train_ds[33]
    assert image.shape == (3, 16, 16)
    assert image.dtype == torch.float32
    assert label == synthetic.train[33]["label"]
    assert (index, repeat) == (33, 0)
    assert len(train_ds) == len(synthetic.train)


def test_view_independent_of_access_order_and_global_rng(train_ds: AugmentedDataset) -> None:
    train_ds.set_epoch(3)
    forward = views(train_ds, INDICES)

    torch.manual_seed(1234)
    random.seed(99)
    np.random.seed(7)
    backward: dict[int, torch.Tensor] = {}
    for i in reversed(INDICES):
        torch.rand(17)  # consume every global RNG between accesses
        random.random()
        np.random.rand(3)
        backward[i] = train_ds[i][0]
    for i in INDICES:
        assert torch.equal(forward[i], backward[i]), i


def test_view_independent_of_other_samples_accessed(train_ds: AugmentedDataset) -> None:
    train_ds.set_epoch(1)
    alone = train_ds[64][0]
    for i in range(10):
        train_ds[i]
    assert torch.equal(train_ds[64][0], alone)


def test_view_same_via_getitem_and_getitems(train_ds: AugmentedDataset) -> None:
    train_ds.set_epoch(2)
    single = [train_ds[i] for i in INDICES]
    shuffled = [INDICES[k] for k in (3, 0, 7, 1, 6, 2, 5, 4)]
    batch = {item[2]: item for item in train_ds.__getitems__(shuffled)}
    assert [item[2] for item in train_ds.__getitems__(shuffled)] == shuffled
    for image, label, index, _ in single:
        b_image, b_label, _, _ = batch[index]
        assert torch.equal(image, b_image), index
        assert label == b_label


def test_view_restores_callers_rng_state(train_ds: AugmentedDataset) -> None:
    torch.manual_seed(42)
    random.seed(42)
    py_state = random.getstate()
    torch_state = torch.get_rng_state()
    train_ds[5]
    train_ds.__getitems__([1, 2, 3])
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_view_differs_between_epochs(train_ds: AugmentedDataset) -> None:
    train_ds.set_epoch(0)
    epoch0 = views(train_ds, INDICES)
    train_ds.set_epoch(1)
    epoch1 = views(train_ds, INDICES)
    differ = sum(not torch.equal(epoch0[i], epoch1[i]) for i in INDICES)
    assert differ >= len(INDICES) - 1
    train_ds.set_epoch(0)
    assert all(torch.equal(epoch0[i], v) for i, v in views(train_ds, INDICES).items())  # back to epoch 0


def test_view_differs_between_run_seeds(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    a = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    b = AugmentedDataset(synthetic.train, transforms[0], seed=1, train=True)
    differ = sum(not torch.equal(a[i][0], b[i][0]) for i in INDICES)
    assert differ >= len(INDICES) - 1


def test_view_same_for_equal_seed_in_new_dataset(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    a = AugmentedDataset(synthetic.train, transforms[0], seed=7, train=True)
    b = AugmentedDataset(synthetic.train, transforms[0], seed=7, train=True)
    a.set_epoch(4)
    b.set_epoch(4)
    assert all(torch.equal(a[i][0], b[i][0]) for i in INDICES)


def test_eval_view_is_the_plain_eval_transform(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    eval_tf = transforms[1]
    ds = AugmentedDataset(synthetic.val, eval_tf, seed=0, train=False)
    ds.set_epoch(5)
    expected = eval_tf(synthetic.val[3]["image"].convert("RGB"))
    assert torch.equal(ds[3][0], expected)
    assert ds[3][0].shape == (3, 16, 16)


def test_grayscale_images_become_rgb(digits: SplitData, transforms: tuple[Any, Any]) -> None:
    ds = AugmentedDataset(digits.val, transforms[1], seed=0, train=False)
    assert ds[0][0].shape == (3, 16, 16)


# EpochSampler ---------------------------------------------------------------------------------


def test_epoch_sampler_same_permutation_for_same_seed_and_epoch() -> None:
    a = EpochSampler(50, seed=3, shuffle=True)
    b = EpochSampler(50, seed=3, shuffle=True)
    a.set_epoch(2)
    b.set_epoch(2)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(999)  # the global torch seed plays no part
    assert list(b) == first
    assert list(a) == first  # iterating again gives the same order
    assert sorted(first) == list(range(50))


def test_epoch_sampler_differs_across_epochs_and_seeds() -> None:
    s = EpochSampler(50, seed=3, shuffle=True)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[0] != orders[1] != orders[2] != orders[0]
    other = EpochSampler(50, seed=4, shuffle=True)
    assert list(other) != orders[0]


def test_epoch_sampler_truncates_to_multiple() -> None:
    s = EpochSampler(50, seed=0, shuffle=True, multiple=16)
    assert len(s) == 48
    order = list(s)
    assert len(order) == 48
    assert len(set(order)) == 48
    assert set(order) <= set(range(50))
    full = EpochSampler(50, seed=0, shuffle=True)
    assert order == list(full)[:48]  # truncation drops the tail of the same permutation


def test_epoch_sampler_exact_multiple_and_too_small() -> None:
    assert len(EpochSampler(48, seed=0, shuffle=True, multiple=16)) == 48
    assert list(EpochSampler(10, seed=0, shuffle=True, multiple=16)) == []


def test_epoch_sampler_without_shuffle_is_in_order() -> None:
    s = EpochSampler(10, seed=0, shuffle=False, multiple=4)
    s.set_epoch(3)
    assert list(s) == list(range(8))


# Loaders --------------------------------------------------------------------------------------


def collect(loader: torch.utils.data.DataLoader, epoch: int) -> list[dict[str, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
    return list(loader)


def test_loader_workers_give_identical_batches(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    ds = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    serial = make_loader(ds, batch_size=16, seed=0, train=True, num_workers=0, global_multiple=16)
    parallel = make_loader(ds, batch_size=16, seed=0, train=True, num_workers=2, global_multiple=16)
    for epoch in (0, 1, 2):
        a = collect(serial, epoch)
        b = collect(parallel, epoch)
        assert len(a) == len(b) == 128 // 16
        for batch_a, batch_b in zip(a, b, strict=True):
            assert torch.equal(batch_a["index"], batch_b["index"])
            assert torch.equal(batch_a["label"], batch_b["label"])
            assert torch.equal(batch_a["image"], batch_b["image"])
    epoch0, epoch2 = collect(serial, 0), collect(serial, 2)
    assert not torch.equal(epoch0[0]["index"], epoch2[0]["index"])


def test_default_augmentation_survives_max_magnitude_posterize(
    synthetic: SplitData, transforms: tuple[Any, Any]
) -> None:
    # (run.seed 0, epoch 1, index 47) of the default synthetic train split draws Posterize at magnitude 10
    # (0 bits), which Pillow >= 13 rejects; distill.data patches timm's op back to Pillow 12's black image.
    ds = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    ds.set_epoch(1)
    image, _, _, _ = ds[47]
    assert image.shape == (3, 16, 16)


def test_train_loader_batches(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    ds = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    loader = make_loader(ds, batch_size=8, seed=0, train=True, num_workers=0, global_multiple=48)
    batches = collect(loader, 0)
    # 128 images truncated to 96 (two global batches of 48), per-process batches of 8
    assert len(batches) == 12
    batch = batches[0]
    assert batch["image"].shape == (8, 3, 16, 16)
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    indices = torch.cat([b["index"] for b in batches]).tolist()
    sampler = EpochSampler(128, seed=0, shuffle=True, multiple=48)
    assert indices == list(sampler)
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert labels == [synthetic.train[i]["label"] for i in indices]


def test_loader_batch_equals_dataset_views(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    ds = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    loader = make_loader(ds, batch_size=8, seed=0, train=True, num_workers=0)
    batch = collect(loader, 2)[1]
    for row, index in enumerate(batch["index"].tolist()):
        assert torch.equal(batch["image"][row], ds[index][0])


def test_val_loader_in_order_keeps_last_partial_batch(synthetic: SplitData, transforms: tuple[Any, Any]) -> None:
    ds = AugmentedDataset(synthetic.val, transforms[1], seed=0, train=False)
    loader = make_loader(ds, batch_size=10, seed=0, train=False, num_workers=0)
    batches = collect(loader, 0)
    assert [len(b["index"]) for b in batches] == [10, 10, 10, 2]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(32))


def test_train_loader_smaller_than_global_batch_is_a_data_error(
    synthetic: SplitData, transforms: tuple[Any, Any]
) -> None:
    ds = AugmentedDataset(synthetic.train, transforms[0], seed=0, train=True)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_loader(ds, batch_size=8, seed=0, train=True, num_workers=0, global_multiple=256)


# build_mixup ----------------------------------------------------------------------------------


def test_build_mixup_off() -> None:
    assert build_mixup(AugmentConfig(mixup=0.0, cutmix=0.0), 0.1, num_classes=4, per_process_batch=8) is None
    assert build_mixup(AugmentConfig(mixup_prob=0.0), 0.1, num_classes=4, per_process_batch=8) is None
    # off means off, even with an odd batch
    assert build_mixup(AugmentConfig(mixup=0.0, cutmix=0.0), 0.1, num_classes=4, per_process_batch=7) is None


def test_build_mixup_odd_batch_is_a_data_error() -> None:
    with pytest.raises(DataError, match="even batch"):
        build_mixup(AugmentConfig(), 0.1, num_classes=4, per_process_batch=7)
    with pytest.raises(DataError, match="even batch"):
        build_mixup(AugmentConfig(mixup=0.8, cutmix=0.0), 0.1, num_classes=4, per_process_batch=3)


def test_build_mixup_on_gives_dense_smoothed_targets() -> None:
    mixup = build_mixup(AugmentConfig(mixup=0.8, cutmix=0.0), 0.1, num_classes=4, per_process_batch=4)
    assert mixup is not None
    np.random.seed(0)
    images = torch.rand(4, 3, 8, 8)
    _, targets = mixup(images, torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 4)
    assert targets.sum(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)
    assert float(targets.min()) >= 0.1 / 4 - 1e-6  # smoothing folded in: no class below eps / C


# Repeated augmentation ---------------------------------------------------------------------------


def test_repeated_sampler_holds_n_views_of_n_over_n_images() -> None:
    plain = list(EpochSampler(12, seed=3, shuffle=True))
    sampler = EpochSampler(12, seed=3, shuffle=True, repeats=3)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 12  # as many samples as images...
    images = [k % 12 for k in keys]
    assert images == [i for i in plain[:4] for _ in range(3)]  # ...of 12 / 3 distinct ones, in a row
    assert [k // 12 for k in keys] == [0, 1, 2] * 4  # the repeat, encoded in the key
    assert len(EpochSampler(13, seed=3, shuffle=True, multiple=4, repeats=3)) == 12


def deal(sampler: EpochSampler, per_process: int, processes: int) -> list[list[list[int]]]:
    """Each process's micro-batches, dealt by Accelerate itself (BatchSamplerShard over the
    per-process batches, as accelerator.prepare does)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    batches = BatchSampler(sampler, per_process, drop_last=True)
    return [list(BatchSamplerShard(batches, processes, p)) for p in range(processes)]


@pytest.mark.parametrize(("processes", "accum"), [(2, 2), (3, 1), (4, 1), (2, 1)])
def test_repeated_views_are_spread_across_processes(processes: int, accum: int) -> None:
    """Global batch 24, 3 views: each process's batch holds one view of an image whenever the
    batch is split into at least 3 shares (2 processes x 2 accumulation steps, 3 or 4 processes);
    2 shares of one batch hold 3 views between them, so one holds 2 (as DeiT's RASampler).
    The union of the processes' batches at each micro-step is the one-process batch."""
    n, batch, views = 120, 24, 3
    sampler = EpochSampler(n, seed=3, shuffle=True, multiple=batch, repeats=views)
    sampler.set_epoch(1)
    [one] = deal(sampler, batch // accum, 1)
    shards = deal(sampler, batch // (processes * accum), processes)
    assert all(len(shard) == len(one) for shard in shards) and len(one) == 5 * accum
    for k, whole in enumerate(one):
        assert [key for shard in shards for key in shard[k]] == whole
    most = 1 if processes * accum >= views else 2
    for shard in shards:
        assert max(max(Counter(key % n for key in b).values()) for b in shard) == most
    for step in range(5):  # an optimizer step holds every view of its 8 images
        keys = [key for whole in one[step * accum : (step + 1) * accum] for key in whole]
        assert sorted(Counter(key % n for key in keys).values()) == [3] * 8
        assert sorted(key // n for key in keys) == [0] * 8 + [1] * 8 + [2] * 8


def test_a_batch_not_a_multiple_of_the_views_leaves_out_the_last_views() -> None:
    """Global batch 16, 3 views: 6 images a batch, views 0 and 1 of all six and view 2 of the
    first four; the last two get 2 views that epoch."""
    sampler = EpochSampler(60, seed=0, shuffle=False, multiple=16, repeats=3)
    keys = list(sampler)
    assert len(keys) == 48
    first = keys[:16]
    assert first == [*range(6), *range(60, 66), *range(120, 124)]
    assert keys[16:22] == list(range(6, 12))  # the next batch starts with the next images


def test_repeat_zero_is_the_view_without_repetition_and_repeats_differ(
    train_ds: AugmentedDataset, synthetic: SplitData
) -> None:
    train_ds.set_epoch(1)
    n = len(synthetic.train)
    plain, first, second = train_ds[5], train_ds[5 + 0 * n], train_ds[5 + 1 * n]
    assert (first[2], first[3], second[2], second[3]) == (5, 0, 5, 1)
    assert torch.equal(plain[0], first[0])
    assert not torch.equal(first[0], second[0]) and first[1] == second[1]
    again = train_ds.__getitems__([5 + n])[0]
    assert torch.equal(again[0], second[0])  # a function of (seed, epoch, index, repeat)
