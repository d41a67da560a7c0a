"""Teacher-output cache: replay is exact, sharing follows the data seed, any change of teacher or
input pipeline invalidates, a stale cache is caught by verification, top-k keeps the argmax."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import SMOKE, check_ok, read_metrics, run_train


def smoke(tmp_path: Path, teacher_cache: Path, name: str, *extra: str) -> dict:
    check_ok(
        run_train(
            str(SMOKE),
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"teacher.cache_dir={teacher_cache}",
            "teacher.output_cache.enabled=true",
            "run.export=false",
            *extra,
        )
    )
    return json.loads((tmp_path / name / "summary.json").read_text())["teacher_cache"]


@pytest.mark.slow
def test_replayed_outputs_train_exactly_like_fresh_ones(smoke_run: Path, tmp_path: Path, teacher_cache: Path) -> None:
    """The first run fills the cache, the second replays every batch (each one re-checked); both
    log exactly what the uncached smoke run logged. A third with another run.seed but the same
    data.seed replays too, and differs only because its student does."""
    filled = smoke(tmp_path, teacher_cache, "fill")
    assert filled["encoding"] == "full"
    assert (filled["train_computed_images"], filled["train_replayed_images"]) == (256, 0)
    assert read_metrics(tmp_path / "fill") == read_metrics(smoke_run)

    replayed = smoke(tmp_path, teacher_cache, "replay", "teacher.output_cache.verify_every=1")
    assert replayed["key"] == filled["key"]
    assert (replayed["train_computed_images"], replayed["train_replayed_images"]) == (0, 256)
    # The teacher's validation pass is the teacher stage's, before the cache is opened: never replayed.
    assert replayed["val_replayed_images"] == 0 and replayed["verified_batches"] == 16
    assert read_metrics(tmp_path / "replay") == read_metrics(smoke_run)

    other_seed = smoke(tmp_path, teacher_cache, "seed1", "run.seed=1", "data.seed=0")
    assert other_seed["key"] == filled["key"] and other_seed["train_replayed_fraction"] == 1.0
    assert read_metrics(tmp_path / "seed1") != read_metrics(smoke_run)


@pytest.mark.slow
def test_a_changed_input_pipeline_or_data_stream_gets_its_own_outputs(tmp_path: Path, teacher_cache: Path) -> None:
    base = smoke(tmp_path, teacher_cache, "base", "train.epochs=1")
    flipped = smoke(tmp_path, teacher_cache, "noflip", "train.epochs=1", "data.augment.hflip=0.0")
    reseeded = smoke(tmp_path, teacher_cache, "seed1", "train.epochs=1", "run.seed=1")  # data.seed follows it
    decoded = smoke(tmp_path, teacher_cache, "decode", "train.epochs=1", "data.store=decode")  # PIL's views
    assert len({base["key"], flipped["key"], reseeded["key"], decoded["key"]}) == 4
    assert all(run["train_replayed_images"] == 0 for run in (flipped, reseeded, decoded))


@pytest.mark.slow
def test_top_k_outputs_train_the_same_whether_filled_or_replayed(tmp_path: Path, teacher_cache: Path) -> None:
    budget = ("teacher.output_cache.budget_mb=0.000001", "teacher.output_cache.topk=2", "train.epochs=1")
    filled = smoke(tmp_path, teacher_cache, "a", *budget)
    replayed = smoke(tmp_path, teacher_cache, "b", *budget)
    assert filled["encoding"] == replayed["encoding"] == "topk2"
    assert replayed["train_replayed_fraction"] == 1.0
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


# -- the cache object on its own ---------------------------------------------------------------


def make_cache(tmp_path: Path, key: dict | None = None, classes: int = 5, budget_mb: float = 64.0, verify: int = 1):
    from accelerate import Accelerator

    from distill.recipe.schema import OutputCacheConfig
    from distill.training.teacher_outputs import TeacherOutputCache

    cfg = OutputCacheConfig(enabled=True, budget_mb=budget_mb, topk=2, verify_every=verify)
    cache = TeacherOutputCache(
        Accelerator(cpu=True), tmp_path, key or {"teacher": "t"}, classes, rows_per_epoch=8, per_process_batch=4,
        cfg=cfg,
    )  # fmt: skip
    cache.begin_epoch(0)
    return cache


class Teacher:
    """A deterministic 'teacher' that counts its calls."""

    def __init__(self, classes: int = 5, offset: float = 0.0) -> None:
        self.w = torch.randn(3, classes, generator=torch.Generator().manual_seed(0))
        self.offset, self.calls = offset, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x @ self.w + self.offset


def test_rows_are_computed_once_then_replayed_bit_for_bit(tmp_path: Path) -> None:
    teacher, x = Teacher(), torch.randn(4, 3)
    cache = make_cache(tmp_path, verify=0)
    fresh = cache.train_logits(0, 1, x, teacher)
    again = cache.train_logits(0, 1, x, teacher)
    assert teacher.calls == 1 and torch.equal(fresh, again)
    cache.train_logits(0, 0, x, teacher)  # another micro-step: other rows, computed
    assert teacher.calls == 2


def test_a_killed_fill_leaves_rows_unfilled_and_they_are_recomputed(tmp_path: Path) -> None:
    teacher, x = Teacher(), torch.randn(4, 3)
    cache = make_cache(tmp_path, verify=0)
    table = cache._tables["epoch_0000"]
    table.data["logits"][4:8] = 123.0  # data written, flag not yet: as if killed in between
    out = cache.train_logits(0, 1, x, teacher)
    assert teacher.calls == 1 and torch.equal(out, teacher(x))


def test_a_cache_that_disagrees_with_the_teacher_stops_the_run(tmp_path: Path) -> None:
    from distill.errors import TrainingError

    x = torch.randn(4, 3)
    first = make_cache(tmp_path)
    first.train_logits(0, 0, x, Teacher())
    first.close()
    # Same key (the cache cannot tell), other outputs: e.g. weights edited in place.
    with pytest.raises(TrainingError, match="disagrees with a fresh teacher pass at epoch 1, micro-step 0"):
        make_cache(tmp_path).train_logits(0, 0, x, Teacher(offset=1e-3))


def test_the_key_names_the_folder(tmp_path: Path) -> None:
    a, b = make_cache(tmp_path, {"teacher": "t"}), make_cache(tmp_path, {"teacher": "u"})
    assert a.dir != b.dir
    assert json.loads((a.dir / "key.json").read_text())["teacher"] == "t"


def test_top_k_keeps_the_top_classes_and_shares_the_rest(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, classes=6, budget_mb=1e-9)
    assert cache.mode == "topk"
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, -1.0, 0.5]])
    out = cache._decode(cache._encode(logits))
    p, q = logits.softmax(-1)[0], out.softmax(-1)[0]
    assert out.argmax().item() == 0
    assert q[[0, 2]].numpy() == pytest.approx(p[[0, 2]].numpy(), rel=2e-3)
    rest = q[[1, 3, 4, 5]].numpy()
    assert rest == pytest.approx(np.full(4, (1 - p[[0, 2]].sum().item()) / 4), rel=2e-2)


def test_each_process_publishes_its_own_complete_table_at_the_epochs_end(tmp_path: Path) -> None:
    """Nothing is written while an epoch runs; then one file per process, renamed into place
    whole (no temporary left), which the next run replays."""
    teacher, x = Teacher(), torch.randn(4, 3)
    cache = make_cache(tmp_path, verify=0)
    fresh = cache.train_logits(0, 1, x, teacher)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["key.json"]
    cache.begin_epoch(1)
    assert sorted(p.name for p in cache.dir.iterdir()) == ["epoch_0000.rank0.npz", "key.json"]
    cache.close()
    again = make_cache(tmp_path, verify=0)
    assert torch.equal(again.train_logits(0, 1, x, teacher), fresh) and teacher.calls == 1
    assert again.train_logits(0, 0, x, teacher) is not None and teacher.calls == 2  # never filled


@pytest.mark.slow
def test_two_runs_sharing_a_key_at_the_same_time_both_finish(
    smoke_run: Path, tmp_path: Path, teacher_cache: Path
) -> None:
    """Started together, they fill the same key's tables and publish them: both finish, both
    train exactly as the uncached run, and a third replays all of it."""
    import subprocess
    import sys

    from tests.helpers import REPO, subprocess_env

    args = [
        str(SMOKE), f"run.output_dir={tmp_path}", f"teacher.cache_dir={teacher_cache}", "run.export=false",
        "teacher.output_cache.enabled=true",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distill.train", *args, f"run.name={name}"],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b") == read_metrics(smoke_run)
    replay = smoke(tmp_path, teacher_cache, "c")
    assert replay["train_replayed_fraction"] == 1.0
    assert not list(Path(replay["dir"]).glob("*.tmp*"))
