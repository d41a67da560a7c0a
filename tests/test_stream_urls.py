"""Stream mode from a URL or a ``pipe:`` command (distill/data/shard_files.py): the training split
read front to back through fsspec or a shell command gives exactly the batches the folder gives;
validation is fetched once into a checked local cache; a missing, truncated or corrupt shard is
one error naming it; what cannot work without every label at load is refused before any read.

``file://`` (fsspec's local filesystem) and ``pipe:cat`` stand in for an object store: the code
path is the one s3://, gs:// or hf:// take, without a network."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.data import sources
from distill.data.shard_files import HashingReader, shard_files
from distill.data.shards import MANIFEST, StreamSplit
from distill.data.sources import load_source
from distill.errors import DataError
from distill.recipe.schema import load_recipe
from tests.helpers import SMOKE, assert_same_run, check_ok, kill_and_resume, launch_train, read_metrics, run_train
from tests.test_shards import bad_shards  # noqa: F401 (a fixture)
from tests.test_stream import SPEC, epoch, sharded


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of fetched shards per test, and no splits kept from another test's load."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    sources._SPLITS.clear()
    return tmp_path / "cache" / "shards"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """16 train images in 8 shards of 2, 4 val images in 2 shards, and the split read from the folder."""
    root, split = sharded(tmp_path_factory.mktemp("urls"), 4, 2)
    return root, split


def streamed(path: str, *extra: str) -> Any:
    return load_source(
        load_recipe(SMOKE, ["data.source=shards", f"data.path={path}", "data.shard_access=stream", *extra]).data
    )


def same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def encoded(ds: Any) -> list[tuple[bytes, int]]:
    """Each image's encoded bytes and its label."""
    import datasets

    cells = ds.cast_column("image", datasets.Image(decode=False))
    return [(c["bytes"], label) for c, label in zip(cells["image"], cells["label"], strict=True)]


def urls(root: Path) -> list[str]:
    return [f"file://{root}", f"pipe:cat {root}/{{}}", f"file://{root}/{MANIFEST}"]


def test_a_url_or_a_command_streams_exactly_the_folders_batches(folder: tuple[Path, Any]) -> None:
    root, local = folder
    for path in urls(root):
        split = streamed(path)
        assert isinstance(split.train, StreamSplit) and len(split.train) == 16
        for kw in ({"workers": 2, "e": 1}, {"world": 2, "rank": 1, "batch": 2}, {"repeats": 2, "batch": 3, "done": 2}):
            assert same_batches(epoch((path, split.train), **kw), epoch((root, local.train), **kw)), (path, kw)


def test_validation_is_fetched_once_and_no_training_shard_is_read_at_load(
    folder: tuple[Path, Any], tmp_path: Path, cache: Path
) -> None:
    root, local = folder
    log = tmp_path / "read.log"
    path = f"pipe:echo {{}} >> {log}; cat {root}/{{}}"
    split = streamed(path)
    assert log.read_text().split() == [MANIFEST, "val-00000.arrow", "val-00001.arrow"]
    assert split.val_origin == "val" and encoded(split.val) == encoded(local.val)
    assert len(list(cache.glob("*.arrow"))) == 2 and not list(cache.glob("*.tmp"))
    assert {f.stat().st_mode & 0o777 for f in cache.glob("*.arrow")} == {0o644}  # a cache nodes may share
    sources._SPLITS.clear()
    streamed(path)
    assert log.read_text().split()[3:] == [MANIFEST]  # the cache serves the validation split


def test_a_manifest_path_names_its_folder(folder: tuple[Path, Any]) -> None:
    root, local = folder
    split = load_source(load_recipe(SMOKE, ["data.source=shards", f"data.path={root / MANIFEST}"]).data)
    assert encoded(split.train) == encoded(local.train)


# Damage: one error naming the shard --------------------------------------------------------------


def damaged(folder: tuple[Path, Any], tmp_path: Path) -> Path:
    copy = tmp_path / "copy"  # (a new folder per copy: the cache of validation shards is keyed by hash)
    shutil.copytree(folder[0], copy)
    return copy


def first_batches(path: str) -> list[dict[str, torch.Tensor]]:
    return epoch((path, streamed(path).train), batch=16)


