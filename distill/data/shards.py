"""Shards: a source written once as Arrow files that any number of processes and nodes read.

A shard set is a folder (format version 1):

- ``manifest.json``: the format and version, the source it was written from, the class names,
  and per split its image count, its count per class and its shards (file, images, bytes,
  sha256); ``complete`` is false until the last shard is written (``python -m distill.shard``
  rewrites it after every shard, so an interrupted run resumes).
- ``<split>-<k:05d>.arrow``: Arrow IPC stream files in the schema of datasets' own cache files:
  ``image`` (an Image cell: the original encoded bytes, and as its ``path`` the shard and member,
  ``train-00003.arrow:n01440764/n01440764_10026.JPEG``, so a decode error names both), ``label``
  (a ClassLabel with the class names) and ``key`` (the image's stable name in its source).

Why Arrow: ``datasets.Dataset.from_file`` memory-maps such a file, so a split of any size opens
in milliseconds, rows are read at random (the sampler's permutation, repeated augmentation,
exact resume) and the pages are shared by every loader worker and process of a node through the
page cache. The split it returns has the columns an image folder's has, so everything after
``load_source`` (both data stores, the teacher-output cache, the bad-image policy) is unchanged.
pyarrow ships with datasets: no new dependency.

From a URL or a ``pipe:`` command (shard_files.py), only ``data.shard_access=stream`` reads a
shard set: each split is a ``StreamSplit`` (its manifest records, no rows opened at load); the
training split is read front to back every epoch, each shard checked as it is read (rows,
size, sha256), and the validation split is fetched once into a local cache and memory-mapped.

Loading checks every shard's presence, size and row count, and the labels per class (cheap: the
size from a stat, the rows from the Arrow headers, the labels from one int64 column);
``data.verify_shards`` also hashes every byte (sha256). ``python -m distill.shard`` hashes each
shard as it writes it and again before it keeps one on a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.shard_files import MANIFEST, HashingReader, ShardFiles, fetch, is_url, shard_files
from distill.errors import DataError

FORMAT = "distill-shards"
VERSION = 1
SHARD_SUFFIX = ".arrow"
REWRITE = "write it again with `python -m distill.shard RECIPE --out {root}` (it keeps the shards that verify)"
REWRITE_URL = "write the shard set again with `python -m distill.shard` (it keeps intact shards) and copy it there"


def rewrite(where: str) -> str:
    """What to do about a damaged shard set at ``where``."""
    return REWRITE_URL if is_url(where) else REWRITE.format(root=where)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def member(shard_file: str, key: str) -> str:
    """An image cell's ``path`` inside a shard: what a decode error or a skipped-image list shows."""
    return f"{shard_file}:{key}"


def shard_features(class_names: list[str]) -> Any:
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "key": datasets.Value("string"),
        }
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ShardRecord:
    file: str
    count: int  # images
    bytes: int | None = None  # None until written
    sha256: str | None = None


@dataclass
class SplitRecord:
    count: int
    class_counts: list[int]
    shards: list[ShardRecord]


