"""``data.shard_access=stream``: the training split of a shard set read front to back, shard by
shard, for storage where random reads are slow (an object store behind a FUSE mount, a network
filesystem that serves large sequential reads well and small scattered ones badly).

The stream of one epoch, as a function of (data seed, epoch, processes P, loader workers W, the
batch per process):

- the shard order: a permutation of the split's shards drawn from (seed, epoch); with repeated
  augmentation N > 1, its first ceil(S / N) shards, each image giving N views in a row (an epoch
  then holds about as many samples as images, as DeiT's RASampler's does);
- the shard split: the k-th shard of that order goes to the slot k mod (P x W), slot
  ``rank + P x worker``: every process reads whole shards of its own, each worker its own;
- the in-shard shuffle: a shuffle buffer of ``data.stream_buffer`` images over each shard, seeded
  by (seed, epoch, shard) and emptied at the shard's end, so the images held at any moment are
  at most that many and a shard's order does not depend on P or W;
- a process's stream takes its workers' streams in turn, a chunk of batch / (W x N) images from
  each (a batch holds an equal share of W shards; a chunk is one tensor transfer), and is cut to
  the same number of whole batches on every process.

The view of image i (its index in the split) stays a function of (seed, epoch, i, repeat), as in
random mode. A resume after micro-batch k of an epoch recomputes where each worker stood (shard
and offset: the stream is a function of the values above) and reads on from there: the shards a
worker finished are not read again, the one it was in is read up to that point without decoding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distill.data.shard_files import ShardFiles, shard_files
from distill.data.shards import ShardRecord, StreamSplit, read_manifest, read_rows
from distill.data.sources import collate, decode_rgb, sample_seed, seeded
from distill.errors import DataError
from distill.recipe.schema import DataConfig

SHARD_ORDER_KEY = 2**32 - 2  # the "index" that keys an epoch's shard order (pipeline.ORDER_KEY - 1)
BUFFER_KEY = 2**32 - 3  # keys a shard's in-shard shuffle, with the shard's number as repeat


@dataclass(frozen=True)
class StreamShard:
    """One shard of the training split: where it is, its manifest record and, per row, the
    image's index in the split (-1 for a row the split leaves out: held out for validation,
    outside a subset, undecodable)."""

    files: ShardFiles
    record: ShardRecord
    index: np.ndarray

    @property
    def images(self) -> int:
        return int((self.index >= 0).sum())


def stream_shards(path: object, split_name: str, train: Any) -> list[StreamShard]:
    """The shards of ``split_name`` of the shard set at ``path`` with each row's index in
    ``train``: the resolved split, a row selection of those shards concatenated as
    ``load_shards`` returns them, or a ``StreamSplit`` (every row, in order)."""
    files = shard_files(path)
    if isinstance(train, StreamSplit):
        records = train.record.shards
        chosen = np.arange(len(train))
    else:
        records = read_manifest(files).splits[split_name].shards
        # The split's rows in the concatenated shards: datasets keeps a selection as an indices
        # table (Dataset._indices, None when nothing was selected); it has no public accessor.
        chosen = np.arange(len(train)) if train._indices is None else train._indices.column(0).to_numpy()
    where = np.full(sum(r.count for r in records), -1, dtype=np.int64)
    where[chosen] = np.arange(len(chosen))
    starts = np.cumsum([0] + [r.count for r in records])
    return [StreamShard(files, r, where[starts[k] : starts[k + 1]]) for k, r in enumerate(records)]


def epoch_shards(n: int, seed: int, epoch: int, repeats: int) -> list[int]:
    """The shards epoch ``epoch`` reads, in order."""
    rng = np.random.default_rng(sample_seed(seed, epoch, SHARD_ORDER_KEY))
    return rng.permutation(n)[: math.ceil(n / repeats)].tolist()


def buffer_order(n: int, size: int, seed: int) -> np.ndarray:
    """The order a shuffle buffer of ``size`` emits items 0..n-1 read in order: when full, a
    seeded random item leaves and the next one read takes its place; at the end the rest leave
    in a seeded random order. Item order[t] is among the first size + t read."""
    rng = np.random.default_rng(seed)
    buffer = list(range(min(size, n)))
    out = []
    for incoming in range(len(buffer), n):
        j = int(rng.integers(len(buffer)))
        out.append(buffer[j])
        buffer[j] = incoming
    out += [buffer[j] for j in rng.permutation(len(buffer))]
    return np.asarray(out, dtype=np.int64)


def merged_counts(counts: list[int], taken: int, chunk: int) -> tuple[list[int], int, int]:
    """Where W streams stand when their merge has given ``taken`` items: the merge takes ``chunk``
    items from stream 0, then 1, ..., W-1, 0, ... (fewer from a stream near its end, none from an
    exhausted one). Returns the items each stream has given, the stream in turn, and how many
    items that stream has left to give in its current chunk."""
    if taken > sum(counts):
        raise ValueError(f"the streams hold {sum(counts)} items, fewer than {taken}")
    consumed, turn = [0] * len(counts), 0
    while taken:
        give = min(chunk, counts[turn] - consumed[turn])
        if taken < give:
            consumed[turn] += taken
            return consumed, turn, chunk - taken
        consumed[turn] += give
        taken -= give
        turn = (turn + 1) % len(counts)
    return consumed, turn, chunk


def chunk_sizes(items: int, first: int, chunk: int) -> list[int]:
    """``items`` cut into chunks: ``first`` items (or fewer, when that is all), then ``chunk`` each."""
    sizes = [min(first, items)] if items else []
    left = items - sum(sizes)
    return sizes + [chunk] * (left // chunk) + ([left % chunk] if left % chunk else [])


@dataclass(frozen=True)
class StreamOptions:
    seed: int  # the data seed
    buffer: int  # images per in-shard shuffle buffer
    repeats: int  # repeated augmentation: views per image
    world: int  # processes
    rank: int
    workers: int  # loader workers per process (0 counts as 1: the process reads itself)
    chunk: int = 1  # images a worker hands over at a time (one tensor transfer, not one per image)


class ShardStream(IterableDataset):
    """One process's stream: ``[(image, label, index, repeat), ...]`` per image (its N views),
    each loader worker reading its own shards. ``taken``: the images of the epoch's merged
    stream already trained on (a resume); the workers start after them."""

    def __init__(self, shards: list[StreamShard], transform: Any, options: StreamOptions) -> None:
        self.shards, self.transform, self.o = shards, transform, options
        self.epoch, self.taken = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.taken = epoch, 0

    def slot_shards(self, worker: int) -> list[int]:
        o = self.o
        order = epoch_shards(len(self.shards), o.seed, self.epoch, o.repeats)
        return order[o.rank + o.world * worker :: o.world * o.workers]

    def worker_counts(self) -> list[int]:
        return [sum(self.shards[k].images for k in self.slot_shards(w)) for w in range(self.o.workers)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """This loader worker's chunks of samples (collated), then empty ones up to the count of
        the worker with the most: the loader's round robin then never passes over an exhausted
        worker, and the order is the merge ``merged_counts`` describes."""
        info = get_worker_info()
        loader_worker = 0 if info is None else info.id
        o = self.o
        counts = self.worker_counts()
        consumed, turn, first = merged_counts(counts, self.taken, o.chunk)
        sizes = [
            chunk_sizes(c - u, first if w == turn else o.chunk, o.chunk)
            for w, (c, u) in enumerate(zip(counts, consumed, strict=True))
        ]
        worker = (turn + loader_worker) % o.workers  # the resumed merge starts with `turn`'s stream
        images = self._images(worker, consumed[worker])
        for size in sizes[worker]:
            yield collate([view for _ in range(size) for view in next(images)])
        for _ in range(max(len(n) for n in sizes) - len(sizes[worker])):
            yield {}

    def _images(self, worker: int, skip: int) -> Iterator[list[tuple[torch.Tensor, int, int, int]]]:
        for k in self.slot_shards(worker):
            shard = self.shards[k]
            if skip >= shard.images:
                skip -= shard.images  # finished before the resume: not read at all
                continue
            for cell, label, index in self._read(k, skip):
                image = decode_rgb(cell, index)
                yield [(self._view(image, index, r), label, index, r) for r in range(self.o.repeats)]
            skip = 0

    def _view(self, image: Any, index: int, repeat: int) -> torch.Tensor:
        with seeded(sample_seed(self.o.seed, self.epoch, index, repeat)):
            return self.transform(image)

    def _read(self, k: int, skip: int) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Shard k's images in its buffer order from position ``skip``: (cell, label, index)."""
        shard = self.shards[k]
        rows = np.flatnonzero(shard.index >= 0)
        order = rows[buffer_order(len(rows), self.o.buffer, sample_seed(self.o.seed, self.epoch, BUFFER_KEY, k + 1))]
        wanted = order[skip:]
        need = set(wanted.tolist())
        held: dict[int, tuple[dict[str, Any], int]] = {}
        rows_in = read_rows(shard.files, shard.record)
        last = len(wanted) - 1
        for j, row in enumerate(wanted.tolist()):
            while row not in held:
                r, cell, label = next(rows_in)
                if r in need:
                    held[r] = (cell, label)
            if j == last:  # the shard read to its end, and checked, before its last image is used
                for _ in rows_in:
                    pass
            cell, label = held.pop(row)
            yield cell, label, int(shard.index[row])


