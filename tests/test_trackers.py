"""run.trackers: Accelerate's trackers beside TensorBoard (distill/tracking.py).

MLflow stands in for the trackers that need a package: its file store writes locally, with no
server and no network, and reads back what it was sent. Its tests skip when mlflow is not
installed (pip install 'distill[mlflow]').
"""

from __future__ import annotations

import json
import signal
import typing
from pathlib import Path
from typing import Any

import pytest

from distill.errors import RecipeError
from distill.recipe.schema import TrackerName, load_recipe
from distill.run.tracking import TRACKERS_FILE, RunLog, check_trackers, missing_trackers
from tests.helpers import SMOKE, check_ok, read_metrics, run_train, signal_after_checkpoint

ALL = list(typing.get_args(TrackerName))


def test_the_schema_names_every_tracker_accelerate_has() -> None:
    from accelerate.utils import LoggerType

    assert set(ALL) == {str(t) for t in LoggerType} - {"all"}
    assert load_recipe(None).run.trackers == ["tensorboard"]


def test_run_trackers_in_a_recipe() -> None:
    assert load_recipe(None, ["run.trackers=[tensorboard, mlflow]"]).run.trackers == ["tensorboard", "mlflow"]
    assert load_recipe(None, ["run.trackers=mlflow"]).run.trackers == ["mlflow"]  # one name: a list of one
    assert load_recipe(None, ["run.trackers=[]"]).run.trackers == []  # metrics.jsonl only
    with pytest.raises(RecipeError, match=r"'run.trackers': names a tracker twice: \['mlflow', 'mlflow'\]"):
        load_recipe(None, ["run.trackers=[mlflow, mlflow]"])
    with pytest.raises(RecipeError, match=r"'run.trackers.0': Input should be 'tensorboard', 'wandb', 'mlflow'"):
        load_recipe(None, ["run.trackers=[neptune]"])


def test_a_missing_tracker_package_is_one_message_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    check_trackers(["tensorboard"])  # a core dependency: never missing
    with pytest.raises(RecipeError) as err:
        check_trackers(["tensorboard", "mlflow", "comet_ml"])
    assert str(err.value) == (
        "run.trackers names mlflow, comet_ml, whose package is not installed; install it with "
        "pip install 'distill[mlflow,comet-ml]', or leave it out of run.trackers"
    )


def test_train_refuses_a_missing_tracker_before_anything_runs(tmp_path: Path) -> None:
    missing = missing_trackers(ALL)
    if not missing:
        pytest.skip("every tracker's package is installed here")
    proc = run_train(str(SMOKE), f"run.output_dir={tmp_path}", f"run.trackers=[tensorboard, {missing[0]}]")
    assert proc.returncode == 2
    extra = missing[0].replace("_", "-")
    assert f"error: run.trackers names {missing[0]}, whose package is not installed" in proc.stderr
    assert f"pip install 'distill[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "smoke").exists() and "teacher" not in proc.stdout  # nothing trained


# MLflow ---------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """MLflow's local file store under tmp_path (also for subprocesses, through the environment);
    returns a client that reads it."""
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants a database otherwise
    for var in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return mlflow.MlflowClient(tracking_uri=f"file:{store}")


def history(client: Any, experiment: str) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    """(the experiment's only run, {metric: [(step, value)] in step order})."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    metrics = {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics
    }
    return run, metrics


def record(step: int, epoch: int, top1: float) -> dict[str, Any]:
    return {"epoch": epoch, "step": step, "train/loss": 1.0 / step, "val/top1_fused": top1, "val/kl": float("nan")}


def test_mlflow_gets_the_scalars_the_evaluations_and_the_recipe(tmp_path: Path, mlflow_store: Any) -> None:
    run_dir = tmp_path / "study" / "soft-seed0"
    run_dir.mkdir(parents=True)
    log = RunLog(run_dir, True, trackers=["tensorboard", "mlflow"], config={"distillation.tau": 3.0, "run.seed": 0})
    for step in (2, 4):
        log.scalars({"train/loss": 1.0 / step, "lr": 0.1, "train/loss_kd": float("inf")}, step)
    log.evaluation(record(4, 1, 0.5))
    log.close()
    run, metrics = history(mlflow_store, "study")  # project: the directory that holds the run
    assert run.info.run_name == "soft-seed0" and run.data.params == {"distillation.tau": "3.0", "run.seed": "0"}
    assert metrics == {
        "train/loss": [(2, 0.5), (4, 0.25)],
        "lr": [(2, 0.1), (4, 0.1)],
        "val/top1_fused": [(4, 0.5)],  # val/kl nan and train/loss_kd inf are not sent, as in TensorBoard
    }
    assert (run_dir / "tb").is_dir() and read_metrics(run_dir)[0]["val/top1_fused"] == 0.5
    state = json.loads((run_dir / TRACKERS_FILE).read_text())
    assert state == {"mlflow": {"step": 4, "keys": ["lr", "train/loss", "val/top1_fused"], "id": run.info.run_id}}


