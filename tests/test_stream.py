"""Stream mode (distill/data/stream.py, data.shard_access=stream): what it promises, pinned.

Same seed, epoch, process count and workers -> the same stream; every image exactly once per
epoch across processes and workers when the shards divide evenly; the view of image i is random
mode's; a resume at micro-batch k continues the same stream without reading finished shards; the
teacher-output cache and the other impossible combinations are refused."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import stream
from distill.data.pipeline import AugmentedDataset, build_transforms
from distill.data.shard_writer import ShardOptions, write_shards
from distill.data.sources import load_source
from distill.data.stream import (
    ShardStream,
    StreamLoader,
    StreamOptions,
    buffer_order,
    chunk_sizes,
    merged_counts,
    stream_batches,
    stream_shards,
)
from distill.errors import DataError, RecipeError
from distill.models.spec import InputSpec
from distill.recipe.schema import load_recipe
from distill.shard import main as shard_main
from tests.helpers import SMOKE, assert_same_run, check_ok, kill_and_resume, run_train

SPEC = InputSpec((8, 8), (0.5,) * 3, (0.5,) * 3, 1.0, "bicubic")


def write_folder(root: Path, per_class: int, val: bool = True) -> Path:
    """4 classes of ``per_class`` 10x12 JPEGs in train/ (and 1 per class in val/)."""
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("val", 1 if val else 0)):
        for c in range(4 if n else 0):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i:02d}.jpg", quality=90)
    return root


def sharded(tmp: Path, per_class: int, size: int, val: bool = True) -> tuple[Path, Any]:
    """(shard folder, resolved split) of a generated folder written ``size`` images a shard."""
    folder = write_folder(tmp / "folder", per_class, val)
    cfg = load_recipe(SMOKE, ["data.source=imagefolder", f"data.path={folder}"]).data
    write_shards(cfg, ShardOptions(tmp / "s", size, threads=1), lambda event: None)
    split = load_source(load_recipe(SMOKE, ["data.source=shards", f"data.path={tmp / 's'}"]).data)
    return tmp / "s", split


@pytest.fixture(scope="module")
def even(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """16 train images in 8 shards of 2: they divide over 2 processes x 2 workers and batches of 4."""
    root, split = sharded(tmp_path_factory.mktemp("even"), 4, 2)
    return root, split.train


def transform() -> Any:
    return build_transforms(load_recipe(SMOKE).data.augment, SPEC)[0]


def epoch(
    data: tuple[Path, Any], *, world: int = 1, rank: int = 0, workers: int = 0, batch: int = 4, e: int = 0, **kw: Any
) -> list[dict[str, torch.Tensor]]:
    """One process's batches of epoch ``e`` (``done``: resumed after that many)."""
    done = kw.pop("done", 0)
    repeats = kw.pop("repeats", 1)
    chunk = kw.pop("chunk", max(1, batch // (max(1, workers) * repeats)))  # as stream_loader chooses it
    o = StreamOptions(kw.pop("seed", 0), kw.pop("buffer", 3), repeats, world, rank, max(1, workers), chunk)
    shards = stream_shards(data[0], "train", data[1])
    loader = StreamLoader(
        ShardStream(shards, transform(), o), batch, stream_batches(shards, o, batch, 1), workers, "cpu"
    )
    loader.set_epoch(e)
    return list(loader.resume(done))


def indices(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [i for b in batches for i in b["index"].tolist()]


# The pieces -----------------------------------------------------------------------------------


def test_the_shuffle_buffer_is_a_seeded_permutation_within_its_reach() -> None:
    order = buffer_order(50, 8, seed=3)
    assert sorted(order.tolist()) == list(range(50))
    assert (order[: 50 - 8] < np.arange(50 - 8) + 8).all()  # item t leaves from the first 8 + t read
    assert order.tolist() == buffer_order(50, 8, seed=3).tolist() != buffer_order(50, 8, seed=4).tolist()
    assert buffer_order(5, 8, seed=3).tolist() != list(range(5))  # a shard smaller than the buffer


def round_robin(sizes: list[list[int]], order: list[int]) -> list[int]:
    """The stream each item of a merge comes from: chunk r of every stream in ``order``, r = 0, 1, ..."""
    rounds = range(max(map(len, sizes), default=0))
    return [w for r in rounds for w in order if r < len(sizes[w]) for _ in range(sizes[w][r])]


def test_merged_counts_agrees_with_the_round_robin_it_describes() -> None:
    for counts, chunk in itertools.product(([3, 3], [5, 2, 0], [1, 4, 4, 2]), (1, 2, 3)):
        merged = round_robin([chunk_sizes(c, chunk, chunk) for c in counts], list(range(len(counts))))
        for taken in range(sum(counts) + 1):
            consumed, turn, first = merged_counts(counts, taken, chunk)
            assert consumed == [merged[:taken].count(w) for w in range(len(counts))]
            left = [
                chunk_sizes(c - u, first if w == turn else chunk, chunk)
                for w, (c, u) in enumerate(zip(counts, consumed))
            ]
            order = [(turn + j) % len(counts) for j in range(len(counts))]
            assert round_robin(left, order) == merged[taken:]  # a resumed merge goes on with the same items


# The promises ---------------------------------------------------------------------------------


def test_the_same_seed_and_epoch_give_the_same_stream_and_others_another(even: tuple[Path, Any]) -> None:
    first = indices(epoch(even))
    assert sorted(first) == list(range(16))
    assert indices(epoch(even)) == first
    assert indices(epoch(even, e=1)) != first
    assert indices(epoch(even, seed=1)) != first


def test_every_image_once_per_epoch_across_processes_and_workers(even: tuple[Path, Any]) -> None:
    for e in (0, 1):
        ranks = [indices(epoch(even, world=2, rank=r, workers=2, e=e)) for r in (0, 1)]
        assert [len(r) for r in ranks] == [8, 8]
        assert sorted(ranks[0] + ranks[1]) == list(range(16))
    assert ranks[0] == indices(epoch(even, world=2, rank=0, workers=2, e=1))  # workers: the same stream again


def test_uneven_shards_leave_out_the_tail_and_never_repeat_an_image(tmp_path: Path) -> None:
    """15 images in shards of 4, 4, 4, 3 over 2 processes: each process gets 7 or 8 images in
    each epoch; both do the batches of the one with fewer (7 // 2 = 3 batches of 2)."""
    root, split = sharded(tmp_path, 4, 4)
    data = (root, split.train.select(range(15)))
    for e in range(3):
        ranks = [indices(epoch(data, world=2, rank=r, batch=2, e=e)) for r in (0, 1)]
        assert [len(r) for r in ranks] == [6, 6]
        assert len(set(ranks[0] + ranks[1])) == 12


def test_a_held_out_validation_split_is_not_streamed(tmp_path: Path) -> None:
    """No val/ folder: validation is held out of the shards' train split; the stream skips it."""
    root, split = sharded(tmp_path, 5, 3, val=False)
    assert (split.val_origin, len(split.train), len(split.val)) == ("held-out", 16, 4)
    assert sorted(indices(epoch((root, split.train), batch=1))) == list(range(16))


def test_the_view_of_image_i_is_random_modes(even: tuple[Path, Any]) -> None:
    random_mode = AugmentedDataset(even[1], transform(), seed=0, train=True)
    random_mode.set_epoch(1)
    for b in epoch(even, e=1, repeats=2):
        for image, index, repeat in zip(b["image"], b["index"].tolist(), b["repeat"].tolist(), strict=True):
            assert torch.equal(image, random_mode[index + repeat * 16][0])


def test_repeated_augmentation_reads_a_share_of_the_shards_with_adjacent_views(even: tuple[Path, Any]) -> None:
    got = epoch(even, repeats=2, batch=3)
    pairs = [(i, r) for b in got for i, r in zip(b["index"].tolist(), b["repeat"].tolist(), strict=True)]
    assert len(pairs) == 15  # 4 of 8 shards: 8 images x 2 views, cut to 5 batches of 3
    assert [r for _, r in pairs] == [0, 1] * 7 + [0]
    assert all(pairs[j][0] == pairs[j + 1][0] for j in range(0, 14, 2))


@pytest.mark.parametrize(("workers", "repeats", "batch"), [(0, 1, 4), (2, 1, 2), (2, 1, 4), (2, 2, 3)])
def test_a_resume_continues_the_same_stream(even: tuple[Path, Any], workers: int, repeats: int, batch: int) -> None:
    whole = epoch(even, workers=workers, repeats=repeats, batch=batch, e=2)
    for done in range(1, len(whole)):
        rest = epoch(even, workers=workers, repeats=repeats, batch=batch, e=2, done=done)
        assert len(rest) == len(whole) - done
        for a, b in zip(rest, whole[done:], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_does_not_read_finished_shards_or_decode_twice(
    even: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    decoded = itertools.count()
    read, decode = stream.read_rows, stream.decode_rgb
    monkeypatch.setattr(stream, "read_rows", lambda files, r: (opened.append(r.file), read(files, r))[1])
    monkeypatch.setattr(stream, "decode_rgb", lambda cell, i: (next(decoded), decode(cell, i))[1])
    rest = epoch(even, done=3)  # 3 of 4 batches of 4 done: 12 images in shards of 2
    assert len(rest) == 1 and len(opened) == 2 and next(decoded) == 4


# Refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["teacher.output_cache.enabled=true"],
            r"data.shard_access=stream cannot use teacher.output_cache: it keys outputs by place in the stream, "
            r"which here depends on the processes and loader workers; set teacher.output_cache.enabled=false",
        ),
        (["data.store=tensor"], r"data.shard_access=stream decodes per image: set data.store=decode or auto"),
        (["data.source=imagefolder"], r"data.shard_access=stream reads shards, not data.source=imagefolder"),
    ],
)
def test_impossible_combinations_are_refused(overrides: list[str], message: str) -> None:
    base = ["data.source=shards", "data.path=s", "data.shard_access=stream"]
    with pytest.raises(RecipeError, match=message):
        load_recipe(SMOKE, base + overrides)


def test_fewer_shards_than_processes_is_refused(even: tuple[Path, Any]) -> None:
    shards = stream_shards(even[0], "train", even[1])
    with pytest.raises(DataError, match=r"an epoch reads 8 shards for 9 processes; write smaller shards"):
        stream_batches(shards, StreamOptions(0, 3, 1, 9, 0, 1), 1, 1)


# A run -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.extended
def test_a_stream_run_killed_mid_epoch_resumes_to_the_uninterrupted_numbers(
    tmp_path: Path, teacher_cache: Path
) -> None:
    """The smoke recipe on 3 shuffled shards in stream mode, SIGKILLed after the step-4 checkpoint (half-way
    through epoch 1 of 2), logs what the same run uninterrupted logs."""
    shards = tmp_path / "shards"
    assert shard_main([str(SMOKE), "--out", str(shards), "--shard-size", "48", "--shuffle", "0"]) == 0
    common = [str(SMOKE), f"teacher.cache_dir={teacher_cache}", "data.source=shards", f"data.path={shards}"]
    args = [*common, "data.shard_access=stream", "data.stream_buffer=16"]
    check_ok(run_train(*args, f"run.output_dir={tmp_path / 'whole'}"))
    killed = [*args, f"run.output_dir={tmp_path / 'killed'}"]
    kill_and_resume(killed, tmp_path / "killed" / "smoke")
    assert_same_run(tmp_path / "killed" / "smoke", tmp_path / "whole" / "smoke")


def test_a_study_in_stream_mode_asks_for_no_teacher_cache(capsys: pytest.CaptureFixture) -> None:
    """distill.compare switches the teacher-output cache on; stream mode refuses it before any run."""
    from distill.compare import main

    args = [str(SMOKE), "--types", "soft,hard", "--seeds", "0", "data.source=shards", "data.path=s"]
    assert main([*args, "data.shard_access=stream"]) == 2
    err = capsys.readouterr().err
    assert "data.shard_access=stream cannot use teacher.output_cache" in err and "--no-teacher-cache" in err
