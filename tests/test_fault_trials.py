"""scripts/fault_trials.py end to end, kept short: two kill/resume trials on the smoke recipe,
and a ~20 s soak that must sample resident memory.

The plain smoke recipe (--no-hard) shares the session's cached smoke teacher with the other
end-to-end tests; the full 20-trial run with every source of randomness on is run by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE, subprocess_env

pytestmark = pytest.mark.slow

SCRIPT = REPO / "scripts" / "fault_trials.py"


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)


def test_two_kill_and_resume_trials_are_identical(tmp_path: Path, teacher_cache: Path) -> None:
    out = tmp_path / "trials.json"
    proc = run_script(
        "--trials", "2", "--no-hard", "--recipe", str(SMOKE), "--teacher-cache", str(teacher_cache),
        "--workdir", str(tmp_path / "work"), "--set", "run.export=false", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 identical to the reference; 0 trials loaded a partial checkpoint" in proc.stdout
    result = json.loads(out.read_text())
    assert result["identical"] == 2 and result["failed"] == [] and len(result["trials"]) == 2
    for trial in result["trials"]:
        assert 0.1 <= trial["delay_frac"] <= 1.0
        assert trial["metrics_identical"] and trial["summary_identical"] and trial["weights_identical"]
        assert not trial["resumed_partial"]


def test_soak_samples_resident_memory(tmp_path: Path, teacher_cache: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_script(
        "--soak", "0.3", "--interval", "1", "--recipe", str(SMOKE), "--teacher-cache", str(teacher_cache),
        "--workdir", str(tmp_path / "work"), "--max-growth", "1000", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["exit_code"] in (143, -15)  # stopped by SIGTERM, as intended
    samples = result["samples"]
    assert len(samples) >= 5 and all(s["rss_mib"] > 0 and s["processes"] >= 1 for s in samples)
    assert samples[-1]["rss_mib"] > 100  # torch, timm and a model in memory
    assert [s["elapsed_s"] for s in samples] == sorted(s["elapsed_s"] for s in samples)
    assert "RSS MiB" in proc.stdout
