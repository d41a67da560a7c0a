"""Shards (distill/data/shards.py, shard_writer.py, python -m distill.shard): the same splits as the
source, a resumable writer, one clear error per kind of damage, and runs that log exactly what the
source's runs log (1 process, 2 processes, killed and resumed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from PIL import Image

from distill.data.pipeline import AugmentedDataset, build_transforms, make_loader
from distill.data.shard_writer import ShardEvent, ShardOptions, write_shards
from distill.data.shards import MANIFEST, file_sha256, load_shards
from distill.data.sources import load_source
from distill.errors import DataError
from distill.models.spec import InputSpec
from distill.recipe.schema import DataConfig, load_recipe
from distill.shard import main as shard_main
from tests.helpers import (
    SMOKE,
    assert_same_run,
    check_ok,
    kill_and_resume,
    launch_train,
    read_metrics,
    run_train,
)

CLASSES = ("cat", "dog", "emu")


def write_folder(root: Path) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: 5 train and 2 val JPEGs per class, distinct pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(60 * c + rng.normal(60, 30, (14, 18, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.jpg", quality=90)
    return root


def folder_cfg(root: Path, *extra: str) -> DataConfig:
    return load_recipe(SMOKE, ["data.source=imagefolder", f"data.path={root}", *extra]).data


def shards_cfg(root: Path, *extra: str) -> DataConfig:
    return load_recipe(SMOKE, ["data.source=shards", f"data.path={root}", *extra]).data


def shard(cfg: DataConfig, out: Path, size: int = 4, overwrite: bool = False) -> list[ShardEvent]:
    events: list[ShardEvent] = []
    write_shards(cfg, ShardOptions(out, size, overwrite, threads=2), events.append)
    return events


def undecoded(ds: Any) -> list[dict[str, Any]]:
    return ds.cast_column("image", datasets.Image(decode=False))["image"]


def pixels(ds: Any) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in ds["image"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture()
def sharded(folder: Path, tmp_path: Path) -> Path:
    shard(folder_cfg(folder), tmp_path / "shards")
    return tmp_path / "shards"


def manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST).read_text())


# The same splits as the source ---------------------------------------------------------------


def test_an_image_folder_comes_back_as_the_same_splits_with_its_original_bytes(folder: Path, sharded: Path) -> None:
    source, shards = load_source(folder_cfg(folder)), load_source(shards_cfg(sharded))
    assert shards.class_names == source.class_names == list(CLASSES)
    assert (shards.val_origin, len(shards.train), len(shards.val)) == ("val", 15, 6)
    for a, b in ((source.train, shards.train), (source.val, shards.val)):
        assert a["label"] == b["label"]
        files = [Path(cell["path"]).read_bytes() for cell in undecoded(a)]
        assert [cell["bytes"] for cell in undecoded(b)] == files  # no re-encoding
    cells = undecoded(shards.train)
    assert cells[0]["path"] == "train-00000.arrow:cat/000.jpg"
    assert cells[14]["path"] == "train-00003.arrow:emu/004.jpg"
    record = manifest(sharded)
    assert record["complete"] is True and record["class_names"] == list(CLASSES)
    assert record["source"]["source"] == "imagefolder" and record["source"]["path"] == str(folder.resolve())
    assert {n: (s["count"], s["class_counts"], len(s["shards"])) for n, s in record["splits"].items()} == {
        "train": (15, [5, 5, 5], 4),
        "val": (6, [2, 2, 2], 2),
    }
    for s in record["splits"]["train"]["shards"]:
        assert file_sha256(sharded / s["file"]) == s["sha256"]
        assert (sharded / s["file"]).stat().st_size == s["bytes"]


def test_digits_shards_give_the_same_held_out_split_and_pixels(tmp_path: Path) -> None:
    """Decoded pixels (digits) are stored as PNG: lossless; the held-out val is drawn identically."""
    cfg = load_recipe(None, ["data.source=digits"]).data
    shard(cfg, tmp_path / "s", size=1000)
    source = load_source(cfg)
    shards = load_source(load_recipe(None, ["data.source=shards", f"data.path={tmp_path / 's'}"]).data)
    assert shards.val_origin == source.val_origin == "held-out"
    assert (len(shards.train), len(shards.val)) == (len(source.train), len(source.val)) == (1437, 360)
    for a, b in ((source.train, shards.train), (source.val, shards.val)):
        assert a["label"] == b["label"]
        assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


# The writer: resume, refusals -----------------------------------------------------------------


def test_an_interrupted_writer_resumes_keeping_the_intact_shards(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.data import shard_writer

    real, calls = shard_writer.write_shard, [0]

    def dies_on_third(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args)

    out = tmp_path / "s"
    monkeypatch.setattr(shard_writer, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        shard(folder_cfg(folder), out)
    monkeypatch.setattr(shard_writer, "write_shard", real)
    assert manifest(out)["complete"] is False
    with pytest.raises(DataError, match=r"the shards in .* are incomplete \(2 of 6 written\); finish them"):
        load_shards(out)

    (out / "train-00001.arrow").write_bytes(b"damaged")  # a kept shard that no longer verifies
    events = shard(folder_cfg(folder), out)
    assert [(e.record.file, e.kept) for e in events] == [
        ("train-00000.arrow", True),
        ("train-00001.arrow", False),
        ("train-00002.arrow", False),
        ("train-00003.arrow", False),
        ("val-00000.arrow", False),
        ("val-00001.arrow", False),
    ]
    assert events[-1].images_done == events[-1].images_total == 21
    fresh = tmp_path / "fresh"
    shard(folder_cfg(folder), fresh)
    assert manifest(out)["splits"] == manifest(fresh)["splits"]  # byte-identical shards
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())


def test_a_non_empty_out_is_refused_unless_overwrite(folder: Path, sharded: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"--out .*other is not empty and holds no manifest.json; choose an empty"):
        shard(folder_cfg(folder), other)
    with pytest.raises(DataError, match=r"holds notes.txt, which is not a shard file; --overwrite replaces a shard"):
        shard(folder_cfg(folder), other, overwrite=True)
    with pytest.raises(DataError, match=r"holds shards of other data or another shard size .* pass --overwrite"):
        shard(folder_cfg(folder), sharded, size=5)
    shard(folder_cfg(folder), sharded, size=5, overwrite=True)
    assert manifest(sharded)["shard_size"] == 5 and len(list(sharded.glob("train-*.arrow"))) == 3


def test_the_command_writes_and_reports(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    args = [str(SMOKE), "data.source=imagefolder", f"data.path={folder}", "--out", str(out), "--shard-size", "10"]
    assert shard_main(args) == 0
    text = capsys.readouterr().out
    assert "val-00000.arrow written: 21/21 images" in text
    assert "train: 15 images in 2 shards" in text and "val: 6 images in 1 shards" in text
    assert f"train with: data.source=shards data.path={out}" in text
    assert shard_main([str(SMOKE), "data.source=imagefolder", f"data.path={tmp_path / 'nowhere'}", "--out", "x"]) == 2
    assert "error: data.path" in capsys.readouterr().err


def test_shuffled_shards_hold_the_same_images_in_a_seeded_order(folder: Path, tmp_path: Path) -> None:
    cfg = folder_cfg(folder)
    write_shards(cfg, ShardOptions(tmp_path / "a", 4, threads=1, shuffle=7), lambda event: None)
    write_shards(cfg, ShardOptions(tmp_path / "b", 4, threads=1, shuffle=7), lambda event: None)
    assert manifest(tmp_path / "a")["splits"] == manifest(tmp_path / "b")["splits"]  # byte-identical shards
    assert manifest(tmp_path / "a")["source"]["shuffle"] == 7
    source, shards = load_source(cfg), load_source(shards_cfg(tmp_path / "a"))
    keys = [cell["path"].split(":")[1] for cell in undecoded(shards.train)]
    assert keys[:4] == ["cat/003.jpg", "emu/000.jpg", "dog/001.jpg", "dog/003.jpg"]  # rng([7, 0]).permutation(15)
    by_key = {str(Path(c["path"]).relative_to(folder / "train")): c for c in undecoded(source.train)}
    assert sorted(keys) == sorted(by_key)
    for key, cell in zip(keys, undecoded(shards.train), strict=True):
        assert cell["bytes"] == Path(by_key[key]["path"]).read_bytes()
    with pytest.raises(DataError, match=r"holds shards of other data or another shard size"):
        write_shards(cfg, ShardOptions(tmp_path / "a", 4, threads=1, shuffle=8), lambda event: None)


# Bad shards: one clear error each -----------------------------------------------------------


def test_a_missing_manifest_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no manifest.json in .*: write shards there with `python -m distill.shard"):
        load_source(shards_cfg(tmp_path))


@pytest.mark.parametrize("url", ["s3://bucket/imagenet-shards", "pipe:aws s3 cp s3://bucket/x/{} -"])
def test_a_url_read_at_random_is_refused_saying_stream_or_mount(url: str) -> None:
    recipe = load_recipe(SMOKE, ["data.source=shards", f"data.path={url}"])
    with pytest.raises(
        DataError, match=rf"data.path={re.escape(url)} is read front to back only: set data.shard_access=stream, or"
    ):
        load_source(recipe.data)


def test_a_missing_shard_is_named(sharded: Path) -> None:
    (sharded / "train-00002.arrow").unlink()
    with pytest.raises(DataError, match=r"shard .*train-00002.arrow is missing \(listed in .*manifest.json\); write"):
        load_shards(sharded)


def test_a_truncated_shard_is_named(sharded: Path) -> None:
    path = sharded / "train-00001.arrow"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DataError,
        match=rf"shard .*train-00001.arrow holds {len(data) // 2} bytes, its manifest says {len(data)}: it is trunc",
    ):
        load_shards(sharded)


def test_a_corrupt_shard_of_the_right_size_is_caught_by_its_hash(sharded: Path) -> None:
    path = sharded / "val-00000.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside an image's bytes: Arrow still reads the file
    path.write_bytes(bytes(data))
    load_shards(sharded)  # size and counts agree: only the hash can tell
    with pytest.raises(DataError, match=r"shard .*val-00000.arrow has sha256 \w{16}\.\.\., its manifest says"):
        load_source(shards_cfg(sharded, "data.verify_shards=true"))


def test_a_shard_that_is_not_arrow_is_named(sharded: Path) -> None:
    path = sharded / "train-00000.arrow"
    path.write_bytes(b"\0" * path.stat().st_size)
    with pytest.raises(DataError, match=r"shard .*train-00000.arrow cannot be read as Arrow \(.*\); write it again"):
        load_shards(sharded)


def test_a_manifest_that_disagrees_with_its_shards_is_named(sharded: Path) -> None:
    record = manifest(sharded)
    record["splits"]["train"]["shards"][3]["count"] = 4
    (sharded / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"shard .*train-00003.arrow holds 3 images, its manifest says 4"):
        load_shards(sharded)
    record["splits"]["train"]["shards"][3]["count"] = 3
    record["splits"]["train"]["class_counts"] = [6, 4, 5]
    (sharded / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"split 'train' of .* holds 15 images \(\[5, 5, 5\] per class\), its manifest"):
        load_shards(sharded)


def test_a_manifest_of_another_version_is_refused(sharded: Path) -> None:
    record = manifest(sharded)
    record["version"] = 99
    (sharded / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"is shard format version 99; this distill reads version 1"):
        load_shards(sharded)


def test_an_empty_split_comes_back_empty_and_is_refused_as_the_source_would(sharded: Path) -> None:
    """A hub dataset may hold an empty split: its shard set lists it with no shards."""
    record = manifest(sharded)
    record["splits"]["test"] = {"count": 0, "class_counts": [0, 0, 0], "shards": []}
    (sharded / MANIFEST).write_text(json.dumps(record))
    assert len(load_shards(sharded)["test"]) == 0
    with pytest.raises(DataError, match=r"shards data is empty \(train 15, val 0 images\)"):
        load_source(shards_cfg(sharded, "data.val_split=test"))


@pytest.fixture()
def bad_shards(tmp_path: Path) -> Path:
    root = write_folder(tmp_path / "folder")
    (root / "train" / "cat" / "broken.jpg").write_text("not an image")
    whole = (root / "train" / "dog" / "000.jpg").read_bytes()
    (root / "train" / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    shard(folder_cfg(root), tmp_path / "s", size=8)
    return tmp_path / "s"


def test_undecodable_images_in_a_shard_are_skipped_and_counted(bad_shards: Path) -> None:
    split = load_source(shards_cfg(bad_shards, "data.on_bad_image=skip"))
    assert split.skipped == ["train-00000.arrow:cat/broken.jpg", "train-00001.arrow:dog/truncated.jpg"]
    assert len(split.train) == 15


def test_an_undecodable_image_in_a_shard_stops_a_run_naming_shard_and_member(bad_shards: Path) -> None:
    recipe = load_recipe(SMOKE, ["data.source=shards", f"data.path={bad_shards}"])
    split = load_source(recipe.data)
    spec = InputSpec((16, 16), (0.5,) * 3, (0.5,) * 3, 1.0, "bicubic")
    ds = AugmentedDataset(split.train, build_transforms(recipe.data.augment, spec)[0], seed=0, train=True)
    with pytest.raises(DataError, match=r"cannot decode image train-00000.arrow:cat/broken.jpg: UnidentifiedImage"):
        list(make_loader(ds, batch_size=17, seed=0, train=False, num_workers=0))


# Runs on shards log what runs on the source log -----------------------------------------------


@pytest.fixture(scope="module")
def smoke_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke-shards")
    assert shard_main([str(SMOKE), "--out", str(out), "--shard-size", "48"]) == 0
    return out


@pytest.mark.slow
def test_a_run_on_shards_logs_the_source_runs_metrics(
    smoke_run: Path, smoke_shards: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    args = [str(SMOKE), f"run.output_dir={tmp_path}", "data.source=shards", f"data.path={smoke_shards}"]
    check_ok(run_train(*args, f"teacher.cache_dir={teacher_cache}"))
    assert read_metrics(tmp_path / "smoke") == read_metrics(smoke_run)


@pytest.mark.slow
@pytest.mark.extended
def test_a_shards_run_killed_mid_epoch_resumes_to_the_uninterrupted_numbers(
    smoke_run: Path, smoke_shards: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """SIGKILL right after the step-4 checkpoint (half-way through epoch 1 of 2)."""
    args = [
        str(SMOKE),
        f"run.output_dir={tmp_path}",
        f"teacher.cache_dir={teacher_cache}",
        "data.source=shards",
        f"data.path={smoke_shards}",
    ]
    kill_and_resume(args, tmp_path / "smoke")
    assert_same_run(tmp_path / "smoke", smoke_run)


@pytest.mark.slow
@pytest.mark.extended
def test_two_processes_on_shards_match_one_process_on_the_source(
    smoke_run: Path, smoke_shards: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """The tolerance of tests/test_train_e2e.py's two-process test (reductions across 2 ranks)."""
    proc = launch_train(
        str(SMOKE),
        f"run.output_dir={tmp_path}",
        f"teacher.cache_dir={teacher_cache}",
        "data.source=shards",
        f"data.path={smoke_shards}",
        ACCELERATE_USE_CPU="true",
    )
    check_ok(proc)
    two, one = read_metrics(tmp_path / "smoke"), read_metrics(smoke_run)
    assert len(two) == len(one)
    for a, b in zip(two, one, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


@pytest.mark.slow
@pytest.mark.extended
def test_a_study_on_shards_replays_the_teachers_outputs_in_its_second_run(
    smoke_shards: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """distill.compare switches teacher.output_cache on: the soft run computes the teacher's
    outputs on the shards, the hard run (same seed, same stream) replays every one of them."""
    import subprocess
    import sys

    from tests.helpers import REPO, subprocess_env

    args = [
        *(sys.executable, "-m", "distill.compare", str(SMOKE), "--types", "soft,hard", "--seeds", "0"),
        *("data.source=shards", f"data.path={smoke_shards}", "teacher.output_cache.enabled=true"),
        *(f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}", "train.epochs=1", "run.export=false"),
        "--no-analysis",
    ]
    check_ok(subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=900))
    study = tmp_path / "smoke-study"
    soft, hard = (
        json.loads((study / f"{v}-seed0" / "summary.json").read_text())["teacher_cache"] for v in ("soft", "hard")
    )
    assert soft["key"] == hard["key"] and (study / "teacher_outputs" / soft["key"]).is_dir()
    assert (soft["train_computed_images"], soft["train_replayed_images"]) == (128, 0)
    assert (hard["train_computed_images"], hard["train_replayed_images"]) == (0, 128)
    assert hard["val_replayed_images"] == 0  # the teacher stage's validation pass comes before the cache
