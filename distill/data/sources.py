"""Data sources -> train/val splits (Hugging Face datasets), image decoding, the bad-image scan.

No loaders here (pipeline.py builds them). The data contract: the augmented view of
image i in epoch e is a function of (data seed, e, i) alone; ``sample_seed`` is that function's
one seed and ``seeded`` runs a transform under it. Runs that differ only in the loss therefore
see identical batches, and teacher outputs can be cached by position in the stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data.shards import StreamSplit, load_shards
from distill.errors import DataError
from distill.recipe.keys import SPLIT, data_fields
from distill.recipe.schema import DataConfig

# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class SplitData:
    """A source resolved into train and validation splits with named classes."""

    train: Any  # datasets.Dataset with columns 'image' (PIL) and 'label' (int)
    val: Any
    class_names: list[str]
    val_origin: str  # which split the validation images came from, or 'held-out'
    skipped: list[str] = field(default_factory=list)  # undecodable images dropped (on_bad_image=skip)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits() -> Any:
    """scikit-learn's bundled 8x8 digits (1,797 images, ships with the dependency)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # values are 0..16
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": bunch.target.tolist()},
        features=features,
    )


def _synthetic(cfg: DataConfig, split: str) -> Any:
    """Class-dependent colour/stripe patterns plus noise: learnable, generated, deterministic."""
    import datasets
    from PIL import Image

    s = cfg.synthetic
    per_class = s.train_per_class if split == "train" else s.val_per_class
    rng = np.random.default_rng([cfg.split_seed, 0 if split == "train" else 1])
    proto_rng = np.random.default_rng(cfg.split_seed + 1000)
    protos = proto_rng.uniform(40, 215, size=(s.num_classes, 3))
    images, labels = [], []
    yy, xx = np.mgrid[0 : s.image_size, 0 : s.image_size]
    for c in range(s.num_classes):
        stripes = np.sin((xx * np.cos(c) + yy * np.sin(c)) * (0.6 + 0.15 * c))[..., None] * 40
        for _ in range(per_class):
            noise = rng.normal(0, s.noise, size=(s.image_size, s.image_size, 3))
            img = np.clip(protos[c] + stripes + noise, 0, 255).astype(np.uint8)
            images.append(Image.fromarray(img, mode="RGB"))
            labels.append(c)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(s.num_classes)]),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint (HF_ENDPOINT, with its scheme's or its own port)."""
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """Switch datasets/huggingface_hub to offline mode at run time.

    Both read HF_HUB_OFFLINE when imported; without it an unreachable hub costs ~25 s of retries
    per lookup (measured here), so when a quick TCP probe fails we flip their module constants.
    """
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(cfg: DataConfig) -> Any:
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    ctx = contextlib.nullcontext() if offline or _hub_reachable() else _offline_hub()
    try:
        with ctx:
            return datasets.load_dataset(cfg.path, cfg.hub_config)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFound, ...)
        raise DataError(
            f"cannot load hub dataset '{cfg.path}': {type(exc).__name__}: {exc}. The Hub is "
            "unreachable or the dataset is not in the local cache ($HF_HOME); download it on a "
            "machine with network, or use data.source=imagefolder with a local directory"
        ) from None


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VAL_SPLIT_NAMES = ("validation", "val", "test")


def _list_classes(split_dir: Path) -> dict[str, list[str]]:
    """{class folder: sorted image paths}; os.scandir, not datasets' pattern inference, which
    took 65 s per load on CIFAR-10's 60,000 files here (fsspec glob: 2.7 million stat calls)."""
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = [
                f.path
                for f in os.scandir(entry.path)
                if f.is_file() and not f.name.startswith(".") and Path(f.name).suffix.lower() in IMAGE_SUFFIXES
            ]
            classes[entry.name] = sorted(files)
    return classes


