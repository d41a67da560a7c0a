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

Loading checks every shard's presence, size and row count, and the labels per class (cheap: the
size from a stat, the rows from the Arrow headers, the labels from one int64 column);
``data.verify_shards`` also hashes every byte (sha256). ``python -m distill.shard`` hashes each
shard as it writes it and again before it keeps one on a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DataError

FORMAT = "distill-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".arrow"
REWRITE = "write it again with `python -m distill.shard RECIPE --out {root}` (it keeps the shards that verify)"


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


def parse_manifest(text: str, where: Path) -> Manifest:
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


def shard_root(path: object) -> Path:
    """``data.path`` of a shard set as a folder; a URL is refused with what to do instead."""
    text = str(path)
    if "://" in text or text.startswith("pipe:"):
        raise DataError(
            f"data.path={text} is a URL: shards are read from a local or mounted folder. Mount the "
            "bucket (mountpoint-s3, gcsfuse, s3fs, blobfuse2) and give its path; data.shard_access=stream "
            "reads each shard front to back, which such mounts serve well"
        )
    return Path(text).expanduser()


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(
            f"data.path '{root}' is not a directory; data.source=shards needs the folder written by "
            "`python -m distill.shard RECIPE --out DIR`"
        )
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST} in {root}: write shards there with `python -m distill.shard RECIPE --out {root}`"
        )
    return parse_manifest(path.read_text(), path)


# ---------------------------------------------------------------------------------------------
# Reading


def open_shard(root: Path, record: ShardRecord, class_names: list[str], verify: bool) -> Any:
    """One shard as a memory-mapped dataset, after the checks its manifest record allows."""
    import datasets

    path = root / record.file
    if not path.is_file():
        raise DataError(f"shard {path} is missing (listed in {root / MANIFEST}); " + REWRITE.format(root=root))
    size = path.stat().st_size
    if size != record.bytes:
        raise DataError(
            f"shard {path} holds {size} bytes, its manifest says {record.bytes}: it is truncated or was "
            "replaced; " + REWRITE.format(root=root)
        )
    if verify and (digest := file_sha256(path)) != record.sha256:
        raise DataError(
            f"shard {path} has sha256 {digest[:16]}..., its manifest says {str(record.sha256)[:16]}...: it is "
            "corrupt; " + REWRITE.format(root=root)
        )
    try:
        ds = datasets.Dataset.from_file(str(path), in_memory=False)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged stream
        raise DataError(
            f"shard {path} cannot be read as Arrow ({type(exc).__name__}: {exc}); " + REWRITE.format(root=root)
        ) from None
    if len(ds) != record.count:
        raise DataError(
            f"shard {path} holds {len(ds)} images, its manifest says {record.count}; " + REWRITE.format(root=root)
        )
    label = ds.features.get("label")
    if list(getattr(label, "names", [])) != class_names:
        raise DataError(f"shard {path} names other classes than its manifest; " + REWRITE.format(root=root))
    return ds


def load_shards(root: str | Path, verify: bool = False) -> dict[str, Any]:
    """{split: dataset} of a complete shard set, every shard checked against the manifest."""
    import datasets

    root = shard_root(root)

    manifest = read_manifest(root)
    if not manifest.complete:
        raise DataError(
            f"the shards in {root} are incomplete ({manifest.shards_done()} of {manifest.shards_total()} written); "
            f"finish them with the same `python -m distill.shard RECIPE --out {root}` (it resumes)"
        )
    splits = {}
    for name, split in manifest.splits.items():
        parts = [open_shard(root, record, manifest.class_names, verify) for record in split.shards]
        if not parts:  # an empty split of the source (a hub dataset's): empty here too
            ds = datasets.Dataset.from_dict({"image": [], "label": [], "key": []}, shard_features(manifest.class_names))
        else:
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=len(manifest.class_names))
        if len(ds) != split.count or counts.tolist() != split.class_counts:
            raise DataError(
                f"split '{name}' of {root} holds {len(ds)} images ({counts.tolist()} per class), its manifest "
                f"says {split.count} ({split.class_counts}); " + REWRITE.format(root=root)
            )
        splits[name] = ds
    return splits