def _as_is(item: Any) -> Any:
    return item


class StreamLoader:
    """The training loader of stream mode: ``batches`` batches of ``batch_size`` per epoch on
    every process, on ``device``. Not a DataLoader, so ``accelerator.prepare`` leaves it as it is
    (Accelerate would read the stream on every process and keep a slice of each batch)."""

    def __init__(self, dataset: ShardStream, batch_size: int, batches: int, num_workers: int, device: Any) -> None:
        self.dataset, self.batch_size, self.batches = dataset, batch_size, batches
        self.num_workers, self.device = num_workers, device

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def resume(self, batches_done: int) -> Iterator[dict[str, torch.Tensor]]:
        """The rest of the epoch after ``batches_done`` batches, reading on from there."""
        return self._iterate(batches_done)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self._iterate(0)

    def _iterate(self, done: int) -> Iterator[dict[str, torch.Tensor]]:
        taken = done * self.batch_size
        views = self.dataset.o.repeats
        self.dataset.taken = taken // views  # whole images before the first sample still due
        drop = taken % views  # views of a straddling image already trained on
        pending: list[dict[str, torch.Tensor]] = []
        held = 0
        # Pinned chunks make the non-blocking copy below asynchronous on a GPU (from pageable
        # memory CUDA copies synchronously whatever non_blocking says); a batch joined from
        # several chunks by torch.cat is pageable again.
        pin = torch.cuda.is_available()
        loader = DataLoader(self.dataset, None, num_workers=self.num_workers, collate_fn=_as_is, pin_memory=pin)
        for chunk in loader:
            if not chunk:
                continue
            if drop:
                chunk, drop = {k: v[drop:] for k, v in chunk.items()}, 0
            pending.append(chunk)
            held += len(chunk["label"])
            while held >= self.batch_size and done < self.batches:
                # One chunk per batch (W = 1, N = 1) needs no copy: torch.cat would copy the images.
                joined = pending[0] if len(pending) == 1 else {k: torch.cat([c[k] for c in pending]) for k in chunk}
                held -= self.batch_size
                pending = [{k: v[self.batch_size :] for k, v in joined.items()}] if held else []
                yield {k: v[: self.batch_size].to(self.device, non_blocking=True) for k, v in joined.items()}
                done += 1
            if done == self.batches:
                return


