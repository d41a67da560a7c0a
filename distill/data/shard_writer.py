"""Write a recipe's data source as shards (the format: distill/data/shards.py).

The source's own train split and its validation split (data.val_split, else the first of
'validation', 'val', 'test' it has) are written as they are: the same images in the same order
with the same class names, so ``data.source=shards`` then resolves the held-out split, the
subsets and the bad-image policy exactly as the source would. Encoded images keep their original
bytes (no re-encoding); a source that holds decoded pixels (digits, synthetic) is stored by
datasets as PNG, which is lossless. Undecodable images are copied too: the reader applies
data.on_bad_image to them, as for an image folder.

Shard k of a split holds its images k * shard_size ... (k + 1) * shard_size - 1 in the source's
order or, with ``shuffle``, in an order drawn from that seed (recorded in the manifest's source).
An image folder lists class after class and data.shard_access=stream mixes only the few shards it
reads at a time, so stream mode wants shuffled shards; random access does not care. Each shard is
written to a temporary file, hashed, renamed, and recorded in the manifest, which is rewritten
after every shard: a killed writer resumes where it stopped and keeps every shard whose sha256
still matches its record.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.shards import (
    MANIFEST,
    SHARD_SUFFIX,
    Manifest,
    ShardRecord,
    SplitRecord,
    file_sha256,
    member,
    parse_manifest,
    shard_features,
    shard_name,
    write_manifest,
)
from distill.data.sources import VAL_SPLIT_NAMES, _standard_columns, source_splits
from distill.errors import DataError
from distill.recipe.schema import DataConfig

BATCH_ROWS = 256  # rows per Arrow record batch: a few MB of ImageNet JPEGs


@dataclass(frozen=True)
class ShardOptions:
    out: Path
    shard_size: int = 5000  # images per shard: ~550 MB of ImageNet JPEGs, 257 train shards
    overwrite: bool = False
    threads: int = 8  # parallel file reads: a network filesystem serves several at once
    # Write each split in an order drawn from this seed instead of the source's (an image folder's
    # is class by class): what data.shard_access=stream needs, since it mixes within a shard only.
    shuffle: int | None = None


@dataclass(frozen=True)
class ShardEvent:
    """One shard finished: ``kept`` when a resumed writer found it already written and intact."""

    split: str
    record: ShardRecord
    kept: bool
    images_done: int
    images_total: int
    elapsed_s: float


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """The data settings that decide a source's own splits (recorded in the manifest)."""
    identity: dict[str, Any] = {"source": cfg.source, "train_split": cfg.train_split, "val_split": cfg.val_split}
    if cfg.source == "imagefolder":
        identity["path"] = str(Path(str(cfg.path)).expanduser().resolve())
    elif cfg.source in ("hub", "shards"):
        identity.update(path=cfg.path, hub_config=cfg.hub_config)
    elif cfg.source == "synthetic":
        identity.update(split_seed=cfg.split_seed, synthetic=cfg.synthetic.model_dump(mode="json"))
    return identity


def chosen_splits(cfg: DataConfig) -> dict[str, Any]:
    """{name: dataset with image and label columns}: the train split, then the validation split."""
    splits = source_splits(cfg)
    if cfg.train_split not in splits:
        raise DataError(
            f"data.train_split '{cfg.train_split}' not found in {cfg.source} source (splits: {', '.join(splits)})"
        )
    val_names = (cfg.val_split,) if cfg.val_split else VAL_SPLIT_NAMES
    val = next((n for n in val_names if n in splits), None)
    if cfg.val_split and val is None:
        raise DataError(f"data.val_split '{cfg.val_split}' not found (splits: {', '.join(splits)})")
    names = [cfg.train_split] + ([val] if val else [])
    return {n: _standard_columns(splits[n], f"{cfg.source} split '{n}'") for n in names}


def shuffled(splits: dict[str, Any], seed: int | None) -> dict[str, np.ndarray | None]:
    """Per split, the source position of each row written (None: the source's own order)."""
    if seed is None:
        return dict.fromkeys(splits)
    return {n: np.random.default_rng([seed, k]).permutation(len(ds)) for k, (n, ds) in enumerate(splits.items())}


def plan(cfg: DataConfig, splits: dict[str, Any], shard_size: int) -> Manifest:
    class_names = list(splits[cfg.train_split].features["label"].names)
    records = {}
    for name, ds in splits.items():
        if list(ds.features["label"].names) != class_names:
            raise DataError(f"split '{name}' names other classes than split '{cfg.train_split}'")
        labels = np.asarray(ds["label"], dtype=np.int64)
        shards = [
            ShardRecord(shard_name(name, k), min(shard_size, len(ds) - start))
            for k, start in enumerate(range(0, len(ds), shard_size))
        ]
        records[name] = SplitRecord(len(ds), np.bincount(labels, minlength=len(class_names)).tolist(), shards)
    return Manifest(source_identity(cfg), class_names, shard_size, records, extra={"writer": "distill.shard"})


def _ours(path: Path) -> bool:
    name = path.name
    return path.is_file() and (name.startswith(MANIFEST) or name.endswith((SHARD_SUFFIX, f"{SHARD_SUFFIX}.tmp")))


