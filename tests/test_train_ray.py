"""Integration: real local Ray (2 Train workers, gloo) and a real MLflow SQLite store."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from raygd.config import load_run_config
from raygd.train import fit


def test_two_worker_run_reaches_target_and_is_recorded(ray_session, idx_dir, sqlite_uri):
    cfg = load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "train.model=mnist_cnn",
            "train.num_workers=2",
            "train.global_batch_size=32",
            "train.step_size=0.05",
            "train.target_accuracy=0.9",
            "train.eval_every_steps=5",
            "train.max_passes=5",
            f"tracking.tracking_uri={sqlite_uri}",
            "tracking.experiment_name=it",
            "mechanism.name=sgld",
            "mechanism.sgld_sigma=0.001",
        ],
    )
    summary = fit(cfg)
    assert summary.status == "reached_target" and summary.time_to_accuracy_s > 0
    assert summary.final_train_accuracy >= 0.9

    client = MlflowClient(sqlite_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_experiment_by_name("it").experiment_id
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["mechanism.name"] == "sgld"
    assert params["train.batch_size_per_worker"] == "16" and params["mechanism.granularity"]
    assert run.data.tags["raygd.status"] == "reached_target" and run.data.tags["cluster.num_workers"] == "2"
    for key in ("train/loss", "train/accuracy", "perf/samples_per_s", "perf/step_s"):
        steps = [m.step for m in client.get_metric_history(summary.run_id, key)]
        assert steps and steps == sorted(set(steps)) and steps[-1] == summary.steps
        assert all(s % 5 == 0 for s in steps)
    metrics = run.data.metrics
    assert metrics["time_to_accuracy_s"] == summary.time_to_accuracy_s
    assert metrics["passes_to_accuracy"] == summary.passes_to_accuracy
    assert metrics["final_train_accuracy"] >= 0.9


def test_a_failing_block_marks_its_run_failed_unless_it_was_ended_elsewhere(sqlite_uri):
    """``failing`` (no Ray needed): the run of a fit that raises ends FAILED with raygd.status=failed; a run a
    sweep's early stop already ended keeps its status."""
    import pytest

    from raygd.tracking import Tracker, create_run
    from raygd.train import failing

    client = MlflowClient(sqlite_uri)
    running, stopped = (create_run(sqlite_uri, "it", name, {}, {}) for name in ("running", "stopped"))
    client.set_tag(stopped, "raygd.status", "stopped_early")
    client.set_terminated(stopped, "KILLED")
    for run_id in (running, stopped):
        with pytest.raises(RuntimeError, match="boom"), failing(Tracker(sqlite_uri, run_id, enabled=True)):
            raise RuntimeError("boom")
    assert (client.get_run(running).info.status, client.get_run(running).data.tags["raygd.status"]) == (
        "FAILED",
        "failed",
    )
    assert (client.get_run(stopped).info.status, client.get_run(stopped).data.tags["raygd.status"]) == (
        "KILLED",
        "stopped_early",
    )
