"""Tests for raygd/records.py: trial records from dicts and from real MLflow runs, the status and its legacy name,
reading a sweep's child runs."""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from raygd.config import ConfigError
from raygd.records import (
    KIND_TAG,
    MECHANISM_LABEL_TAG,
    STATUS_ORDER,
    STATUS_TAG,
    STOPPED_STEP_TAG,
    SWEEP_KIND,
    TRIAL_TAG,
    Status,
    TrialRecord,
    child_runs,
    end_run,
    latest_sweep,
    newest_sweep,
    run_outcome,
)
from raygd.tracking import create_run
from tests.trials import rec

# --------------------------------------------------------------------------- records from dicts


def test_from_dict_tolerates_missing_optional_keys():
    r = TrialRecord.from_dict(
        {
            "trial_id": "x",
            "mechanism": "vanilla",
            "step_size": 0.1,
            "global_batch_size": 64,
            "status": "max_passes",
            "extra": 1,
        }
    )
    assert (r.seed, r.replication, r.time_to_accuracy_s, r.final_train_loss) == (0, 1, None, None)
    assert not r.reached


@pytest.mark.parametrize(
    "status,time,reached",
    [
        ("reached_target", 3.0, True),
        ("reached_target", None, False),
        ("reached_target", math.nan, False),
        ("reached_target", math.inf, False),
        ("max_passes", 3.0, False),
        ("diverged", None, False),
    ],
)
def test_reached_needs_status_and_finite_time(status, time, reached):
    assert TrialRecord.from_dict(rec(time=time, status=status)).reached is reached


def test_unknown_status_raises():
    with pytest.raises(ValueError, match="status"):
        TrialRecord.from_dict(rec(status="finished"))


# --------------------------------------------------------------------------- the status


def test_status_values_are_the_plain_strings_stored_in_mlflow():
    assert [s.value for s in Status] == ["reached_target", "max_passes", "stopped_early", "diverged", "failed"]
    assert tuple(Status) == STATUS_ORDER
    for s in Status:
        assert s == s.value and str(s) == s.value and f"{s}" == s.value and json.dumps(s) == f'"{s.value}"'
    assert {s: s.run_status for s in Status} == {
        Status.REACHED_TARGET: "FINISHED",
        Status.MAX_PASSES: "FINISHED",
        Status.STOPPED_EARLY: "KILLED",
        Status.DIVERGED: "FINISHED",
        Status.FAILED: "FAILED",
    }


@pytest.mark.parametrize("stored", ["failed", "error"])
def test_a_stored_failed_or_legacy_error_reads_as_failed(stored):
    assert Status(stored) is Status.FAILED
    assert TrialRecord.from_dict(rec(status=stored)).status is Status.FAILED


# --------------------------------------------------------------------------- runs in a real MLflow store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for this module's tests (creating one takes seconds); each test makes its own runs."""
    return f"sqlite:///{tmp_path_factory.mktemp('records') / 'mlflow.db'}"


def _sweep_parent(uri: str, experiment: str = "records") -> str:
    return create_run(uri, experiment, "sweep", {}, {KIND_TAG: SWEEP_KIND})


def _child(
    uri: str, parent: str, ended: str | None, tags: dict, metrics: dict | None = None, params: dict | None = None
) -> str:
    run_id = create_run(uri, "records", "trial", params or {}, tags, parent_run_id=parent)
    client = MlflowClient(uri)
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    if ended:
        client.set_terminated(run_id, ended)
    return run_id


@pytest.mark.parametrize(
    "ended,tags,expected",
    [
        ("FINISHED", {STATUS_TAG: "reached_target"}, Status.REACHED_TARGET),
        ("FINISHED", {STATUS_TAG: "diverged"}, Status.DIVERGED),
        ("FAILED", {STATUS_TAG: "failed"}, Status.FAILED),
        ("FINISHED", {STATUS_TAG: "error"}, Status.FAILED),  # a record of an older raygd
        ("FAILED", {STATUS_TAG: "max_passes"}, Status.FAILED),  # the run failed after tagging
        ("FINISHED", {}, Status.FAILED),  # nothing tagged how it ended
        ("KILLED", {STATUS_TAG: "stopped_early", STOPPED_STEP_TAG: "4"}, Status.STOPPED_EARLY),
        ("FAILED", {STATUS_TAG: "failed", STOPPED_STEP_TAG: "4"}, Status.STOPPED_EARLY),  # stopped, then died
        (None, {STOPPED_STEP_TAG: "4"}, Status.STOPPED_EARLY),  # still RUNNING: stopped, not yet ended
        ("KILLED", {}, Status.STOPPED_EARLY),  # stopped by a scheduler under an older raygd
    ],
)
def test_run_outcome_of_a_child_run(store, ended, tags, expected):
    parent = _sweep_parent(store)
    run_id = _child(store, parent, ended, tags)
    assert run_outcome(MlflowClient(store).get_run(run_id)) is expected


