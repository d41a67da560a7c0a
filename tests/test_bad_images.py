"""Corrupt and truncated images: 'error' names the file (also from loader workers), 'skip' drops
and lists them, and `python -m distill.scan` lists them all without training."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from distill.data.pipeline import AugmentedDataset, build_transforms, make_loader
from distill.data.sources import bad_images, load_source
from distill.errors import DataError
from distill.models.spec import InputSpec
from distill.recipe.schema import load_recipe
from tests.helpers import SMOKE, run_train


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(("cat", "dog", "frog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.full((20, 20, 3), 60.0 + 60 * c) + 30 * torch.randn(20, 20, 3, generator=gen)).clamp(
                    0, 255
                )
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / name / f"{i:03d}.jpg", quality=90)
    (root / "train" / "cat" / "broken.jpg").write_text("not an image")
    whole = (root / "train" / "dog" / "000.jpg").read_bytes()
    (root / "train" / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def folder_recipe(root: Path, *extra: str) -> Any:
    return load_recipe(SMOKE, ["data.source=imagefolder", f"data.path={root}", *extra])


def transforms(recipe: Any) -> tuple[Any, Any]:
    return build_transforms(recipe.data.augment, InputSpec((16, 16), (0.5,) * 3, (0.5,) * 3, 1.0, "bicubic"))


def test_bad_images_lists_non_images_and_truncated_files(bad_folder: Path) -> None:
    split = load_source(folder_recipe(bad_folder).data)
    bad = bad_images(split.train)
    assert sorted(Path(path).name for _, path, _ in bad) == ["broken.jpg", "truncated.jpg"]
    assert bad_images(split.val) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_error_mode_names_the_file(bad_folder: Path, workers: int) -> None:
    recipe = folder_recipe(bad_folder)
    split = load_source(recipe.data)
    ds = AugmentedDataset(split.train, transforms(recipe)[0], seed=0, train=True)
    loader = make_loader(ds, batch_size=26, seed=0, train=False, num_workers=workers)
    with pytest.raises(DataError, match=r"cannot decode image .*(broken|truncated)\.jpg.*data\.on_bad_image=skip"):
        list(loader)


def test_skip_mode_drops_and_lists_them(bad_folder: Path) -> None:
    split = load_source(folder_recipe(bad_folder, "data.on_bad_image=skip").data)
    assert len(split.train) == 24 and len(split.val) == 6
    assert sorted(Path(p).name for p in split.skipped) == ["broken.jpg", "truncated.jpg"]


def test_scan_command(bad_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distill.scan import main

    assert main([str(SMOKE), "data.source=imagefolder", f"data.path={bad_folder}"]) == 1
    out = capsys.readouterr()
    assert "broken.jpg" in out.out and "truncated.jpg" in out.out and "train: 2 of 26" in out.err
    clean = tmp_path / "clean"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (clean / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(clean / split / name / "0.png")
    assert main([str(SMOKE), "data.source=imagefolder", f"data.path={clean}"]) == 0


@pytest.mark.slow
def test_a_run_on_bad_data_stops_with_one_line_naming_the_file(bad_folder: Path, tmp_path: Path) -> None:
    proc = run_train(str(SMOKE), "data.source=imagefolder", f"data.path={bad_folder}", f"run.output_dir={tmp_path}",
                     "data.num_workers=2")  # fmt: skip
    assert proc.returncode == 2
    assert re.search(r"^error: cannot decode image \S+(broken|truncated)\.jpg", proc.stderr, re.M)
    assert "Traceback" not in proc.stderr