@dataclass
class Manifest:
    source: dict[str, Any]  # the data settings the shards were written from
    class_names: list[str]
    shard_size: int
    splits: dict[str, SplitRecord]
    complete: bool = False
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (the writing tool)

    def plan(self) -> dict[str, Any]:
        """What must match for a resumed writer to keep the shards already written."""
        splits = {n: {"count": s.count, "class_counts": s.class_counts} for n, s in self.splits.items()}
        return {"source": self.source, "class_names": self.class_names, "shard_size": self.shard_size, "splits": splits}

    def shards_done(self) -> int:
        return sum(r.sha256 is not None for s in self.splits.values() for r in s.shards)

    def shards_total(self) -> int:
        return sum(len(s.shards) for s in self.splits.values())


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(asdict(manifest), indent=1) + "\n"


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Atomically: a reader sees the previous manifest or this one, never half of one."""
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(manifest_json(manifest))
    os.replace(tmp, root / MANIFEST)


def parse_manifest(text: str, where: str) -> Manifest:
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise DataError(f"{where} is not a distill shard manifest (format {raw.get('format')!r})")
        if raw.get("version") != VERSION:
            raise DataError(
                f"{where} is shard format version {raw.get('version')}; this distill reads version {VERSION}. "
                "Write the shards again with this version's `python -m distill.shard`"
            )
        splits = {
            name: SplitRecord(s["count"], list(s["class_counts"]), [ShardRecord(**r) for r in s["shards"]])
            for name, s in raw["splits"].items()
        }
        return Manifest(
            source=raw["source"],
            class_names=list(raw["class_names"]),
            shard_size=int(raw["shard_size"]),
            splits=splits,
            complete=bool(raw["complete"]),
            extra=raw.get("extra", {}),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{where} cannot be read as a shard manifest ({type(exc).__name__}: {exc})") from None


def read_manifest(files: ShardFiles) -> Manifest:
    if files.local is not None:
        if not files.local.is_dir():
            raise DataError(
                f"data.path '{files.local}' is not a directory; data.source=shards needs the folder written by "
                "`python -m distill.shard RECIPE --out DIR`"
            )
        if not (files.local / MANIFEST).is_file():
            raise DataError(
                f"no {MANIFEST} in {files.local}: write shards there with "
                f"`python -m distill.shard RECIPE --out {files.local}`"
            )
    return parse_manifest(files.read_bytes(MANIFEST).decode(), files.where(MANIFEST))


# ---------------------------------------------------------------------------------------------
# Reading


def open_shard(path: Path, record: ShardRecord, class_names: list[str], verify: bool, where: str) -> Any:
    """One shard as a memory-mapped dataset, after the checks its manifest record allows
    (``path``: the file on this machine; ``where``: the shard set, as messages name it)."""
    import datasets

    again = rewrite(where)
    if not path.is_file():
        raise DataError(f"shard {path} is missing (listed in {where}/{MANIFEST}); " + again)
    size = path.stat().st_size
    if size != record.bytes:
        raise DataError(
            f"shard {path} holds {size} bytes, its manifest says {record.bytes}: it is truncated or was "
            "replaced; " + again
        )
    if verify and (digest := file_sha256(path)) != record.sha256:
        raise DataError(
            f"shard {path} has sha256 {digest[:16]}..., its manifest says {str(record.sha256)[:16]}...: it is "
            "corrupt; " + again
        )
    try:
        ds = datasets.Dataset.from_file(str(path), in_memory=False)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged stream
        raise DataError(f"shard {path} cannot be read as Arrow ({type(exc).__name__}: {exc}); " + again) from None
    if len(ds) != record.count:
        raise DataError(f"shard {path} holds {len(ds)} images, its manifest says {record.count}; " + again)
    label = ds.features.get("label")
    if list(getattr(label, "names", [])) != class_names:
        raise DataError(f"shard {path} names other classes than its manifest; " + again)
    return ds


def split_dataset(name: str, split: SplitRecord, parts: list[Any], class_names: list[str], where: str) -> Any:
    """The shards of one split as one dataset, its count and labels per class checked."""
    import datasets

    if not parts:  # an empty split of the source (a hub dataset's): empty here too
        ds = datasets.Dataset.from_dict({"image": [], "label": [], "key": []}, shard_features(class_names))
    else:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(class_names))
    if len(ds) != split.count or counts.tolist() != split.class_counts:
        raise DataError(
            f"split '{name}' of {where} holds {len(ds)} images ({counts.tolist()} per class), its manifest "
            f"says {split.count} ({split.class_counts}); " + rewrite(where)
        )
    return ds


@dataclass(frozen=True)
class StreamSplit:
    """A split of a shard set read from a URL or a ``pipe:`` command: stream mode reads it front
    to back, shard by shard (``data.shard_access=stream``); nothing reads its images at random."""

    files: ShardFiles
    name: str
    record: SplitRecord
    class_names: list[str]

    def __len__(self) -> int:
        return self.record.count

    @property
    def features(self) -> dict[str, Any]:
        import datasets

        return {"label": datasets.ClassLabel(names=self.class_names)}

    def __getitem__(self, key: object) -> Any:
        raise self.not_at_random(f"asked for {key!r}")

    def not_at_random(
        self, asked: str, fix: str = "give a local or mounted copy of the shard set as data.path"
    ) -> DataError:
        """The error for what would read this split's images at random (``asked``: what did)."""
        return DataError(
            f"split '{self.name}' of {self.files.root} is read front to back from where it is stored, never "
            f"at random ({asked}); {fix}"
        )

    def cells(self) -> Iterator[dict[str, Any]]:
        """Every image cell of the split in order, each shard read front to back and checked."""
        for record in self.record.shards:
            for _, cell, _ in read_rows(self.files, record):
                yield cell

    def fetched(self, verify: bool) -> Any:
        """The split as a memory-mapped dataset of local copies of its shards (the cache)."""
        where = self.files.root
        parts = [
            open_shard(fetch(self.files, r.file, str(r.sha256), int(r.bytes or 0)), r, self.class_names, verify, where)
            for r in self.record.shards
        ]
        return split_dataset(self.name, self.record, parts, self.class_names, where)