def test_trial_record_from_a_run_reads_params_tags_and_summary_metrics(store):
    parent = _sweep_parent(store)
    params = {
        "train.step_size": 0.05,
        "train.global_batch_size": 128,
        "train.seed": 3,
        "data.replication": 2,
        "mechanism.name": "dropconnect",
    }
    metrics = {
        "time_to_accuracy_s": 1.5,
        "passes_to_accuracy": 0.25,
        "updates_to_accuracy": 12,
        "final_train_loss": 0.3,
        "final_train_accuracy": 0.95,
        "passes": 1.0,
        "train_time_s": 4.0,
    }
    run_id = _child(
        store,
        parent,
        "FINISHED",
        {TRIAL_TAG: "t7", STATUS_TAG: "reached_target", MECHANISM_LABEL_TAG: "dropconnect(p=0.4)"},
        metrics,
        params,
    )
    r = TrialRecord.from_run(MlflowClient(store).get_run(run_id))
    assert (r.trial_id, r.run_id, r.mechanism, r.step_size, r.global_batch_size, r.seed, r.replication) == (
        "t7",
        run_id,
        "dropconnect(p=0.4)",
        0.05,
        128,
        3,
        2,
    )
    assert r.status is Status.REACHED_TARGET and r.reached
    assert {k: getattr(r, k) for k in metrics} == metrics
    bare = _child(store, parent, "FAILED", {})  # untagged: named after its run, vanilla, the defaults
    r = TrialRecord.from_run(MlflowClient(store).get_run(bare))
    assert (r.trial_id, r.mechanism, r.global_batch_size, r.seed, r.replication, r.status) == (
        bare,
        "vanilla",
        0,
        0,
        1,
        Status.FAILED,
    )
    assert math.isnan(r.step_size) and r.time_to_accuracy_s is None


def test_child_runs_of_one_sweep_one_trial_or_the_running_ones(store):
    parent, other = _sweep_parent(store), _sweep_parent(store)
    done = _child(store, parent, "FINISHED", {TRIAL_TAG: "a"})
    live = _child(store, parent, None, {TRIAL_TAG: "b"})
    _child(store, other, None, {TRIAL_TAG: "a"})

    def ids(**kw):
        return sorted(r.info.run_id for r in child_runs(store, parent, **kw))

    assert ids() == sorted([done, live])
    assert ids(trial_id="a") == [done] and ids(running_only=True) == [live]
    assert ids(trial_id="a", running_only=True) == []


def test_latest_sweep_is_the_newest_parent_and_a_missing_one_is_a_config_error(store):
    first = _sweep_parent(store, "exp")
    create_run(store, "exp", "not a sweep", {}, {})
    create_run(store, "plain", "not a sweep", {}, {})
    newest = _sweep_parent(store, "exp")
    MlflowClient(store).set_terminated(newest, "FINISHED")
    assert latest_sweep(store, "exp") == newest
    assert newest_sweep(store, "exp", running_only=True).info.run_id == first
    for missing in ("no-such-experiment", "plain"):
        with pytest.raises(ConfigError, match=f"{missing!r} has no raygd sweep"):
            latest_sweep(store, missing)
    assert newest_sweep(store, "no-such-experiment") is None


@pytest.mark.parametrize("status", list(Status))
def test_end_run_tags_the_status_and_ends_the_run_with_its_mlflow_status(store, status):
    run_id = _child(store, _sweep_parent(store), None, {})
    client = MlflowClient(store)
    end_run(client, run_id, status, tags={STOPPED_STEP_TAG: "3"})
    run = client.get_run(run_id)
    assert run.data.tags[STATUS_TAG] == status.value and run.data.tags[STOPPED_STEP_TAG] == "3"
    assert run.info.status == status.run_status
