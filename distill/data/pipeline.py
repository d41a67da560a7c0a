"""The input pipeline: what a model is fed (``InputSpec``), and the one object that turns a split
into training batches (``build_pipeline`` -> ``InputPipeline``).

Two data paths deliver the same contract (the view of image i in epoch e is a function of
(data seed, e, i) alone; sources.py and tensor_store.py say how): ``decode``, timm's PIL transforms
per image in the loader, and ``tensor``, images decoded once and augmented as whole batches on
the device. Which one a run uses is decided here, once, and only ``InputPipeline.prepare`` knows
it: every caller (the student's run, the teacher stage, the bench) gets ``(images, targets)``
from ``prepare(batch, epoch)`` and never looks at the path. Validation always decodes, so logged
accuracies and export re-validation see the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.data.sources import SplitData, collate, decode_rgb, sample_seed, seeded
from distill.data.stream import stream_loader
from distill.data.tensor_store import FILTERS, BatchAugment, StoredImages, collate_stored, decode_all, store_fits
from distill.errors import DataError, RecipeError
from distill.models.spec import InputSpec
from distill.recipe.schema import AugmentConfig, DataConfig, Recipe


def data_seed(recipe: Recipe) -> int:
    """The seed of the data stream (order, augmentation, mixup): data.seed, else run.seed."""
    return recipe.run.seed if recipe.data.seed is None else recipe.data.seed


# ---------------------------------------------------------------------------------------------
# Transforms


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


def build_transforms(aug: AugmentConfig, spec: InputSpec) -> tuple[Any, Any]:
    """timm train/eval transforms for a resolved input spec."""
    from timm.data import create_transform

    _patch_timm_posterize()
    train_tf = create_transform(
        input_size=(3, *spec.size),
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        is_training=True,
        scale=aug.scale,
        ratio=aug.ratio,
        hflip=aug.hflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        re_mode="pixel",
    )
    return train_tf, eval_transform(spec)


def eval_transform(spec: InputSpec) -> Any:
    """timm's deterministic eval transform (resize, centre crop, normalise)."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, *spec.size),
        interpolation=spec.interpolation,
        mean=spec.mean,
        std=spec.std,
        crop_pct=spec.crop_pct,
        is_training=False,
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


# ---------------------------------------------------------------------------------------------
# Datasets, order and loaders


