"""The suite's shared fixtures; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SMOKE, check_ok, run_train


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One teacher cache for the whole session: the smoke teacher is trained once."""
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, teacher_cache: Path) -> Path:
    """The smoke recipe run once, end to end, in one process; returns its run directory."""
    out = tmp_path_factory.mktemp("smoke")
    check_ok(run_train(str(SMOKE), f"run.output_dir={out}", f"teacher.cache_dir={teacher_cache}"))
    return out / "smoke"
