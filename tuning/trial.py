"""One trial of a sweep: the Ray Tune function that fits one run, and what it reports to Tune.

A trial builds and fits a ``TorchTrainer`` through ``raygd.train.fit`` (the Train V2 pattern:
Tune never receives a trainer object) as a child run of the sweep's parent run, and reports
its summary with ``objective_s`` (``tuning.objective``) as its final Tune result. The driver
that runs trials is ``tuning.sweep``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from raygd.batch_schedule import schedule_label
from raygd.records import (
    BATCH_POLICY_TAG,
    CONFIRM_PHASE,
    EXTEND_PHASE,
    EXTEND_ROUND_TAG,
    KEY_TAG,
    MECHANISM_LABEL_TAG,
    PHASE_TAG,
    SEARCH_PHASE,
    STATUS_TAG,
    TRIAL_TAG,
    Status,
    child_runs,
    mlflow_client,
)
from tuning.objective import objective_s
from tuning.spec import SweepSpec, mechanism_label, storage_root

CONFIRM_PARAM = "confirm"
"""The param-space key of the confirm phase: each of its grid values is a winner's trial params."""
EXTEND_PARAM = "extend"
"""The param-space key of a grid-edge extension round (``tuning.edges``): each grid value is a trial's params."""
EXTEND_ROUND_PARAM = "extend_round"
"""Beside ``EXTEND_PARAM``: the round's number, recorded on the trial's run as ``EXTEND_ROUND_TAG``."""
EXTEND_SIZE_PARAM = "extend_trials"
"""Beside ``EXTEND_PARAM`` (``tuning.rounds``): the number of trials in the round, for the console's count."""

_DATA_CACHE: dict[str, Any] = {}
"""The last data set a trial loaded in this process, by data config and seed: a reused trial actor
(``tuning.sweep.REUSE_TRIAL_ACTORS``) skips reloading it (~0.9 s for 10k Fashion-MNIST examples)."""


def trial_result(summary_metrics: dict[str, float], status: str) -> dict[str, Any]:
    """A trial's final Tune result: its summary, status and objective, and the per-evaluation keys
    (train/accuracy, time/train_s, progress/passes) that ASHA reads from every result."""
    acc = summary_metrics.get("final_train_accuracy")
    return {
        **summary_metrics,
        "status": status,
        "objective_s": objective_s(status, summary_metrics.get("time_to_accuracy_s"), acc),
        "train/accuracy": acc if acc is not None else float("nan"),
        "time/train_s": summary_metrics.get("train_time_s", 0.0),
        "progress/passes": summary_metrics.get("passes", 0.0),
    }


def _trial_data(cfg, preloaded: tuple[str, Any] | None = None):
    """The trial's data set: the sweep driver's (``preloaded``: its data key and data set, loaded for the
    data check) when the keys match, else this process's last one, else loaded here. Loading imports
    torchvision, whose import of torch._dynamo costs a cold trial actor ~4 CPU s of the sweep's start."""
    from raygd.data import load_data
    from raygd.pool import data_key

    key = data_key(cfg)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one data set at a time: trials of a grid mostly share it
        if preloaded is not None and preloaded[0] == key:
            _DATA_CACHE[key] = preloaded[1]
        else:
            _DATA_CACHE[key] = load_data(cfg.data, cfg.train.seed)
    return _DATA_CACHE[key]


def run_name(label: str, cfg, phase: str) -> str:
    """A trial's MLflow run name: what it varies, e.g. ``dropconnect(p=0.4) B=256 γ=0.1 seed=0``."""
    t = cfg.train
    name = f"{label} B={t.global_batch_size} γ={t.step_size:g} seed={t.seed}"
    if cfg.data.replication > 1:
        name += f" r={cfg.data.replication}"
    return name + (" (confirm)" if phase == CONFIRM_PHASE else "")


