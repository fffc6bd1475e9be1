"""Trial pools on real local Ray (2 gloo workers): a trial in a warm pool is the trial a fresh worker group runs."""

from __future__ import annotations

import uuid

import torch
from mlflow.tracking import MlflowClient

from raygd.config import load_run_config
from raygd.pool import POOL_TAG, POSITION_TAG, fit_in_pool, start_pools
from raygd.train import fit
from tests.sweeps import write_sweep_spec

DETERMINISTIC = ("train/loss", "train/accuracy", "train/batch_loss", "progress/passes")


def _cfg(idx_dir, uri, *overrides):
    return load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "train.model=logreg",
            "train.num_workers=2",
            "train.global_batch_size=32",
            "train.step_size=0.002",
            "train.target_accuracy=1.0",
            "train.eval_every_steps=5",
            "train.max_passes=1",
            f"tracking.tracking_uri={uri}",
            "tracking.experiment_name=pool",
            *overrides,
        ],
    )


MECHANISMS = {
    "qsgd": ["mechanism.name=quantize", "mechanism.quant_levels=4"],
    "vanilla": [],
    "sgld": ["mechanism.name=sgld", "mechanism.sgld_sigma=0.05"],
    "dropconnect": [
        "mechanism.name=dropconnect",
        "mechanism.drop_prob=0.3",
        "mechanism.dropconnect_granularity=per_example",
    ],
}


def _history(uri, run_id):
    client = MlflowClient(uri)
    return {
        k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
        for k in DETERMINISTIC
    }


def _in_fresh_pool(cfgs, path, sweep_id=None):
    pools = start_pools(cfgs[0], count=1, sweep_id=sweep_id or uuid.uuid4().hex[:8], storage_path=str(path / "ray"))
    try:
        return [fit_in_pool(cfg, pools.name, save_model_to=str(path / f"{i}.pt")) for i, cfg in enumerate(cfgs)]
    finally:
        pools.stop()


def test_a_trial_after_others_in_a_warm_pool_matches_it_alone(ray_session, idx_dir, sqlite_uri, tmp_path):
    """One warm pool runs four mechanisms in turn, each leaving its own state behind (a quantizer, noise,
    masks); vanilla after qsgd and dropconnect after sgld train exactly as in a fresh group (their own
    ``fit``, and dropconnect first in a fresh pool)."""
    cfgs = [_cfg(idx_dir, sqlite_uri, *MECHANISMS[m]) for m in ("qsgd", "vanilla", "sgld", "dropconnect")]
    warm = _in_fresh_pool(cfgs, tmp_path / "warm")
    alone = _in_fresh_pool([cfgs[3]], tmp_path / "alone")
    per_trial = {i: fit(cfgs[i], save_model_to=str(tmp_path / f"fit{i}.pt")) for i in (1, 3)}  # trial_pool: false

    references = {  # warm trial -> (summary, saved weights) of the same trial alone
        1: [(per_trial[1], tmp_path / "fit1.pt")],
        3: [(alone[0], tmp_path / "alone" / "0.pt"), (per_trial[3], tmp_path / "fit3.pt")],
    }
    for i, refs in references.items():
        ours = torch.load(tmp_path / "warm" / f"{i}.pt", weights_only=True)
        for _, path in refs:
            theirs = torch.load(path, weights_only=True)
            assert theirs.keys() == ours.keys()
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6)
        history = _history(sqlite_uri, warm[i].run_id)
        assert history["train/loss"] and all(_history(sqlite_uri, s.run_id) == history for s, _ in refs), i
        assert all(s.steps == warm[i].steps for s, _ in refs), i

    client = MlflowClient(sqlite_uri)
    tags = [client.get_run(s.run_id).data.tags for s in warm]
    assert {t[POOL_TAG] for t in tags} == {"0"}
    assert [t[POSITION_TAG] for t in tags] == ["1", "2", "3", "4"]
    for s in warm:
        run = client.get_run(s.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["raygd.status"] == s.status
        assert run.data.metrics["overhead/fit_to_first_step_s"] > 0
    for s in [*warm, per_trial[1]]:  # MLflow's system metrics, from the pool's rank 0 and from a fit's rank 0
        metrics = client.get_run(s.run_id).data.metrics
        assert metrics["system/system_memory_usage_megabytes"] > 0, sorted(metrics)
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100


def _sweep_spec(tmp_path, idx_dir, uri, name, space, train, **extra):
    from tuning.spec import load_sweep_spec

    return load_sweep_spec(str(write_sweep_spec(tmp_path, idx_dir, uri, name, space, train, **extra)))


def _no_duplicate_steps(client, run_id):
    for key in ("train/loss", "train/accuracy", "time/train_s"):
        steps = [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]
        assert steps and steps == sorted(set(steps)), (key, steps)


def test_a_pool_worker_killed_mid_trial_restarts_the_group_and_the_sweep_completes(
    ray_session, idx_dir, sqlite_uri, tmp_path
):
    import os
    import signal
    import threading
    import time

    from raygd.records import child_runs
    from tests.test_reliability import _alive_train_workers
    from tuning.sweep import run_sweep

    # The CNN at small step sizes trains for seconds per trial, checkpointing at every evaluation.
    spec = _sweep_spec(
        tmp_path,
        idx_dir,
        sqlite_uri,
        "pool-kill",
        {"step_size": [0.01, 0.012, 0.014, 0.016]},
        {"model": "mnist_cnn", "target_accuracy": 0.9, "max_passes": 40, "eval_every_steps": 5, "max_failures": 1},
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["sweep"] = run_sweep(spec)
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    storage, deadline = tmp_path / "ray_results", time.monotonic() + 300
    while not [p for p in storage.rglob("model.pt") if "raygd-pool-" in str(p)]:  # a trial has checkpointed
        assert thread.is_alive() and time.monotonic() < deadline, f"no checkpoint was written: {outcome}"
        time.sleep(0.05)
    in_flight = next(p for p in storage.rglob("model.pt") if "raygd-pool-" in str(p)).parent.name.split("-step_")[0]
    victims = _alive_train_workers()
    assert len(victims) == 2, victims
    os.kill(max(victims, key=lambda a: a.pid).pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome

    client = MlflowClient(sqlite_uri)
    children = child_runs(sqlite_uri, outcome["sweep"].parent_run_id)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["train.step_size"] for c in children) == ["0.01", "0.012", "0.014", "0.016"]
    assert all(c.data.tags["raygd.status"] == "reached_target" for c in children)
    killed = client.get_run(in_flight)
    assert killed.data.tags["raygd.attempt"] == "2" and killed.data.metrics["train/restarts"] == 1.0
    assert {c.data.tags[POOL_TAG] for c in children} == {"0"}
    for c in children:
        _no_duplicate_steps(client, c.info.run_id)
