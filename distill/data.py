"""Data sources -> Hugging Face datasets -> deterministic, augmented torch loaders.

The data contract (PRODUCT.md): the augmented view of image i in epoch e is a function of
(run.seed, e, i) alone. Each sample is transformed under RNG states seeded from that triple and
the caller's RNG states are restored afterwards, so the view does not depend on the loader
worker, the process, the batch it lands in, or what ran before (e.g. a resumed run). Runs that
differ only in the loss see identical batches, and teacher outputs could be cached by key.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.config import AugmentConfig, DataConfig
from distill.errors import DataError

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

    raw = ds.cast_column("image", datasets.Image(decode=False))
    bad = []
    for i, cell in enumerate(raw["image"]):
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
_SPLIT_FREE_KEYS = {"num_workers", "augment", "seed", "store"}  # how data is read, not which


def load_source(cfg: DataConfig) -> SplitData:
    """Resolve ``cfg`` into train/val datasets (stratified, seeded held-out val if none); the
    same settings again in this process return the same (immutable) splits."""
    key = cfg.model_dump_json(exclude=_SPLIT_FREE_KEYS)
    if key not in _SPLITS:
        _SPLITS.clear()  # one at a time: a split may hold a decoded source in memory
        _SPLITS[key] = _load_source(cfg)
    return _SPLITS[key]


def _load_source(cfg: DataConfig) -> SplitData:
    if cfg.source == "digits":
        splits = {"train": _digits()}
    elif cfg.source == "synthetic":
        splits = {"train": _synthetic(cfg, "train"), "validation": _synthetic(cfg, "val")}
    elif cfg.source == "imagefolder":
        splits = _load_imagefolder(cfg)
    else:
        splits = dict(_load_hub(cfg))

    if cfg.train_split not in splits:
        raise DataError(
            f"data.train_split '{cfg.train_split}' not found in {cfg.source} source (splits: {', '.join(splits)})"
        )
    train = _standard_columns(splits[cfg.train_split], f"{cfg.source} split '{cfg.train_split}'")
    if cfg.val_split is not None:
        if cfg.val_split not in splits:
            raise DataError(f"data.val_split '{cfg.val_split}' not found (splits: {', '.join(splits)})")
        val_name = cfg.val_split
    else:
        val_name = next((n for n in VAL_SPLIT_NAMES if n in splits), None)
    if val_name is None:
        train, val = _stratified(train, 1.0 - cfg.val_fraction, cfg.split_seed)
        origin = "held-out"
    else:
        val = _standard_columns(splits[val_name], f"{cfg.source} split '{val_name}'")
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
# Transforms and deterministic augmentation


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, valid for 0 bits again.

    DeiT's RandAugment (m9, mstd0.5) clamps about 2.3% of magnitudes to 10, which
    PosterizeIncreasing maps to 0 bits; Pillow >= 13 rejects 0 ("bits must be between or equal
    to 1 and 8"), which killed about 1 training image in 700 (found by tests/test_data.py).
    Pillow < 13 returned a black image for 0 bits; we keep that behaviour.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


def build_transforms(aug: AugmentConfig, data_config: dict[str, Any]) -> tuple[Any, Any]:
    """timm train/eval transforms for the student's resolved data config."""
    from timm.data import create_transform

    _patch_timm_posterize()

    interpolation = aug.interpolation or data_config.get("interpolation", "bicubic")
    crop_pct = aug.crop_pct or data_config.get("crop_pct", 0.875)
    common = dict(
        input_size=data_config["input_size"],
        interpolation=interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
    )
    train_tf = create_transform(
        **common,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        re_mode="pixel",
    )
    return train_tf, eval_transform({**data_config, "interpolation": interpolation, "crop_pct": crop_pct})