def prepare_out(out: Path, planned: Manifest, overwrite: bool) -> Manifest:
    """The manifest to continue from: ``planned`` itself, or the one found in ``out`` when it
    was written from the same source with the same shard size (a resume)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(out.iterdir())
    if not entries:
        return planned
    if overwrite:
        foreign = [p for p in entries if not _ours(p)]
        if foreign:
            raise DataError(
                f"--out {out} holds {foreign[0].name}, which is not a shard file; --overwrite replaces a shard "
                "set only: choose an empty or new folder"
            )
        for p in entries:
            p.unlink()
        return planned
    found = out / MANIFEST
    if not found.is_file():
        raise DataError(f"--out {out} is not empty and holds no {MANIFEST}; choose an empty folder or pass --overwrite")
    existing = parse_manifest(found.read_text(), str(found))
    if existing.plan() != planned.plan():
        raise DataError(
            f"--out {out} holds shards of other data or another shard size (see {found}); pass --overwrite "
            "to replace them, or choose another folder"
        )
    return existing


def _cell_bytes(cell: dict[str, Any]) -> bytes:
    if cell.get("bytes"):
        return cell["bytes"]
    try:
        return Path(cell["path"]).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read image {cell['path']}: {exc.strerror}") from None


def _key(cell: dict[str, Any], index: int, split: str, split_root: Path | None) -> str:
    """The image's stable name: its path under the split folder, else split and position."""
    path = cell.get("path")
    if path and not cell.get("bytes") and split_root is not None:
        relative = os.path.relpath(path, split_root)  # string arithmetic: no stat per file
        if not relative.startswith(".."):
            return Path(relative).as_posix()
    return f"{split}/{index:08d}"


def _batches(raw: Any, start: int, stop: int) -> Iterator[tuple[int, Any]]:
    for lo in range(start, stop, BATCH_ROWS):
        yield lo, raw[lo : min(stop, lo + BATCH_ROWS)]


def write_shard(raw: Any, rows: tuple[int, int], split: str, path: Path, ctx: _Context) -> ShardRecord:
    """Rows ``rows`` of ``raw`` (an undecoded split) as one shard at ``path``; its record."""
    import pyarrow as pa

    schema = ctx.features.arrow_schema
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for lo, batch in _batches(raw, *rows):
            cells = batch["image"]
            data = list(ctx.pool.map(_cell_bytes, cells))
            keys = [_key(c, ctx.source_index(split, lo + j), split, ctx.split_root(split)) for j, c in enumerate(cells)]
            table = pa.table(
                {
                    "image": [{"bytes": b, "path": member(path.name, k)} for b, k in zip(data, keys, strict=True)],
                    "label": batch["label"],
                    "key": keys,
                },
                schema=schema,
            )
            writer.write_table(table)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    record = ShardRecord(path.name, rows[1] - rows[0], tmp.stat().st_size, file_sha256(tmp))
    os.replace(tmp, path)
    return record


@dataclass
class _Context:
    cfg: DataConfig
    features: Any
    pool: ThreadPoolExecutor
    orders: dict[str, np.ndarray | None]

    def source_index(self, split: str, row: int) -> int:
        order = self.orders[split]
        return row if order is None else int(order[row])

    def split_root(self, split: str) -> Path | None:
        if self.cfg.source != "imagefolder":
            return None
        return Path(str(self.cfg.path)).expanduser() / split  # as the source listed it


def _intact(path: Path, record: ShardRecord) -> bool:
    return (
        record.sha256 is not None
        and path.is_file()
        and path.stat().st_size == record.bytes
        and file_sha256(path) == record.sha256
    )


def write_shards(cfg: DataConfig, options: ShardOptions, report: Callable[[ShardEvent], None]) -> Manifest:
    """Write (or finish) the shard set of ``cfg``'s source in ``options.out``; its manifest."""
    import datasets

    if options.shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {options.shard_size}")
    splits = chosen_splits(cfg)
    orders = shuffled(splits, options.shuffle)
    splits = {n: ds if orders[n] is None else ds.select(orders[n]) for n, ds in splits.items()}
    planned = plan(cfg, splits, options.shard_size)
    if options.shuffle is not None:
        planned.source["shuffle"] = options.shuffle  # part of the plan: a resume keeps the same order
    manifest = prepare_out(options.out, planned, options.overwrite)
    manifest.complete = False
    write_manifest(options.out, manifest)
    total = sum(s.count for s in manifest.splits.values())
    done, start = 0, time.perf_counter()
    features = shard_features(manifest.class_names)
    with ThreadPoolExecutor(max(1, options.threads)) as pool:
        ctx = _Context(cfg, features, pool, orders)
        for name, split in manifest.splits.items():
            raw = splits[name].cast_column("image", datasets.Image(decode=False))
            for k, record in enumerate(split.shards):
                path = options.out / record.file
                kept = _intact(path, record)
                if not kept:
                    rows = (k * manifest.shard_size, k * manifest.shard_size + record.count)
                    split.shards[k] = record = write_shard(raw, rows, name, path, ctx)
                    write_manifest(options.out, manifest)
                done += record.count
                report(ShardEvent(name, record, kept, done, total, time.perf_counter() - start))
    manifest.complete = True
    write_manifest(options.out, manifest)
    return manifest
