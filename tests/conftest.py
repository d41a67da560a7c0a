"""The suite's shared fixtures; the helpers they use live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SMOKE, check_ok, run_train

# Under pytest-xdist (make test: one pytest process per core) each process gets its share of the
# cores, for its own torch and, through OMP_NUM_THREADS, for the runs it starts: more threads than
# cores makes OpenMP's waiting threads spin against each other.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


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
