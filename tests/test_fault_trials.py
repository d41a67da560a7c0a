"""scripts/fault_trials.py end to end, kept short: two kill/resume trials on the smoke recipe,
and (extended tier, make test-all) a 45 s soak that must sample resident memory and keep its
growth under a bound.

The plain smoke recipe (--no-hard) shares the session's cached smoke teacher with the other
end-to-end tests; the full 20-trial run with every source of randomness on is run by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SMOKE, subprocess_env

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


# Growth = RSS at the last sample vs when epoch 1 is logged. Measured on the 2-core development
# machine (AMD EPYC, load average 7-8 from other jobs): +0.01%, +0.12% and +0.15% over 45 s soaks of
# 7-9 epochs (at most 1.4 MiB of ~950 MiB), and +0.03% over a 3-minute soak of 54 epochs: it levels
# off after the first epochs, so a faster machine fitting more epochs in does not add up. 0.5%
# (~4.8 MiB) is 3x the worst of those; a leak of 128 KiB a step (1 MiB an epoch) injected into the
# training loop read +1.2% over 13 epochs and failed it. The soak runs 45 s: under such load a
# shorter one may log no epoch at all, leaving the growth unmeasured.
SOAK_MAX_GROWTH_PCT = 0.5


@pytest.mark.extended  # a soak: 45 s of training by design
def test_soak_samples_resident_memory_and_bounds_its_growth(tmp_path: Path, teacher_cache: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_script(
        "--soak", "0.75", "--interval", "1", "--recipe", str(SMOKE), "--teacher-cache", str(teacher_cache),
        "--workdir", str(tmp_path / "work"), "--max-growth", str(SOAK_MAX_GROWTH_PCT), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["exit_code"] in (143, -15)  # stopped by SIGTERM, as intended
    # The bound applied: growth was measured, over at least two epochs after the first.
    assert result["epochs"] >= 3 and result["growth_pct"] is not None, proc.stdout[-3000:]
    assert result["growth_pct"] <= result["max_growth_pct"] == SOAK_MAX_GROWTH_PCT
    samples = result["samples"]
    assert len(samples) >= 5 and all(s["rss_mib"] > 0 and s["processes"] >= 1 for s in samples)
    assert samples[-1]["rss_mib"] > 100  # torch, timm and a model in memory
    assert [s["elapsed_s"] for s in samples] == sorted(s["elapsed_s"] for s in samples)
    assert "RSS MiB" in proc.stdout
