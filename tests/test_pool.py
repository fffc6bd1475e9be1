"""Trial pools on real local Ray (2 gloo workers): a trial in a warm pool is the trial a fresh worker group runs."""

from __future__ import annotations

import uuid

import pytest
import torch
from mlflow.tracking import MlflowClient

from raygd.config import load_run_config
from raygd.pool import POOL_TAG, POSITION_TAG, fit_in_pool, start_pools
from raygd.train import fit

DETERMINISTIC = ("train/loss", "train/accuracy", "train/batch_loss", "progress/passes")


def _cfg(idx_dir, uri, *overrides):
    return load_run_config(None, [
        f"data.data_dir={idx_dir}", "train.model=logreg", "train.num_workers=2", "train.global_batch_size=32",
        "train.step_size=0.002", "train.target_accuracy=1.0", "train.eval_every_steps=5", "train.max_passes=1",
        f"tracking.tracking_uri={uri}", "tracking.experiment_name=pool", *overrides,
    ])


MECHANISMS = {
    "qsgd": ["mechanism.name=quantize", "mechanism.quant_levels=4"],
    "vanilla": [],
    "sgld": ["mechanism.name=sgld", "mechanism.sgld_sigma=0.05"],
    "dropconnect": ["mechanism.name=dropconnect", "mechanism.drop_prob=0.3",
                    "mechanism.dropconnect_granularity=per_example"],
}


def _history(uri, run_id):
    client = MlflowClient(uri)
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in DETERMINISTIC}


def _in_fresh_pool(cfgs, path, sweep_id=None):
    pools = start_pools(cfgs[0], count=1, sweep_id=sweep_id or uuid.uuid4().hex[:8], storage_path=str(path / "ray"))
    try:
        return [fit_in_pool(cfg, pools.name, save_model_to=str(path / f"{i}.pt")) for i, cfg in enumerate(cfgs)]
    finally:
        pools.stop()


@pytest.mark.parametrize("first, second", [("qsgd", "vanilla"), ("sgld", "dropconnect")])
def test_a_trial_after_another_in_a_warm_pool_matches_it_alone(ray_session, idx_dir, sqlite_uri, tmp_path,
                                                                 first, second):
    a, b = (_cfg(idx_dir, sqlite_uri, *MECHANISMS[m]) for m in (first, second))
    warm = _in_fresh_pool([a, b], tmp_path / "warm")
    alone = _in_fresh_pool([b], tmp_path / "alone")
    per_trial = fit(b, save_model_to=str(tmp_path / "fit.pt"))  # sweep.trial_pool: false

    weights = [torch.load(p, weights_only=True) for p in
               (tmp_path / "warm" / "1.pt", tmp_path / "alone" / "0.pt", tmp_path / "fit.pt")]
    for other in weights[1:]:
        assert other.keys() == weights[0].keys()
        for name in weights[0]:
            torch.testing.assert_close(weights[0][name], other[name], rtol=0, atol=1e-6)
    histories = [_history(sqlite_uri, s.run_id) for s in (warm[1], alone[0], per_trial)]
    assert histories[0]["train/loss"] and histories[0] == histories[1] == histories[2]
    assert warm[1].steps == alone[0].steps == per_trial.steps

    client = MlflowClient(sqlite_uri)
    tags = [client.get_run(s.run_id).data.tags for s in warm]
    assert tags[0][POOL_TAG] == tags[1][POOL_TAG] == "0"
    assert [t[POSITION_TAG] for t in tags] == ["1", "2"]
    for s in warm:
        run = client.get_run(s.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["raygd.status"] == s.status
        assert run.data.metrics["overhead/fit_to_first_step_s"] > 0
