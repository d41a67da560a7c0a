"""The tensor data path for small images (``data.store``): decode once, augment whole batches.

For CIFAR-sized images the per-sample PIL pipeline (decode, RandomResizedCrop, flip, to-tensor,
normalise: tens of microseconds per image, in the training process or its workers) competes with
the model for the same 2 CPU cores, and on a GPU it starves the device. Here every training image
is decoded once into one uint8 tensor; a batch is gathered by index and augmented as a tensor on
the training device: a random resized crop and horizontal flip as one batched affine resample
(``grid_sample``), then normalisation.

The data contract holds: the crop and flip of image i in epoch e are a function of (data seed,
e, i) alone, drawn from a counter-based hash (SplitMix64) of that triple, so they do not depend
on batch composition, workers or processes, and a resumed run replays them exactly. The views
are not the PIL path's views (bilinear resampling, timm's crop rejection loop replaced by
clamping), so ``data.store`` is part of the recipe a result depends on. Evaluation always uses
the PIL path, so logged accuracies and export re-validation agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from distill.config import AugmentConfig
from distill.errors import DataError

# Beyond this the batched resample stops paying for itself against decoding (and the store's
# memory grows: 50,000 CIFAR images are 150 MB; 1.28 M ImageNet ones at 224 px would be 190 GB).
MAX_STORE_SIDE = 64


def tensor_path_problem(aug: AugmentConfig) -> str | None:
    """Why the tensor path cannot reproduce this augmentation, or None when it can."""
    if aug.auto_augment:
        return f"data.augment.auto_augment={aug.auto_augment}"
    if aug.color_jitter > 0:
        return f"data.augment.color_jitter={aug.color_jitter}"
    if aug.re_prob > 0:
        return f"data.augment.re_prob={aug.re_prob}"
    return None


_DECODED: dict[str, torch.Tensor] = {}


def decode_all(ds: Any) -> torch.Tensor:
    """Every image of an HF dataset as one ``[N, 3, H, W]`` uint8 tensor (all must share a size).

    Kept for the next run of a study in this process (keyed by the dataset's fingerprint, which
    changes with any selection or transform): CIFAR-sized subsets take seconds to decode."""
    key = getattr(ds, "_fingerprint", None)
    if key is not None and key in _DECODED:
        return _DECODED[key]
    out = _decode_all(ds)
    if key is not None:
        _DECODED.clear()
        _DECODED[key] = out
    return out


def _decode_all(ds: Any) -> torch.Tensor:
    import datasets

    from distill.data import decode_rgb, describe

    raw = ds.cast_column("image", datasets.Image(decode=False))["image"]
    first = None
    out: torch.Tensor | None = None
    for i, cell in enumerate(raw):
        image = decode_rgb(cell, i)
        if out is None:
            first = image.size
            out = torch.empty((len(raw), 3, image.size[1], image.size[0]), dtype=torch.uint8)
        elif image.size != first:
            raise DataError(
                f"data.store=tensor needs images of one size: {describe(cell, i)} is {image.size[0]}x"
                f"{image.size[1]}, the first was {first[0]}x{first[1]}; use data.store=decode"
            )
        out[i] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert out is not None
    return out


def store_fits(ds: Any) -> bool:
    """'auto': the first image is small enough for the store (sizes are checked while decoding)."""
    import datasets

    from distill.data import open_image

    cell = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    w, h = open_image(cell).size
    return max(w, h) <= MAX_STORE_SIDE


class StoredImages(Dataset):
    """Decoded uint8 images by index: ``(image_uint8, label, index)`` like AugmentedDataset."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images, self.labels = images, torch.as_tensor(list(labels), dtype=torch.long)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the view is drawn on the device (BatchAugment), keyed by epoch there

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        # index_host stays a numpy array: Accelerate moves tensors to the device but leaves it on
        # the host, where the crop parameters are drawn without a device-to-host sync per step.
        return {"image": self.images[idx], "label": self.labels[idx], "index": idx, "index_host": idx.numpy()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])


def collate_stored(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # __getitems__ already built the batch (one gather, no per-sample Python)


_MASK = (1 << 64) - 1


def uniforms(seed: int, epoch: int, index: np.ndarray, count: int) -> np.ndarray:
    """``[len(index), count]`` floats in [0, 1): SplitMix64 of (seed, epoch, index, draw)."""
    with np.errstate(over="ignore"):
        base = (np.uint64(seed & _MASK) * np.uint64(0x9E3779B97F4A7C15)) ^ (
            np.uint64(epoch & _MASK) * np.uint64(0xC2B2AE3D27D4EB4F)
        )
        x = base + index.astype(np.uint64)[:, None] * np.uint64(0xD6E8FEB86659FD93)
        x = x + np.arange(1, count + 1, dtype=np.uint64)[None, :] * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class BatchAugment:
    """Random resized crop + horizontal flip + normalisation of a uint8 batch, on its device."""

    def __init__(self, aug: AugmentConfig, data_config: dict[str, Any], seed: int) -> None:
        self.scale, self.log_ratio = aug.scale, (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
        self.hflip, self.seed = aug.hflip, seed
        self.size = tuple(data_config["input_size"][-2:])
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)

    def params(self, epoch: int, index: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[B, 2, 3]`` affine matrices (output -> input, normalised coordinates)."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        u = torch.from_numpy(uniforms(self.seed, epoch, np.asarray(index), 5))
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        ratio = torch.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * u[:, 1])
        # Crop size as a fraction of each side (timm draws until it fits; clamping keeps the
        # draw count fixed, which keeps views independent of one another).
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, 2] * (1 - w) + w / 2) * 2 - 1
        cy = (u[:, 3] * (1 - h) + h / 2) * 2 - 1
        flip = torch.where(u[:, 4] < self.hflip, -1.0, 1.0)
        theta = torch.zeros(len(index), 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        return theta.float()

    def __call__(self, images: torch.Tensor, index: np.ndarray | torch.Tensor, epoch: int) -> torch.Tensor:
        x = images.float().div_(255)
        theta = self.params(epoch, index).to(x.device, non_blocking=True)
        grid = F.affine_grid(theta, [x.shape[0], 3, *self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
