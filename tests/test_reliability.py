"""Reliability on real Ray and MLflow: a Train worker killed mid-run resumes from its checkpoint."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from mlflow.tracking import MlflowClient

from raygd.config import load_run_config
from raygd.train import fit
from tests.conftest import alive_actors, ray_state


def _alive_train_workers() -> list:
    import ray

    return alive_actors(ray, "RayTrainWorker")


def _registered_checkpoint(storage) -> bool:
    """Ray Train has recorded a checkpoint (its snapshot in storage names one), not only written its files:
    a worker killed between writing and reporting a checkpoint restarts from the one before (step 0)."""
    return any(
        re.search(r"step_\d+", snapshot.read_text(errors="replace"))
        for snapshot in storage.rglob("checkpoint_manager_snapshot.json")
    )


def test_killed_worker_resumes_from_its_checkpoint(ray_session, idx_dir, sqlite_uri, tmp_path):
    # A small step size keeps the run going for ~100 updates, checkpointed every 5 (a barrier each),
    # so there is time to kill a worker after the first checkpoint and before the target.
    cfg = load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "train.model=mnist_cnn",
            "train.num_workers=2",
            "train.global_batch_size=32",
            "train.step_size=0.01",
            "train.target_accuracy=0.9",
            "train.eval_every_steps=5",
            "train.max_passes=40",
            "train.max_failures=1",
            f"tracking.tracking_uri={sqlite_uri}",
            "tracking.experiment_name=kill",
        ],
    )
    storage = tmp_path / "ray-storage"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = fit(cfg, storage_path=str(storage))
        except BaseException as err:
            outcome["error"] = err

    # Earlier tests' Train workers may still be going down in this session (holding its 2 CPUs): wait for them,
    # so this fit starts at once, and never pick one of theirs as the victim.
    import ray

    settle = time.monotonic() + 180
    while time.monotonic() < settle and (_alive_train_workers() or ray.available_resources().get("CPU", 0) < 2):
        time.sleep(1)
    earlier = {a.pid for a in _alive_train_workers()}
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while not _registered_checkpoint(storage):  # the first checkpoint is in storage and recorded by Ray
        alive = thread.is_alive() and time.monotonic() < deadline
        assert alive, f"no checkpoint was written: {outcome}; {ray_state(ray)}"
        time.sleep(0.05)
    victims = [a for a in _alive_train_workers() if a.pid not in earlier]
    assert len(victims) == 2, (victims, earlier)
    killed_pid = max(victims, key=lambda a: a.pid).pid
    os.kill(killed_pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome

    summary = outcome["summary"]
    assert summary.status == "reached_target" and summary.final_train_accuracy >= 0.9
    assert summary.extra["train/restarts"] == 1.0
    assert killed_pid not in {a.pid for a in _alive_train_workers()}
    client = MlflowClient(sqlite_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raygd.attempt"] == "2"
    assert run.data.metrics["train/restarts"] == 1.0
    for key in ("train/loss", "train/accuracy", "time/train_s"):
        history = client.get_metric_history(summary.run_id, key)
        steps = [m.step for m in sorted(history, key=lambda m: m.timestamp)]
        assert steps == sorted(set(steps)) and steps[-1] == summary.steps, (key, steps)
    # The clock went on from the checkpoint: logged training time never goes backwards.
    clock = [m.value for m in sorted(client.get_metric_history(summary.run_id, "time/train_s"), key=lambda m: m.step)]
    assert clock == sorted(clock) and summary.time_to_accuracy_s >= clock[-2]
