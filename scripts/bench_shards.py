"""Shards against an image folder: shard-writing img/s, and loader img/s with 1 and 2 workers.

    python scripts/bench_shards.py [--cifar DIR] [--imagenet-like N [--classes C]] [--repeats 3] [--work DIR]

Two data sets:

- ``--cifar DIR``: a local CIFAR-10 image folder (``DIR/train/<class>/*.jpg``, ``DIR/test/...``);
  its first ``--cifar-per-class`` train and a fifth as many test images per class are copied
  into the work folder first. Loader figures through cifar10_gpu.yaml's augmentation at 32 px.
- ``--imagenet-like N``: N generated JPEGs of 224-500 px in ``--classes`` classes (default 100;
  1000 for ImageNet's shape; smooth random content, quality 90), written once into the work
  folder. Loader figures through the DeiT recipes'
  augmentation (imagenet_deit_small.yaml: RandAugment m9-mstd0.5, random erasing 0.25) at 224 px.

For each: the shard writer's img/s (``distill.shard``'s code; file reads from the page cache,
then sha256), and ``--limit`` images of the training loader (batch 64) over the image folder,
over its shards read at random (``AugmentedDataset`` + ``make_loader``) and over its shards
streamed (``data.shard_access=stream``: the first shards front to back, buffer 1,000; from the
folder, through fsspec as ``file://`` and through ``pipe:cat``, as from object storage), with 1
and 2 workers, as img/s and img/s per worker (a worker is one core's worth of work); one view
per image (data.repeated_aug=1) on every path. Each figure is the median of ``--repeats``.
The machine, its CPU flags and its load average are printed with the figures: on a shared,
busy machine the figures are lower bounds and the ratios between paths mean more than the
absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"CPU: {model}; flags {' '.join(shown) or 'none of avx2/avx512'}; {os.cpu_count()} cores visible; "
        f"load average {load[0]:.2f} (1 min), shared machine"
    )


def copy_cifar(src: Path, dst: Path, per_class: int) -> Path:
    if dst.is_dir():
        return dst
    for split, n in (("train", per_class), ("test", max(1, per_class // 5))):
        for klass in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            (dst / split / klass).mkdir(parents=True)
            for f in sorted((src / split / klass).iterdir())[:n]:
                shutil.copyfile(f, dst / split / klass / f.name)
    return dst


def generate_imagenet_like(dst: Path, n: int, classes: int) -> Path:
    """``dst/{train,val}/cNNN/*.jpg``: n train and n / 10 val images, 224-500 px a side."""
    import numpy as np
    from PIL import Image

    if dst.is_dir():
        return dst
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(classes, n // 10))):  # every class in val
        for i in range(count):
            folder = dst / split / f"c{i % classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = (int(v) for v in rng.integers(224, 501, size=2))
            coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            noise = rng.normal(0, 12, size=(h, w, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return dst


def median_of(repeats: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(repeats))


def shard_rate(recipe_path: Path, folder: Path, out: Path) -> tuple[float, int, int]:
    """(img/s, images, bytes) of writing ``folder`` as shards."""
    from distill.data.shard_writer import ShardOptions, write_shards
    from distill.recipe.schema import load_recipe

    cfg = load_recipe(recipe_path, ["data.source=imagefolder", f"data.path={folder}"]).data
    start = time.perf_counter()
    manifest = write_shards(cfg, ShardOptions(out, 1000, overwrite=True), lambda event: None)
    elapsed = time.perf_counter() - start
    images = sum(s.count for s in manifest.splits.values())
    size = sum(r.bytes or 0 for s in manifest.splits.values() for r in s.shards)
    return images / elapsed, images, size


def loader_rate(recipe_path: Path, overrides: list[str], workers: int, limit: int) -> float:
    """img/s of ``limit`` images of the decode path's training loader (worker start-up included):
    a stratified subset of ``limit`` images at random, or a stream's first ``limit`` images; with
    ``limit`` 0, a whole epoch of the training split."""
    from distill.data.pipeline import AugmentedDataset, build_transforms, make_loader
    from distill.data.sources import load_source
    from distill.data.stream import stream_loader
    from distill.models.spec import InputSpec
    from distill.recipe.schema import load_recipe

    streamed = "data.shard_access=stream" in overrides
    subset = [] if streamed or not limit else [f"data.max_train_samples={limit}"]
    recipe = load_recipe(recipe_path, [*overrides, *subset, f"data.num_workers={workers}", "data.repeated_aug=1"])
    split = load_source(recipe.data)
    size = recipe.student.img_size or 224
    aug = recipe.data.augment
    spec = InputSpec((size, size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), aug.crop_pct, "bicubic")
    transform = build_transforms(aug, spec)[0]
    if streamed:
        loader: Any = stream_loader(recipe.data, split.train, transform, 0, 64, 64)
    else:
        ds = AugmentedDataset(split.train, transform, seed=0, train=True)
        loader = make_loader(ds, batch_size=64, seed=0, train=True, num_workers=workers, global_multiple=64)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch["label"])
        if limit and seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def bench(name: str, recipe: str, folder: Path, work: Path, args: argparse.Namespace) -> None:
    recipe_path = REPO / "recipes" / recipe
    shards = work / f"{name}-shards"
    rate = [0.0]

    def write() -> float:
        rate[0], images, size = shard_rate(recipe_path, folder, shards)
        print(f"  shard write: {rate[0]:,.0f} img/s ({images:,} images, {size / 2**20:,.1f} MiB)", flush=True)
        return rate[0]

    print(f"{name}: {folder} through recipes/{recipe}", flush=True)
    write_median = median_of(args.repeats, write)
    print(f"{name} shard writing: median {write_median:,.0f} img/s (1 process, 8 read threads)", flush=True)
    sources = {
        "image folder": ["data.source=imagefolder", f"data.path={folder}"],
        "shards": ["data.source=shards", f"data.path={shards}"],
        "stream": ["data.source=shards", f"data.path={shards}", "data.shard_access=stream"],
        # The same stream read through fsspec and through a command, as from an object store.
        "stream file://": ["data.source=shards", f"data.path=file://{shards}", "data.shard_access=stream"],
        "stream pipe:": ["data.source=shards", f"data.path=pipe:cat {shards}/{{}}", "data.shard_access=stream"],
    }
    for workers in (1, 2):
        for label, overrides in sources.items():
            got = median_of(args.repeats, lambda o=overrides, w=workers: loader_rate(recipe_path, o, w, args.limit))
            print(
                f"{name} loader, {label:14s}, {workers} worker(s): {got:,.0f} img/s ({got / workers:,.0f} img/s per "
                "worker)",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cifar", type=Path, help="a CIFAR-10 image folder (train/, test/)")
    parser.add_argument("--cifar-per-class", type=int, default=400, help="train images per class copied")
    parser.add_argument("--imagenet-like", type=int, default=0, help="generated 224-500 px JPEGs (0: skip)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the generated JPEGs")
    parser.add_argument("--limit", type=int, default=1000, help="images per loader epoch (0: a whole epoch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distill-bench-shards")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DISTILL_CACHE", str(args.work / "cache"))  # validation shards fetched from URLs
    print(cpu_line(), flush=True)
    if args.cifar:
        folder = copy_cifar(args.cifar, args.work / f"cifar10-{args.cifar_per_class}", args.cifar_per_class)
        bench("cifar10", "cifar10_gpu.yaml", folder, args.work, args)
    if args.imagenet_like:
        folder = args.work / f"imagenet-like-{args.imagenet_like}-{args.classes}"
        folder = generate_imagenet_like(folder, args.imagenet_like, args.classes)
        bench("imagenet-like", "imagenet_deit_small.yaml", folder, args.work, args)
    print(cpu_line(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