def test_a_corrupt_training_shard_of_the_right_size_is_caught_whichever_it_is(
    folder: tuple[Path, Any], tmp_path: Path
) -> None:
    """A key changed in place: the shard still parses and decodes; only its hash can tell. Each
    of the 8 shards in turn, so the last one a worker reads is checked too, before its last image
    is used."""
    for k in range(8):
        copy = damaged(folder, tmp_path / str(k))
        shard = copy / f"train-{k:05d}.arrow"
        data = shard.read_bytes()
        key = re.search(rb"c\d/\d\d\.jpg", data)
        assert key is not None
        shard.write_bytes(data.replace(key.group(), key.group()[:-1] + b"x"))
        sources._SPLITS.clear()
        with pytest.raises(DataError, match=rf"shard file://.*/train-{k:05d}.arrow read as \d+ bytes with sha256 .*"):
            first_batches(f"file://{copy}")


def test_a_command_stopped_early_is_stopped_with_its_whole_pipeline(folder: tuple[Path, Any]) -> None:
    """The end of an epoch closes the shard a worker was in (GeneratorExit in the reader): the
    command and every process it started stop."""
    files = shard_files(f"pipe:sleep 31.25 | cat {folder[0]}/{{}}")

    def reader() -> Iterator[bytes]:
        with files.open("train-00000.arrow") as fh:
            yield fh.read(16)

    rows = reader()
    assert len(next(rows)) == 16
    start = time.monotonic()
    rows.close()
    assert time.monotonic() - start < 5
    assert subprocess.run(["pgrep", "-f", "sleep 31.25"], capture_output=True).returncode == 1  # none left


def test_a_read_that_fails_mid_shard_is_named_with_what_to_do() -> None:
    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            raise ConnectionResetError("connection reset by peer")

    with pytest.raises(
        DataError,
        match=r"reading s3://b/train-00001.arrow failed after 0 bytes \(ConnectionResetError: connection "
        r"reset by peer\); a run stopped by it resumes from its last checkpoint",
    ):
        HashingReader(Broken(), "s3://b/train-00001.arrow").read(10)


def test_a_truncated_training_shard_is_named(folder: tuple[Path, Any], tmp_path: Path) -> None:
    copy = damaged(folder, tmp_path)
    shard = copy / "train-00005.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=r"shard train-00005.arrow \(from `cat .*`\) .*write the shard set again"):
        first_batches(f"pipe:cat {copy}/{{}}")


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (
            lambda c: f"pipe:cat {c}/{{}}",
            r"cannot read train-00002.arrow \(from `cat .*`\): the command exited with status 1: cat: .*No such file",
        ),
        (lambda c: f"file://{c}", r"file://.*/train-00002.arrow is missing; it is listed in manifest.json: copy it"),
    ],
)
def test_a_missing_training_shard_is_named(
    folder: tuple[Path, Any], tmp_path: Path, make_path: Any, message: str
) -> None:
    copy = damaged(folder, tmp_path)
    (copy / "train-00002.arrow").unlink()
    with pytest.raises(DataError, match=message):
        first_batches(make_path(copy))


def test_a_corrupt_validation_shard_is_not_fetched_into_the_cache(
    folder: tuple[Path, Any], tmp_path: Path, cache: Path
) -> None:
    copy = damaged(folder, tmp_path)
    shard = copy / "val-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val-00001.arrow has sha256 .*, its manifest says .*: it is corrupt"):
        streamed(f"file://{copy}")
    assert len(list(cache.glob("*"))) == 1  # the intact shard, no temporary file


def test_scan_reads_a_url_front_to_back_and_lists_what_the_folder_lists(
    bad_shards: Path,  # noqa: F811
    capsys: pytest.CaptureFixture,
) -> None:
    """On_bad_image=skip is refused for a URL; distill.scan lists the undecodable images first."""
    from distill.scan import main as scan_main

    listed = []
    for path in (str(bad_shards), f"pipe:cat {bad_shards}/{{}}"):
        sources._SPLITS.clear()
        assert scan_main([str(SMOKE), "data.source=shards", f"data.path={path}", "data.shard_access=stream"]) == 1
        said = capsys.readouterr()
        listed.append(re.sub(r" at 0x[0-9a-f]+", "", said.out + said.err))  # a BytesIO's address
    assert listed[0] == listed[1]
    assert "train\ttrain-00000.arrow:cat/broken.jpg\tUnidentifiedImageError" in listed[1]
    assert "train: 2 of 17 images do not decode" in listed[1]


# Refused before any read ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["data.max_train_samples=8"], r"cannot draw data.max_train_samples"),
        (["data.on_bad_image=skip"], r"cannot drop undecodable images at load"),
    ],
)
def test_what_needs_every_label_at_load_is_refused(folder: tuple[Path, Any], extra: list[str], message: str) -> None:
    with pytest.raises(
        DataError, match=r"the shard set at file://.* \(read front to back: a URL or a pipe: command\) " + message
    ):
        streamed(f"file://{folder[0]}", *extra)