def trial_key(params: dict[str, Any]) -> str:
    """A stable key for a trial's parameters: a resumed sweep finds its earlier child run by it."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _earlier_run(tracking_uri: str, parent_run_id: str, key: str, continuable: bool) -> tuple[Any, str | None]:
    """What an interrupted sweep left of this trial: (a finished child run, None) to report again, else
    (None, the id of a partial run to continue, if ``continuable``); partial runs not continued are deleted."""
    client = mlflow_client(tracking_uri)
    reattach = None
    for run in child_runs(tracking_uri, parent_run_id):
        if run.data.tags.get(KEY_TAG) != key:
            continue
        if run.info.status == "FINISHED":  # finished before an interruption: report it, do not train again
            return run, None
        if continuable and reattach is None:
            reattach = run.info.run_id  # a partial run of an interrupted trial: continue it from its checkpoint
        else:
            client.delete_run(run.info.run_id)  # nothing to continue from: this trial starts over
    return None, reattach


def _fit(cfg, pools_name: str | None, relay: bool, **kwargs):
    """Train the trial in a warm pool (``raygd.pool.fit_in_pool``) or with its own ``TorchTrainer``.

    Evaluations reach Tune only for a scheduler (``relay``): with its own trainer each report is a
    barrier across the workers and the channel to the trial one more actor process; a searcher needs
    only the final report.
    """
    from ray import tune

    if pools_name is not None:
        from raygd.pool import fit_in_pool
        from tuning.objective import provisional_objective

        def to_tune(metrics: dict[str, Any]) -> None:
            tune.report(dict(metrics, objective_s=provisional_objective(metrics)))

        return fit_in_pool(cfg, pools_name, relay=to_tune if relay else None, **kwargs)
    from raygd.train import fit
    from tuning.callbacks import TrialReportCallback

    return fit(cfg, train_callbacks=[TrialReportCallback()] if relay else None, **kwargs)


def run_trial(
    params: dict[str, Any],
    *,
    spec: SweepSpec,
    parent_run_id: str,
    pools_name: str | None = None,
    progress: bool = True,
    preloaded: tuple[str, Any] | None = None,
) -> None:
    """One Tune trial: fit one run (or reuse a finished child run of this trial) and report its summary.

    An interrupted sweep may re-run a trial: a child run with the same parameters that
    finished is reported again without training. A partial one is reattached when the
    trial checkpoints (``train.max_failures`` or ``train.checkpoint_every_steps``): the same
    MLflow run continues from the Ray Train checkpoint of the same name, logging only the
    steps after those already recorded. Without checkpoints it is deleted and redone from
    step 0, so that its time-to-accuracy is not charged for the work the kill threw away.
    Either way the parent keeps exactly one child per trial.

    With ``pools_name`` (the sweep's warm pools, ``raygd.pool``) the training runs in a pool and this
    function relays the pool's evaluations to Tune; otherwise it fits its own ``TorchTrainer``.
    ``progress``: the workers print a line per evaluation (``raygd sweep -v``). ``preloaded``: the
    driver's data set with its key (``raygd.pool.data_key``), used when this trial's data is that one.
    """
    from ray import tune

    entry_wall = time.time()
    phase = CONFIRM_PHASE if CONFIRM_PARAM in params else EXTEND_PHASE if EXTEND_PARAM in params else SEARCH_PHASE
    extend_round = params.get(EXTEND_ROUND_PARAM)
    params = spec.decode(params.get(CONFIRM_PARAM) or params.get(EXTEND_PARAM) or params)
    cfg = spec.run_config(params)
    uri = cfg.tracking.tracking_uri
    trial_id, key = tune.get_context().get_trial_id(), trial_key({**params, "phase": phase})
    finished, reattach = _earlier_run(uri, parent_run_id, key, continuable=bool(cfg.train.checkpoint_interval))
    if finished is not None:
        tune.report(trial_result(finished.data.metrics, finished.data.tags.get(STATUS_TAG, Status.MAX_PASSES.value)))
        return
    label = mechanism_label(params.get("mechanism", cfg.mechanism.__dict__))
    cfg.tracking.run_name = run_name(label, cfg, phase)
    run_tags = {TRIAL_TAG: trial_id, KEY_TAG: key, PHASE_TAG: phase, MECHANISM_LABEL_TAG: label}
    if "batch_schedule" in params:  # the policy's label as the space names it (its table row)
        run_tags[BATCH_POLICY_TAG] = schedule_label(params["batch_schedule"])
    if extend_round is not None:
        run_tags[EXTEND_ROUND_TAG] = str(extend_round)
    kwargs = {
        "progress": progress,
        "data": _trial_data(cfg, preloaded),
        "parent_run_id": parent_run_id,
        "run_id": reattach,
    }
    if pools_name is None:  # its own Train run: checkpoints in the sweep's (shared) storage, as the pools'
        kwargs["storage_path"] = storage_root(spec.storage_path)
    summary = _fit(cfg, pools_name, relay=spec.scheduler != "none", run_tags=run_tags, **kwargs)
    assert summary.run_id is not None, "fit and fit_in_pool record their run"
    mlflow_client(uri).log_metric(
        summary.run_id, "overhead/trial_to_first_step_s", summary.walls["first_step"] - entry_wall, step=summary.steps
    )
    tune.report(trial_result(summary.summary_metrics(), summary.status))