class AugmentedDataset(Dataset):
    """An HF dataset seen through a transform keyed by (seed, epoch, index).

    Yields ``(image_tensor, label, index)``; the index lets callers key cached teacher outputs.
    Each sample is transformed under RNG states seeded from (seed, epoch, index) and the
    caller's states are restored afterwards, so the view does not depend on the loader worker,
    the process, the batch it lands in, or what ran before (a resumed run).
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

    def _view(self, cell: dict[str, Any], index: int, repeat: int) -> torch.Tensor:
        image = decode_rgb(cell, index)
        if not self.train:
            return self.transform(image)
        with seeded(sample_seed(self.seed, self.epoch, index, repeat)):
            return self.transform(image)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int, int, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[int]) -> list[tuple[torch.Tensor, int, int, int]]:
        """``keys`` from EpochSampler: image index + repeat x len (repeat 0 without repetition)."""
        n = len(self.ds)
        index, repeat = [int(k) % n for k in keys], [int(k) // n for k in keys]
        rows = self.ds[index]  # one Arrow read per batch
        return [
            (self._view(img, i, r), int(lbl), i, r)
            for img, lbl, i, r in zip(rows["image"], rows["label"], index, repeat, strict=True)
        ]


ORDER_KEY = 2**32 - 1  # the "index" that keys an epoch's order, apart from every image's view


class EpochSampler(Sampler[int]):
    """A permutation that depends on (seed, epoch) only; train order truncated to whole steps.

    Truncating to a multiple of the global batch means every process count that divides the
    batch sees the same global batches: Accelerate hands process p the per-process batches
    p, p+W, ... (its BatchSamplerShard), so the W processes of micro-step k hold, between them,
    the contiguous positions [k G, (k+1) G) of this one stream (G = global batch / accumulation
    steps), whatever W is.

    ``repeats`` N > 1 (repeated augmentation, Hoffer et al. 2020; DeiT's RASampler): each global
    batch of B samples (``multiple``) holds ceil(B / N) images of the permutation, N views each,
    laid out view-major: view 0 of those images, then view 1 of the same images in the same order,
    and so on. Two views of one image are B / N positions apart, so a process's contiguous share
    of B / (W x accumulation steps) samples holds at most one of them whenever W x accumulation
    steps >= N: the views are spread across processes (and micro-steps), as DeiT's sampler
    spreads them by dealing the repeated indices round-robin, and mixup/cutmix, which pairs
    within a process's batch, cannot mix an image with another view of itself. With fewer
    shares than N (one process, or 2 with N=3), a share holds ceil(N / shares) views at most,
    as in DeiT. When B is not a multiple of N the view-major block is cut at B samples: the last
    views of the batch's last images are left out (those images get fewer than N views that
    epoch). An epoch has about as many samples as images (DeiT's RASampler covers len / N
    distinct images per epoch too). The r-th view of image i is yielded as ``i + r * n``: the
    dataset draws that view's seed from (seed, epoch, i, r); view 0 is ``i`` itself, the view
    without repetition. Without ``multiple`` (evaluation, tests) the N views come in a row.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, multiple: int = 1, repeats: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.multiple, self.repeats = n, seed, shuffle, multiple, repeats
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        samples = self.n // self.repeats * self.repeats
        return samples - samples % self.multiple

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, ORDER_KEY))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.repeats > 1:
            order = self._views(order)
        return iter(order[: len(self)])

    def _views(self, order: list[int]) -> list[int]:
        """The permutation as view-major blocks of one global batch each (see the class)."""
        block = max(self.multiple, self.repeats)
        images = -(-block // self.repeats)  # per block
        keys: list[int] = []
        for b in range(-(-len(self) // block)):
            chosen = order[b * images : (b + 1) * images]
            keys += [i + r * self.n for r in range(self.repeats) for i in chosen][:block]
        return keys


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    train: bool,
    num_workers: int,
    global_multiple: int = 1,
    collate_fn: Any = collate,
    repeats: int = 1,
) -> DataLoader:
    """A plain DataLoader (per-process batch) ready for ``accelerator.prepare``.

    Training workers are re-created each epoch (they must see set_epoch); evaluation's are kept
    (``persistent_workers``: its transform has no epoch), so an evaluation does not fork them again.
    """
    sampler = EpochSampler(len(dataset), seed, shuffle=train, multiple=global_multiple, repeats=repeats)
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
        persistent_workers=not train and num_workers > 0,
    )


def eval_loader(ds: Any, spec: InputSpec, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A deterministic loader over ``ds`` with ``spec``'s eval transform (no augmentation)."""
    return make_loader(AugmentedDataset(ds, eval_transform(spec), 0, train=False), batch_size, 0, False, num_workers)


# ---------------------------------------------------------------------------------------------
# data.store and the pipeline


def tensor_path_problem(aug: AugmentConfig, interpolation: str | None = None) -> str | None:
    """Why the tensor path cannot reproduce this augmentation, or None when it can
    (``interpolation``: the resolved one, the student's own when the recipe sets none)."""
    if aug.auto_augment:
        return f"data.augment.auto_augment={aug.auto_augment}"
    if aug.color_jitter > 0:
        return f"data.augment.color_jitter={aug.color_jitter}"
    if aug.re_prob > 0:
        return f"data.augment.re_prob={aug.re_prob}"
    chosen = aug.interpolation or interpolation
    if chosen is not None and chosen not in FILTERS:
        return f"interpolation {chosen!r} (it resamples with {', '.join(FILTERS)})"
    return None


def resolve_store(cfg: DataConfig, train: Any, interpolation: str | None = None) -> str:
    """data.store for this run: 'tensor' or 'decode' ('auto': tensor when it can do the job)."""
    if cfg.store == "decode" or cfg.shard_access == "stream":  # a stream is decoded as it is read
        return "decode"
    problem = tensor_path_problem(cfg.augment, interpolation)
    if cfg.store == "tensor":
        if problem is not None:
            raise RecipeError(
                f"data.store=tensor augments with crop and flip only and cannot apply {problem}; "
                "set data.store=decode (or auto), or switch that augmentation off"
            )
        return "tensor"
    return "tensor" if problem is None and store_fits(train) else "decode"


class InputPipeline:
    """The train and val loaders of one stage and the only code that knows the data path.

    ``prepare(batch, epoch)`` turns a training batch into ``(images, targets)`` ready for the
    model: the tensor path's on-device crop and flip (uint8 in, the (seed, epoch, index) view
    out), then mixup/cutmix (DeiT: the teacher sees the mixed image), which draws from numpy's
    RNG as re-seeded per micro-step by the engine.
    """

    def __init__(
        self,
        store: str,
        train_loader: Any,
        val_loader: Any,
        augment: BatchAugment | None,
        mixup: Any,
    ) -> None:
        self.store = store  # 'tensor' or 'decode', as resolved
        self.train_loader, self.val_loader = train_loader, val_loader
        self._augment, self._mixup = augment, mixup

    def prepare(self, batch: dict[str, Any], epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch["image"], batch["label"]
        if self._augment is not None:
            images = self._augment(images, batch["index_host"], epoch, batch["repeat_host"])
        if self._mixup is not None:
            images, targets = self._mixup(images, targets)
        return images, targets

    def with_loaders(self, train_loader: Any, val_loader: Any) -> InputPipeline:
        """The same pipeline over other loaders (``accelerator.prepare``'s wrapped ones)."""
        return InputPipeline(self.store, train_loader, val_loader, self._augment, self._mixup)


def build_pipeline(
    data: DataConfig,
    split: SplitData,
    spec: InputSpec,
    seed: int,
    *,
    per_process_batch: int,
    global_batch: int,
    eval_batch: int,
    label_smoothing: float,
) -> InputPipeline:
    """Loaders (per-process batches, before ``accelerator.prepare``), the resolved data path and
    mixup for one stage; ``seed`` is the data stream's (order, views, mixup)."""
    store = resolve_store(data, split.train, spec.interpolation)
    if data.repeated_aug > per_process_batch:
        raise DataError(
            f"data.repeated_aug={data.repeated_aug} is larger than the batch per process "
            f"({per_process_batch}: the global batch / processes / accumulation steps), so no batch "
            "could hold every view of an image; lower data.repeated_aug or raise the batch size"
        )
    train_tf, eval_tf = build_transforms(data.augment, spec)
    augment = None
    if store == "tensor":
        augment = BatchAugment(data.augment, spec.size, spec.mean, spec.std, spec.interpolation, seed)
        stored = StoredImages(decode_all(split.train), split.train["label"])
        train = make_loader(stored, per_process_batch, seed, True, 0, global_batch, collate_stored, data.repeated_aug)
    elif data.shard_access == "stream":
        train = stream_loader(data, split.train, train_tf, seed, per_process_batch, global_batch)
    else:
        train = make_loader(
            AugmentedDataset(split.train, train_tf, seed, train=True),
            per_process_batch,
            seed,
            train=True,
            num_workers=data.num_workers,
            global_multiple=global_batch,
            repeats=data.repeated_aug,
        )
    val = make_loader(
        AugmentedDataset(split.val, eval_tf, seed, train=False),
        eval_batch,
        seed,
        train=False,
        num_workers=data.num_workers,
    )
    mixup = build_mixup(data.augment, label_smoothing, split.num_classes, per_process_batch)
    return InputPipeline(store, train, val, augment, mixup)
