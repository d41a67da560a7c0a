"""Data sources and their bad inputs: imagefolder layouts, the Hub offline, subsets (distill/data/sources.py).

Every error test checks the message text: these are what a user reads.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image

from distill.data.sources import SplitData, _hub_reachable, load_source
from distill.errors import DataError, RecipeError
from distill.recipe.schema import DataConfig, load_recipe

CLASSES = ("cat", "dog", "emu")


def write_images(root: Path, split: str, classes: dict[str, int], base: int = 0, size: int = 12) -> None:
    """``root/split/<class>/<i>.png`` with ``classes[c]`` images each; pixel value encodes the image."""
    for c, (name, count) in enumerate(classes.items()):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            value = (base + 16 * c + i) % 256
            Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(folder / f"img{i:02d}.png")


def folder_cfg(root: Path, *overrides: str) -> DataConfig:
    return load_recipe(None, ["data.source=imagefolder", f"data.path={root}", *overrides]).data


def paths(ds: Any) -> list[str]:
    return [row["path"] for row in ds.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.fixture()
def train_val(tmp_path: Path) -> Path:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 4))
    write_images(tmp_path, "val", dict.fromkeys(CLASSES, 2), base=100)
    return tmp_path


# imagefolder -----------------------------------------------------------------------------------


def test_imagefolder_train_and_val(train_val: Path) -> None:
    split = load_source(folder_cfg(train_val))
    assert len(split.train) == 12
    assert len(split.val) == 6
    assert split.class_names == list(CLASSES)
    assert split.num_classes == 3
    assert split.val_origin == "val"
    assert Counter(split.train["label"]) == {0: 4, 1: 4, 2: 4}
    assert Counter(split.val["label"]) == {0: 2, 1: 2, 2: 2}
    assert all(f"{train_val}/train/" in p for p in paths(split.train))
    assert all(f"{train_val}/val/" in p for p in paths(split.val))
    image = split.train[0]["image"]
    assert image.size == (12, 12)
    assert np.asarray(image)[0, 0, 0] == 0  # class 0, image 0


def test_imagefolder_labels_follow_sorted_class_names(tmp_path: Path) -> None:
    write_images(tmp_path, "train", {"zebra": 2, "Ant": 2, "moth": 2, "ant": 2})
    split = load_source(folder_cfg(tmp_path, "data.val_fraction=0.5"))
    assert split.class_names == ["Ant", "ant", "moth", "zebra"]  # plain string order
    for path, label in zip(paths(split.train) + paths(split.val), [*split.train["label"], *split.val["label"]]):
        assert Path(path).parent.name == split.class_names[label]


def test_imagefolder_without_val_holds_out_a_stratified_split(tmp_path: Path) -> None:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 10))
    split = load_source(folder_cfg(tmp_path))
    assert split.val_origin == "held-out"
    assert len(split.train) == 24
    assert len(split.val) == 6  # val_fraction 0.2 of 30
    assert Counter(split.val["label"]) == {0: 2, 1: 2, 2: 2}
    assert Counter(split.train["label"]) == {0: 8, 1: 8, 2: 8}
    assert not set(paths(split.train)) & set(paths(split.val))
    again = load_source(folder_cfg(tmp_path))
    assert paths(again.val) == paths(split.val)


def test_imagefolder_uses_test_folder_when_no_val(tmp_path: Path) -> None:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 4))
    write_images(tmp_path, "test", dict.fromkeys(CLASSES, 3), base=200)
    split = load_source(folder_cfg(tmp_path))
    assert split.val_origin == "test"
    assert len(split.train) == 12
    assert len(split.val) == 9
    assert all(f"{tmp_path}/test/" in p for p in paths(split.val))
    assert {int(np.asarray(img)[0, 0, 0]) for img in split.val["image"]} == {
        200 + 16 * c + i for c in range(3) for i in range(3)
    }


def test_imagefolder_prefers_val_over_test(tmp_path: Path) -> None:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 4))
    write_images(tmp_path, "val", dict.fromkeys(CLASSES, 2), base=100)
    write_images(tmp_path, "test", dict.fromkeys(CLASSES, 3), base=200)
    split = load_source(folder_cfg(tmp_path))
    assert split.val_origin == "val"
    assert len(split.val) == 6


def test_imagefolder_explicit_split_names(tmp_path: Path) -> None:
    write_images(tmp_path, "training", dict.fromkeys(CLASSES, 4))
    write_images(tmp_path, "holdout", dict.fromkeys(CLASSES, 1), base=100)
    split = load_source(folder_cfg(tmp_path, "data.train_split=training", "data.val_split=holdout"))
    assert (len(split.train), len(split.val), split.val_origin) == (12, 3, "holdout")


def test_imagefolder_ignores_non_images_and_hidden_files(train_val: Path) -> None:
    cat = train_val / "train" / "cat"
    Image.new("RGB", (12, 12)).save(cat / ".hidden.png")
    (cat / ".DS_Store").write_bytes(b"\0\1\2")
    (cat / "notes.txt").write_text("not an image")
    (cat / "labels.csv").write_text("a,b\n")
    (cat / "subfolder.png").mkdir()  # a folder with an image suffix
    (train_val / "train" / "README.md").write_text("loose file next to the classes")
    hidden_class = train_val / "train" / ".cache"
    hidden_class.mkdir()
    Image.new("RGB", (12, 12)).save(hidden_class / "x.png")
    (train_val / "val" / "dog" / "Thumbs.db").write_bytes(b"\0")
    split = load_source(folder_cfg(train_val))
    assert split.class_names == list(CLASSES)
    assert (len(split.train), len(split.val)) == (12, 6)
    assert all(p.endswith(".png") and "/." not in p for p in paths(split.train) + paths(split.val))


def test_imagefolder_image_suffix_is_case_insensitive(train_val: Path) -> None:
    Image.new("RGB", (12, 12)).save(train_val / "train" / "cat" / "UPPER.PNG")
    Image.new("RGB", (12, 12)).save(train_val / "train" / "dog" / "photo.JPEG", format="JPEG")
    split = load_source(folder_cfg(train_val))
    assert len(split.train) == 14
    assert Counter(split.train["label"]) == {0: 5, 1: 5, 2: 4}


def test_imagefolder_class_folder_without_images_is_not_a_class(tmp_path: Path) -> None:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 4))
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "text_only").mkdir()
    (tmp_path / "train" / "text_only" / "a.txt").write_text("x")
    split = load_source(folder_cfg(tmp_path))
    assert split.class_names == list(CLASSES)


# imagefolder errors ----------------------------------------------------------------------------


def test_imagefolder_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_source(folder_cfg(missing))
    msg = str(info.value)
    assert f"data.path '{missing}' is not a directory" in msg
    assert "<path>/train/<class>/<image>" in msg


def test_imagefolder_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "data.zip"
    file.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"is not a directory"):
        load_source(folder_cfg(file))


def test_imagefolder_without_train_folder(tmp_path: Path) -> None:
    write_images(tmp_path, "val", dict.fromkeys(CLASSES, 2))
    with pytest.raises(DataError) as info:
        load_source(folder_cfg(tmp_path))
    msg = str(info.value)
    assert f"no 'train/' folder in {tmp_path}" in msg
    assert "<path>/train/<class>/<image>" in msg


def test_imagefolder_custom_train_split_missing(train_val: Path) -> None:
    with pytest.raises(DataError, match=r"no 'training/' folder in .*<path>/training/<class>/<image>"):
        load_source(folder_cfg(train_val, "data.train_split=training"))


def test_imagefolder_train_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "train" / "loose.png")  # images must sit in class folders
    with pytest.raises(DataError) as info:
        load_source(folder_cfg(tmp_path))
    msg = str(info.value)
    assert f"{tmp_path / 'train'} holds no class folders with images" in msg
    assert ".png" in msg
    assert ".jpg" in msg


def test_imagefolder_class_folders_without_images(tmp_path: Path) -> None:
    for name in CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"holds no class folders with images"):
        load_source(folder_cfg(tmp_path))


def test_imagefolder_val_classes_differ(tmp_path: Path) -> None:
    write_images(tmp_path, "train", {"cat": 4, "dog": 4, "emu": 4})
    write_images(tmp_path, "val", {"cat": 2, "dog": 2, "yak": 2})
    with pytest.raises(DataError) as info:
        load_source(folder_cfg(tmp_path))
    msg = str(info.value)
    assert "class folders differ between" in msg
    assert "only in train: ['emu']" in msg
    assert "only in val: ['yak']" in msg


def test_imagefolder_val_missing_a_class(tmp_path: Path) -> None:
    write_images(tmp_path, "train", dict.fromkeys(CLASSES, 4))
    write_images(tmp_path, "test", {"cat": 2, "dog": 2})
    with pytest.raises(DataError) as info:
        load_source(folder_cfg(tmp_path))
    msg = str(info.value)
    assert "only in train: ['emu']" in msg
    assert "only in test: none" in msg


def test_imagefolder_explicit_val_split_missing(train_val: Path) -> None:
    with pytest.raises(DataError, match=r"data\.val_split 'holdout' not found \(splits: train\)"):
        load_source(folder_cfg(train_val, "data.val_split=holdout"))


def test_imagefolder_single_class(tmp_path: Path) -> None:
    write_images(tmp_path, "train", {"only": 6})
    with pytest.raises(DataError, match=r"imagefolder data has 1 class; at least 2 are needed"):
        load_source(folder_cfg(tmp_path))


def test_imagefolder_single_class_with_val(tmp_path: Path) -> None:
    write_images(tmp_path, "train", {"only": 4})
    write_images(tmp_path, "val", {"only": 2})
    with pytest.raises(DataError, match=r"has 1 class; at least 2 are needed"):
        load_source(folder_cfg(tmp_path))


def test_imagefolder_too_few_images_to_hold_out_is_a_data_error(tmp_path: Path) -> None:
    write_images(tmp_path, "train", {"cat": 1, "dog": 5, "emu": 5})
    with pytest.raises(DataError):
        load_source(folder_cfg(tmp_path))


@pytest.mark.parametrize("source", ["imagefolder", "hub"])
def test_path_required_for_imagefolder_and_hub(source: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(None, [f"data.source={source}"])
    assert f"data.path is required for data.source={source}" in str(info.value)


# hub -------------------------------------------------------------------------------------------


def test_hub_unreachable_fails_fast_with_a_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cfg = load_recipe(None, ["data.source=hub", "data.path=distill-tests/does-not-exist"]).data
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_source(cfg)
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert "cannot load hub dataset 'distill-tests/does-not-exist'" in msg
    assert "data.source=imagefolder" in msg
    assert elapsed < 15, f"took {elapsed:.1f}s"


def test_hub_offline_mode_is_restored_after_a_failed_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    cfg = load_recipe(None, ["data.source=hub", "data.path=distill-tests/does-not-exist"]).data
    with pytest.raises(DataError):
        load_source(cfg)
    after = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    assert after == before


def test_hub_reachable_honours_the_endpoint_port(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert _hub_reachable(timeout=1.0)


def test_hub_reachable_false_for_a_closed_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here
    start = time.perf_counter()
    assert not _hub_reachable(timeout=1.0)
    assert time.perf_counter() - start < 5


# max_train_samples / max_val_samples -----------------------------------------------------------


def digits(*overrides: str) -> SplitData:
    return load_source(load_recipe(None, ["data.source=digits", *overrides]).data)


@pytest.fixture(scope="module")
def full_digits() -> SplitData:
    return digits()


@pytest.fixture(scope="module")
def sub_digits() -> SplitData:
    return digits("data.max_train_samples=200", "data.max_val_samples=50")


def test_subsets_have_the_requested_sizes(full_digits: SplitData, sub_digits: SplitData) -> None:
    assert (len(full_digits.train), len(full_digits.val)) == (1437, 360)
    assert (len(sub_digits.train), len(sub_digits.val)) == (200, 50)
    assert sub_digits.class_names == full_digits.class_names
    assert sub_digits.val_origin == "held-out"


def test_subsets_are_stratified(full_digits: SplitData, sub_digits: SplitData) -> None:
    for full, sub in ((full_digits.train, sub_digits.train), (full_digits.val, sub_digits.val)):
        full_counts, sub_counts = Counter(full["label"]), Counter(sub["label"])
        assert set(sub_counts) == set(range(10))
        for label, count in full_counts.items():
            expected = count * len(sub) / len(full)
            assert abs(sub_counts[label] - expected) <= 1, (label, sub_counts[label], expected)


def test_subsets_are_subsets_of_the_full_splits(full_digits: SplitData, sub_digits: SplitData) -> None:
    def keys(ds: Any) -> set[tuple[bytes, int]]:
        return {(np.asarray(img).tobytes(), lbl) for img, lbl in zip(ds["image"], ds["label"])}

    assert keys(sub_digits.val) <= keys(full_digits.val)
    assert keys(sub_digits.train) <= keys(full_digits.train)


def test_subsets_are_deterministic(sub_digits: SplitData) -> None:
    again = digits("data.max_train_samples=200", "data.max_val_samples=50")
    assert list(again.train["label"]) == list(sub_digits.train["label"])
    assert list(again.val["label"]) == list(sub_digits.val["label"])
    first = [np.asarray(img) for img in sub_digits.train[:20]["image"]]
    second = [np.asarray(img) for img in again.train[:20]["image"]]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_subset_at_or_above_split_size_keeps_everything(full_digits: SplitData) -> None:
    split = digits("data.max_train_samples=1437", "data.max_val_samples=100000")
    assert (len(split.train), len(split.val)) == (len(full_digits.train), len(full_digits.val))
    assert list(split.train["label"]) == list(full_digits.train["label"])


@pytest.mark.parametrize(
    "override",
    ["data.max_train_samples=5", "data.max_val_samples=5", "data.max_val_samples=359", "data.max_train_samples=1436"],
)
def test_subset_smaller_than_class_count_is_a_data_error(override: str) -> None:
    with pytest.raises(DataError):
        digits(override)


def test_a_process_resolves_the_same_split_once(tmp_path: Path) -> None:
    """A study's runs share one resolved split (listing CIFAR-10 costs seconds per run); settings
    that only change how images are read share it too, anything else resolves afresh."""
    write_images(tmp_path, "train", {"a": 4, "b": 4})
    first = load_source(folder_cfg(tmp_path))
    assert load_source(folder_cfg(tmp_path, "data.seed=5", "data.augment.hflip=0.0", "data.store=decode")) is first
    other = load_source(folder_cfg(tmp_path, "data.val_fraction=0.5"))
    assert other is not first and len(other.val) == 4