def stream_batches(shards: list[StreamShard], o: StreamOptions, per_process_batch: int, multiple: int) -> int:
    """Batches per process per epoch, the same every epoch: what the process with the fewest
    images can give (the smallest shards), in whole optimizer steps (``multiple`` micro-batches)."""
    used = math.ceil(len(shards) / o.repeats)
    each = used // o.world
    if each == 0:
        raise DataError(
            f"data.shard_access=stream gives every process whole shards, and an epoch reads {used} "
            f"shards for {o.world} processes; write smaller shards (python -m distill.shard --shard-size) "
            "or set data.shard_access=random"
        )
    fewest = sum(sorted(s.images for s in shards)[:each]) * o.repeats
    batches = fewest // per_process_batch
    return batches - batches % multiple


def stream_loader(
    data: DataConfig, train: Any, transform: Any, seed: int, batch: int, global_batch: int
) -> StreamLoader:
    """The stream-mode training loader of ``data`` (shards) for this process: ``batch`` images per
    batch, ``global_batch`` per optimizer step over all processes."""
    from accelerate import PartialState

    state = PartialState()
    workers = max(1, data.num_workers)
    chunk = max(1, batch // (workers * data.repeated_aug))  # a batch holds a chunk from every worker
    o = StreamOptions(
        seed, data.stream_buffer, data.repeated_aug, state.num_processes, state.process_index, workers, chunk
    )
    shards = stream_shards(data.path, data.train_split, train)
    batches = stream_batches(shards, o, batch, global_batch // (batch * state.num_processes))
    if batches == 0:
        raise DataError(
            f"data.shard_access=stream: the process with the fewest images gets fewer than one global batch "
            f"({global_batch} images over {state.num_processes} processes); lower train.batch_size"
        )
    return StreamLoader(ShardStream(shards, transform, o), batch, batches, data.num_workers, state.device)


def skip_batches(accelerator: Any, loader: Any, done: int) -> Any:
    """The rest of an epoch after ``done`` batches: a stream reads on from where it stood (shards
    it finished are not read, nothing is decoded twice); any other loader is Accelerate's skip."""
    if isinstance(loader, StreamLoader):
        return loader.resume(done)
    return accelerator.skip_first_batches(loader, done)