def test_a_resumed_run_logs_into_the_same_mlflow_run_without_repeating_steps(tmp_path: Path, mlflow_store: Any) -> None:
    """Killed at step 6 after the scalars of step 6 but before that step's evaluation, resumed from
    the checkpoint of step 4 (epoch 1): the tracker reads like an uninterrupted run's."""

    def session(run_dir: Path, steps: list[int], evals: list[int], resume: tuple[int, int] = (0, 0)) -> None:
        log = RunLog(run_dir, True, *resume, trackers=["mlflow"], config={"run.keep_checkpoints": resume[0] + 1})
        for step in steps:
            log.scalars({"train/loss": 1.0 / step}, step)
            if step in evals:
                log.evaluation(record(step, step // 4, step / 10))
        if resume != (0, 0) or 8 in steps:
            log.close()
        else:  # killed: the process ends with its tracker run open
            log.trackers["mlflow"].finish()

    whole, broken = tmp_path / "whole" / "run", tmp_path / "broken" / "run"
    whole.mkdir(parents=True), broken.mkdir(parents=True)
    session(whole, [2, 4, 6, 8], [4, 6])
    session(broken, [2, 4, 6], [4])
    session(broken, [6, 8], [6], resume=(1, 4))
    (run, metrics), (_, expected) = history(mlflow_store, "broken"), history(mlflow_store, "whole")
    assert metrics == expected == {"train/loss": [(2, 0.5), (4, 0.25), (6, 1 / 6), (8, 0.125)],
                                   "val/top1_fused": [(4, 0.4), (6, 0.6)]}  # fmt: skip
    assert run.data.params == {"run.keep_checkpoints": "1"}  # the configuration the run started with
    assert [row["step"] for row in read_metrics(broken)] == [4, 6]


def test_a_resume_repairs_mlflow_metric_files_a_kill_cut(tmp_path: Path, mlflow_store: Any) -> None:
    """Killed while MLflow's file store wrote step 4: train/loss's last line cut, val/top1_fused's
    file created but empty (MLflow then refuses to read the run: "Metric ... is malformed"). The
    resume from step 2 drops both and sends step 4 again."""
    run_dir = tmp_path / "cut" / "run"
    run_dir.mkdir(parents=True)
    log = RunLog(run_dir, True, trackers=["mlflow"], config={})
    log.scalars({"train/loss": 0.5}, 2)
    log.trackers["mlflow"].finish()
    (loss,) = (tmp_path / "mlruns").rglob("metrics/train/loss")
    with loss.open("a") as f:
        f.write("1764662400000 0.2")  # the point of step 4, cut before its step and newline
    (loss.parent.parent / "val").mkdir()
    (loss.parent.parent / "val" / "top1_fused").touch()
    log = RunLog(run_dir, True, 0, 2, trackers=["mlflow"], config={})
    log.scalars({"train/loss": 0.25}, 4)
    log.evaluation(record(4, 1, 0.4))
    log.close()
    _, metrics = history(mlflow_store, "cut")
    assert metrics == {"train/loss": [(2, 0.5), (4, 0.25)], "val/top1_fused": [(4, 0.4)]}


def test_a_resume_drops_mlflow_points_sent_but_not_recorded(tmp_path: Path, mlflow_store: Any) -> None:
    """Killed after MLflow wrote step 4 whole but before trackers.json recorded it: the resume
    sends step 4 again, and MLflow holds it once."""
    run_dir = tmp_path / "race" / "run"
    run_dir.mkdir(parents=True)
    log = RunLog(run_dir, True, trackers=["mlflow"], config={})
    log.scalars({"train/loss": 0.5}, 2)
    recorded = (run_dir / TRACKERS_FILE).read_text()
    log.scalars({"train/loss": 0.25}, 4)
    log.evaluation(record(4, 1, 0.4))
    log.trackers["mlflow"].finish()
    (run_dir / TRACKERS_FILE).write_text(recorded)  # the kill landed before step 4 was recorded
    log = RunLog(run_dir, True, 0, 2, trackers=["mlflow"], config={})
    log.scalars({"train/loss": 0.25}, 4)
    log.evaluation(record(4, 1, 0.4))
    log.close()
    _, metrics = history(mlflow_store, "race")
    assert metrics == {"train/loss": [(2, 0.5), (4, 0.25)], "val/top1_fused": [(4, 0.4)]}


@pytest.mark.slow
def test_training_with_mlflow_killed_and_resumed_matches_tensorboard(
    tmp_path: Path, teacher_cache: Path, mlflow_store: Any
) -> None:
    """The smoke recipe with run.trackers=[tensorboard, mlflow], SIGKILL once epoch 1 is logged,
    then the same command: MLflow holds each step once, with TensorBoard's values (TensorBoard
    purges the replayed steps; tests/test_faults.py shows it equals an uninterrupted run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [
        str(SMOKE),
        f"run.output_dir={tmp_path / 'runs'}",
        f"teacher.cache_dir={teacher_cache}",
        "run.trackers=[tensorboard, mlflow]",
        "run.export=false",
    ]
    run_dir = tmp_path / "runs" / "smoke"
    signal_after_checkpoint(args, run_dir / "metrics.jsonl", signal.SIGKILL)
    assert not (run_dir / "summary.json").exists()
    check_ok(run_train(*args))
    run, metrics = history(mlflow_store, "runs")
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = [t for t in ea.Tags()["scalars"] if not t.startswith(("throughput/", "hparam/"))]
    assert sorted(tags) == sorted(k for k in metrics if not k.startswith("throughput/"))
    for tag in tags:
        assert metrics[tag] == [(e.step, pytest.approx(e.value, rel=1e-6)) for e in ea.Scalars(tag)], tag
    rows = read_metrics(run_dir)
    assert metrics["val/top1_fused"] == [(r["step"], r["val/top1_fused"]) for r in rows]
    assert run.info.run_name == "smoke" and run.data.params["distillation.type"] == "hard"
    assert run.data.params["run.trackers"] == "['tensorboard', 'mlflow']"