def read_rows(files: ShardFiles, record: ShardRecord) -> Iterator[tuple[int, dict[str, Any], int]]:
    """(row, image cell, label) of one shard, read front to back (Arrow's stream reader); read
    to its end, the shard's rows, size and sha256 are checked against its manifest record."""
    import pyarrow as pa

    where, again = files.where(record.file), rewrite(files.root)
    row = 0
    with files.open(record.file) as fh:
        source = HashingReader(fh, where)
        try:
            with pa.ipc.open_stream(pa.PythonFile(source, mode="r")) as reader:
                for batch in reader:
                    cells, labels = batch.column("image").to_pylist(), batch.column("label").to_pylist()
                    for cell, label in zip(cells, labels, strict=True):
                        yield row, cell, label
                        row += 1
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read shard {where} as an Arrow stream ({exc}); {again}") from None
        source.drain()
    if row != record.count:
        raise DataError(f"shard {where} holds {row} images, its manifest says {record.count}; {again}")
    digest = source.digest.hexdigest()
    if source.size != record.bytes or digest != record.sha256:
        raise DataError(
            f"shard {where} read as {source.size} bytes with sha256 {digest[:16]}..., its manifest says "
            f"{record.bytes} bytes, {str(record.sha256)[:16]}...: it is corrupt or was replaced; {again}"
        )


def load_shards(path: object, verify: bool = False, stream: bool = False) -> dict[str, Any]:
    """{split: dataset} of a complete shard set, every shard checked against the manifest. From
    a URL or a command (``stream`` only): {split: StreamSplit}, the manifest checked alone."""
    files = shard_files(path)
    where = files.root
    if files.local is None and not stream:
        raise DataError(
            f"data.path={where} is read front to back only: set data.shard_access=stream, or mount the "
            "store (mountpoint-s3, gcsfuse, s3fs, blobfuse2) and give its folder for random access"
        )
    manifest = read_manifest(files)
    if not manifest.complete:
        raise DataError(
            f"the shards in {where} are incomplete ({manifest.shards_done()} of {manifest.shards_total()} written); "
            f"finish them with the same `python -m distill.shard RECIPE --out {where}` (it resumes)"
        )
    if files.local is None:
        for name, split in manifest.splits.items():
            if sum(r.count for r in split.shards) != split.count or sum(split.class_counts) != split.count:
                raise DataError(
                    f"split '{name}' of {files.where(MANIFEST)} counts {split.count} images, its shards "
                    f"{sum(r.count for r in split.shards)} and its classes {sum(split.class_counts)}; " + rewrite(where)
                )
        return {name: StreamSplit(files, name, split, manifest.class_names) for name, split in manifest.splits.items()}
    root = files.local
    return {
        name: split_dataset(
            name,
            split,
            [open_shard(root / r.file, r, manifest.class_names, verify, str(root)) for r in split.shards],
            manifest.class_names,
            str(root),
        )
        for name, split in manifest.splits.items()
    }