def test_a_set_without_validation_is_refused(tmp_path: Path) -> None:
    root, _ = sharded(tmp_path, 5, 4, val=False)
    with pytest.raises(DataError, match=r"holds no validation split .*give a local or mounted copy as data.path"):
        streamed(f"file://{root}")


def test_a_url_with_no_shard_set_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest.json is missing; no shard set at file://.*nowhere \(no manifest"):
        streamed(f"file://{tmp_path / 'nowhere'}")


def test_a_command_without_a_name_and_a_store_without_its_backend_are_named() -> None:
    with pytest.raises(DataError, match=r"a pipe: command reads one file of the shard set and names it with \{\}"):
        streamed("pipe:cat /data/shards/manifest")
    with pytest.raises(DataError, match=r"cannot read s3://bucket/in1k/manifest.json: Install s3fs to access S3"):
        streamed("s3://bucket/in1k")


def test_the_training_split_of_a_url_is_never_read_at_random(folder: tuple[Path, Any], tmp_path: Path) -> None:
    """What would (int8 calibration, evaluating on the training split) is told to use a copy."""
    import yaml

    from distill.exports.evaluation import eval_dataset
    from distill.exports.int8 import calibration_sample
    from distill.recipe.schema import recipe_to_dict

    path = f"file://{folder[0]}"
    split = streamed(path)
    with pytest.raises(DataError, match=r"split 'train' of file://.* is read front to back .*local or mounted copy"):
        calibration_sample(split.train, SPEC, 2, 0)
    recipe = tmp_path / "recipe.yaml"
    overrides = ["data.source=shards", f"data.path={path}", "data.shard_access=stream"]
    recipe.write_text(yaml.safe_dump(recipe_to_dict(load_recipe(SMOKE, overrides))))
    with pytest.raises(DataError, match=r"never at random \(--split train\); pass --data a local or mounted copy"):
        eval_dataset(str(recipe), "train", None)
    assert len(eval_dataset(str(recipe), "val", None)[0]) == 4
    assert len(eval_dataset(str(folder[0]), "train", None)[0]) == 16  # --data the shard folder itself


# Runs ------------------------------------------------------------------------------------------


def smoke_shards(tmp_path: Path) -> Path:
    from distill.shard import main as shard_main

    out = tmp_path / "shards"
    assert shard_main([str(SMOKE), "--out", str(out), "--shard-size", "48", "--shuffle", "0"]) == 0
    return out


def stream_args(tmp_path: Path, teacher_cache: Path, path: str, name: str) -> list[str]:
    return [
        str(SMOKE), f"teacher.cache_dir={teacher_cache}", "data.source=shards", f"data.path={path}",
        "data.shard_access=stream", "data.stream_buffer=16", f"run.output_dir={tmp_path / name}", "run.export=false",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.extended
def test_a_run_streamed_through_a_command_logs_the_folders_numbers(tmp_path: Path, teacher_cache: Path) -> None:
    shards = smoke_shards(tmp_path)
    check_ok(run_train(*stream_args(tmp_path, teacher_cache, str(shards), "folder")))
    check_ok(run_train(*stream_args(tmp_path, teacher_cache, f"pipe:cat {shards}/{{}}", "pipe")))
    assert read_metrics(tmp_path / "pipe" / "smoke") == read_metrics(tmp_path / "folder" / "smoke")


@pytest.mark.slow
@pytest.mark.extended
def test_two_processes_streaming_a_url_killed_and_resumed_log_the_folders_numbers(
    tmp_path: Path, teacher_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes stream the training split over fsspec (the main process fetches the
    validation shards first, the other finds them cached); one process over a command killed
    mid-epoch resumes to the same numbers."""
    shards = smoke_shards(tmp_path)
    folder = stream_args(tmp_path, teacher_cache, str(shards), "folder2")
    check_ok(launch_train(*folder, ACCELERATE_USE_CPU="true"))
    check_ok(launch_train(*stream_args(tmp_path, teacher_cache, f"file://{shards}", "url2"), ACCELERATE_USE_CPU="true"))
    assert read_metrics(tmp_path / "url2" / "smoke") == read_metrics(tmp_path / "folder2" / "smoke")

    check_ok(run_train(*stream_args(tmp_path, teacher_cache, str(shards), "folder1")))
    killed = stream_args(tmp_path, teacher_cache, f"pipe:cat {shards}/{{}}", "killed")
    kill_and_resume(killed, tmp_path / "killed" / "smoke")
    assert_same_run(tmp_path / "killed" / "smoke", tmp_path / "folder1" / "smoke")