def _folder_split(split_dir: Path, class_names: list[str]) -> Any:
    import datasets

    listing = _list_classes(split_dir)
    paths = [p for name in class_names for p in listing.get(name, [])]
    labels = [i for i, name in enumerate(class_names) for _ in listing.get(name, [])]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _load_imagefolder(cfg: DataConfig) -> dict[str, Any]:
    """``<path>/<split>/<class>/<image>`` as datasets with Image and ClassLabel columns."""
    root = Path(str(cfg.path)).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.path '{root}' is not a directory; an imagefolder source needs "
            "<path>/train/<class>/<image> (and optionally val/ or test/)"
        )
    train_dir = root / cfg.train_split
    if not train_dir.is_dir():
        raise DataError(f"no '{cfg.train_split}/' folder in {root}: expected <path>/{cfg.train_split}/<class>/<image>")
    train_classes = _list_classes(train_dir)
    class_names = [name for name, files in train_classes.items() if files]
    if not class_names:
        raise DataError(f"{train_dir} holds no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    splits = {cfg.train_split: _folder_split(train_dir, class_names)}
    for name in (cfg.val_split,) if cfg.val_split else VAL_SPLIT_NAMES:
        split_dir = root / name
        if not split_dir.is_dir():
            continue
        val_classes = {n for n, files in _list_classes(split_dir).items() if files}
        if val_classes != set(class_names):
            only_train = sorted(set(class_names) - val_classes)
            only_val = sorted(val_classes - set(class_names))
            raise DataError(
                f"class folders differ between {train_dir} and {split_dir}: only in {cfg.train_split}: "
                f"{only_train or 'none'}; only in {name}: {only_val or 'none'}. Give both splits the same classes"
            )
        splits[name] = _folder_split(split_dir, class_names)
        break
    return splits


def folder_overrides(folder: Path) -> list[str]:
    """An image folder given on a command line as imagefolder data: a root with ``train/`` as it
    is, otherwise a folder of class folders as one split (its parent the root, itself both the
    train and the val split)."""
    if (folder / "train").is_dir():
        return ["data.source=imagefolder", f"data.path={folder}"]
    root = folder.resolve()
    return [
        "data.source=imagefolder",
        f"data.path={root.parent}",
        f"data.train_split={root.name}",
        f"data.val_split={root.name}",
    ]


def _standard_columns(ds: Any, where: str) -> Any:
    """Rename a dataset's image and ClassLabel columns to 'image'/'label'; drop the rest."""
    import datasets

    image_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise DataError(f"{where} needs an image column and a class-label column; found {dict(ds.features)}")
    ds = ds.select_columns([image_col, label_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    return ds


def open_image(cell: dict[str, Any]) -> Any:
    """Decode an undecoded datasets Image cell ({'bytes', 'path'}) fully (load() also catches
    truncation, which Image.open alone does not)."""
    import io

    from PIL import Image

    source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
    image = Image.open(source)
    image.load()
    return image


def describe(cell: dict[str, Any], index: int) -> str:
    return cell.get("path") or f"image #{index}"


def bad_images(ds: Any) -> list[tuple[int, str, str]]:
    """(index, file, error) for every image of ``ds`` that does not decode."""
    import datasets

    if isinstance(ds, StreamSplit):  # read front to back from where it is stored
        raw = ds.cells()
    else:
        raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    bad = []
    for i, cell in enumerate(raw):
        try:
            open_image(cell)
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            bad.append((i, describe(cell, i), f"{type(exc).__name__}: {exc}"))
    return bad


def _drop_bad(ds: Any) -> tuple[Any, list[str]]:
    bad = bad_images(ds)
    if not bad:
        return ds, []
    dropped = {i for i, _, _ in bad}
    return ds.select([i for i in range(len(ds)) if i not in dropped]), [f for _, f, _ in bad]


def _stratified(ds: Any, keep: int | float, seed: int) -> tuple[Any, Any]:
    """(kept, rest): a seeded split with class proportions preserved. scikit-learn's splitter
    on the label column: datasets' own stratified split took 8 s on 50,000 rows here."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(ds["label"])
    try:
        kept, rest = train_test_split(np.arange(len(ds)), train_size=keep, random_state=seed, stratify=labels)
    except ValueError as exc:  # too few images per class for a stratified split of that size
        counts = np.bincount(labels)
        raise DataError(
            f"cannot draw a stratified split keeping {keep} of {len(ds)} images over {len(counts)} classes "
            f"(smallest class: {counts.min()} images): {exc}. Use more images per class, or change "
            "data.val_fraction / data.max_train_samples / data.max_val_samples"
        ) from None
    return ds.select(np.sort(kept)), ds.select(np.sort(rest))


def _subset(ds: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(ds):
        return ds
    return _stratified(ds, n, seed)[0]


# Splits already resolved in this process, by the data settings that define them: a study runs
# its 9+ runs in one process, and listing + splitting CIFAR-10 costs 3-7 s per run (measured).
_SPLITS: dict[str, SplitData] = {}


def load_source(cfg: DataConfig) -> SplitData:
    """Resolve ``cfg`` into train/val datasets (stratified, seeded held-out val if none); the
    same settings again in this process return the same (immutable) splits."""
    key = json.dumps(data_fields(cfg, SPLIT), sort_keys=True)
    if key not in _SPLITS:
        _SPLITS.clear()  # one at a time: a split may hold a decoded source in memory
        _SPLITS[key] = _load_source(cfg)
    return _SPLITS[key]


def source_splits(cfg: DataConfig) -> dict[str, Any]:
    """The source's own splits, before validation is chosen or held out (what shards hold)."""
    if cfg.source == "digits":
        return {"train": _digits()}
    if cfg.source == "synthetic":
        return {"train": _synthetic(cfg, "train"), "validation": _synthetic(cfg, "val")}
    if cfg.source == "imagefolder":
        return _load_imagefolder(cfg)
    if cfg.source == "shards":
        return load_shards(cfg.path, cfg.verify_shards, stream=cfg.shard_access == "stream")
    return dict(_load_hub(cfg))


def _check_streamed(cfg: DataConfig, train: StreamSplit, held_out: bool) -> None:
    """What a training split read front to back from a URL cannot do, refused before any read:
    each of these needs every training image's label or bytes at load time."""
    copy = "give a local or mounted copy as data.path"
    refused = [
        (held_out, "holds no validation split (holding one out of the training split reads every label)",
         f"write the shards from a source with a validation split, or {copy}"),
        (cfg.max_train_samples is not None, "cannot draw data.max_train_samples (a subset reads every label)",
         f"remove it, or {copy}"),
        (cfg.on_bad_image == "skip", "cannot drop undecodable images at load (data.on_bad_image=skip opens them all)",
         f"list them with python -m distill.scan RECIPE (it reads URLs), remove them from the source and write "
         f"the shards again, or {copy}"),
    ]  # fmt: skip
    for bad, why, fix in refused:
        if bad:
            raise DataError(
                f"the shard set at {train.files.root} (read front to back: a URL or a pipe: command) {why}; {fix}"
            )


def _load_source(cfg: DataConfig) -> SplitData:
    splits = source_splits(cfg)
    if cfg.train_split not in splits:
        raise DataError(
            f"data.train_split '{cfg.train_split}' not found in {cfg.source} source (splits: {', '.join(splits)})"
        )
    train = splits[cfg.train_split]
    if not isinstance(train, StreamSplit):
        train = _standard_columns(train, f"{cfg.source} split '{cfg.train_split}'")
    if cfg.val_split is not None:
        if cfg.val_split not in splits:
            raise DataError(f"data.val_split '{cfg.val_split}' not found (splits: {', '.join(splits)})")
        val_name = cfg.val_split
    else:
        val_name = next((n for n in VAL_SPLIT_NAMES if n in splits), None)
    if isinstance(train, StreamSplit):
        _check_streamed(cfg, train, held_out=val_name is None)
    if val_name is None:
        train, val = _stratified(train, 1.0 - cfg.val_fraction, cfg.split_seed)
        origin = "held-out"
    else:
        val = splits[val_name]
        val = val.fetched(cfg.verify_shards) if isinstance(val, StreamSplit) else val
        val = _standard_columns(val, f"{cfg.source} split '{val_name}'")
        origin = val_name

    class_names = list(train.features["label"].names)
    if len(class_names) < 2:
        raise DataError(f"{cfg.source} data has {len(class_names)} class; at least 2 are needed")
    skipped: list[str] = []
    if cfg.on_bad_image == "skip":
        train, bad_train = _drop_bad(train)
        val, bad_val = _drop_bad(val)
        skipped = bad_train + bad_val
    train = _subset(train, cfg.max_train_samples, cfg.split_seed)
    val = _subset(val, cfg.max_val_samples, cfg.split_seed)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"{cfg.source} data is empty (train {len(train)}, val {len(val)} images)")
    return SplitData(train=train, val=val, class_names=class_names, val_origin=origin, skipped=skipped)


# ---------------------------------------------------------------------------------------------
# The seeds behind deterministic augmentation, and decoding


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The one seed behind the view of image ``index`` in ``epoch`` (the data contract); with
    repeated augmentation, of its ``repeat``-th view (repeat 0 is the view without repetition)."""
    entropy = [seed, epoch, index] if repeat == 0 else [seed, epoch, index, repeat]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with python/numpy/torch-CPU RNGs seeded from ``seed``.

    Python's and torch's states are restored afterwards. numpy's is left seeded: restoring it
    costs ~125 us per call (measured), more than a small image's whole transform, and every
    consumer of numpy randomness in a run (mixup) re-seeds it per step (engine.set_step_seed).
    ``torch.default_generator.manual_seed`` instead of ``torch.manual_seed``: 1.4 us vs 170 us.
    """
    py_state, torch_state = random.getstate(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.default_generator.set_state(torch_state)


def decode_rgb(cell: dict[str, Any], index: int) -> Any:
    """An undecoded Image cell as an RGB PIL image; a corrupt file is a DataError naming it."""
    try:
        return open_image(cell).convert("RGB")
    except Exception as exc:
        raise DataError(
            f"cannot decode image {describe(cell, index)}: {type(exc).__name__}: {exc}. Remove or replace it, "
            "set data.on_bad_image=skip to drop such images, or list them all with python -m distill.scan RECIPE"
        ) from None


def collate(batch: list[tuple[torch.Tensor, int, int, int]]) -> dict[str, torch.Tensor]:
    """Per-image samples (view, label, index, repeat) as one batch: the decode path's and stream
    mode's (the tensor store batches itself)."""
    images, labels, indices, repeats = zip(*batch, strict=True)
    return {
        "image": torch.stack(images),
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),  # the image's index in its split
        "repeat": torch.tensor(repeats, dtype=torch.long),  # which of its views (repeated aug)
    }