def eval_transform(data_config: dict[str, Any]) -> Any:
    """timm's deterministic eval transform (resize, centre crop, normalise) for a data config."""
    from timm.data import create_transform

    return create_transform(
        input_size=data_config["input_size"],
        interpolation=data_config.get("interpolation", "bicubic"),
        mean=data_config["mean"],
        std=data_config["std"],
        crop_pct=data_config.get("crop_pct", 0.875),
        is_training=False,
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The one seed behind the view of image ``index`` in ``epoch`` (the data contract)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


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


class AugmentedDataset(Dataset):
    """An HF dataset seen through a transform keyed by (seed, epoch, index).

    Yields ``(image_tensor, label, index)``; the index lets callers key cached teacher outputs.
    """

    def __init__(self, ds: Any, transform: Any, seed: int, train: bool) -> None:
        import datasets

        # Decode here rather than in datasets, so that a corrupt file is named in the error.
        self.ds = ds.cast_column("image", datasets.Image(decode=False))
        self.transform = transform
        self.seed = seed
        self.train = train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def _view(self, cell: dict[str, Any], index: int) -> torch.Tensor:
        image = decode_rgb(cell, index)
        if not self.train:
            return self.transform(image)
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        row = self.ds[int(index)]
        return self._view(row["image"], int(index)), int(row["label"]), int(index)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
        rows = self.ds[[int(i) for i in indices]]  # one Arrow read per batch
        return [
            (self._view(img, int(i)), int(lbl), int(i))
            for img, lbl, i in zip(rows["image"], rows["label"], indices, strict=True)
        ]


ORDER_KEY = 2**32 - 1  # the "index" that keys an epoch's order, apart from every image's view


class EpochSampler(Sampler[int]):
    """A permutation that depends on (seed, epoch) only; train order truncated to whole steps.

    Truncating to a multiple of the global micro-batch means every process count that divides
    the batch sees the same global batches: Accelerate hands process p the batches p, p+W, ...
    of size B/W, whose union at each step is the one-process batch of size B.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, multiple: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.multiple = n, seed, shuffle, multiple
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n - self.n % self.multiple

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, ORDER_KEY))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[: len(self)])


def collate(batch: list[tuple[torch.Tensor, int, int]]) -> dict[str, torch.Tensor]:
    images, labels, indices = zip(*batch, strict=True)
    return {
        "image": torch.stack(images),
        "label": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
    }


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    train: bool,
    num_workers: int,
    global_multiple: int = 1,
    collate_fn: Any = collate,
) -> DataLoader:
    """A plain DataLoader (per-process batch) ready for ``accelerator.prepare``.

    ``persistent_workers`` stays off: workers must be re-created each epoch to see set_epoch.
    """
    sampler = EpochSampler(len(dataset), seed, shuffle=train, multiple=global_multiple)
    if train and len(sampler) == 0:
        raise DataError(
            f"the training split has {len(dataset)} images, fewer than one global batch "
            f"({global_multiple}); lower train.batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(),
    )


def build_mixup(aug: AugmentConfig, label_smoothing: float, num_classes: int, per_process_batch: int) -> Any:
    """timm's Mixup/CutMix (None when both are off). It draws from numpy's global RNG, which
    the engine re-seeds per step. Targets come back dense with label smoothing folded in."""
    if (aug.mixup <= 0 and aug.cutmix <= 0) or aug.mixup_prob <= 0:
        return None
    if per_process_batch % 2:
        raise DataError(
            f"mixup/cutmix needs an even batch per process, got {per_process_batch}; change "
            "train.batch_size or set data.augment.mixup=0 and data.augment.cutmix=0"
        )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


def train_eval_loaders(
    split: SplitData,
    transforms: tuple[Any, Any],
    seed: int,
    train_batch: int,
    train_multiple: int,
    eval_batch: int,
    num_workers: int,
    store: str = "decode",
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders with per-process batch sizes, before ``accelerator.prepare``.

    ``store='tensor'``: the train loader yields uint8 batches decoded once (tensor_store.py); the
    caller augments them with BatchAugment. Validation always decodes (the export's path)."""
    train_tf, eval_tf = transforms
    if store == "tensor":
        from distill.tensor_store import StoredImages, collate_stored, decode_all

        stored = StoredImages(decode_all(split.train), split.train["label"])
        train = make_loader(stored, train_batch, seed, True, 0, train_multiple, collate_stored)
    else:
        train = make_loader(
            AugmentedDataset(split.train, train_tf, seed, train=True),
            train_batch,
            seed,
            train=True,
            num_workers=num_workers,
            global_multiple=train_multiple,
        )
    val = make_loader(
        AugmentedDataset(split.val, eval_tf, seed, train=False),
        eval_batch,
        seed,
        train=False,
        num_workers=num_workers,
    )
    return train, val
