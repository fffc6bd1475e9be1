"""Tests for tuning/report.py on a real MLflow store (no Ray): collecting a sweep reads only, closing it ends it."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raygd.records import (
    CONFIRM_PHASE,
    KIND_TAG,
    MECHANISM_LABEL_TAG,
    PHASE_TAG,
    SEARCH_PHASE,
    STATUS_TAG,
    STOPPED_STEP_TAG,
    SWEEP_KIND,
    TRIAL_TAG,
    Status,
)
from raygd.tracking import create_run
from tuning.report import close_sweep, collect_sweep, write_outputs


def _trial(
    uri,
    parent,
    i,
    label,
    step,
    batch,
    seed,
    status,
    ended="FINISHED",
    phase=SEARCH_PHASE,
    tta=None,
    replication=1,
    updates=None,
    **tags,
) -> str:
    params = {
        "train.step_size": step,
        "train.global_batch_size": batch,
        "train.seed": seed,
        "data.replication": replication,
    }
    run_tags = {TRIAL_TAG: f"t{i}", MECHANISM_LABEL_TAG: label, PHASE_TAG: phase, **tags}
    if status is not None:
        run_tags[STATUS_TAG] = status
    run_id = create_run(uri, "rep", f"t{i}", params, run_tags, parent_run_id=parent)
    client = MlflowClient(uri)
    metrics = {"final_train_loss": 0.3 * replication, "final_train_accuracy": 0.9, "passes": 2.0}
    if tta is not None:
        metrics.update(time_to_accuracy_s=tta, passes_to_accuracy=tta / 10)
    if updates is not None:
        metrics["updates_to_accuracy"] = updates
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if ended is not None:
        client.set_terminated(run_id, ended)
    return run_id


@pytest.fixture
def sweep(sqlite_uri):
    """A sweep's parent run and its children: reached, diverged, one stopped by ASHA that its dying trial then
    marked failed, one whose trial died unrecorded (still RUNNING), and a confirm phase."""
    parent = create_run(sqlite_uri, "rep", "sweep-rep", {}, {KIND_TAG: SWEEP_KIND})
    runs = {
        "fast": _trial(sqlite_uri, parent, 0, "vanilla", 0.1, 64, 0, "reached_target", tta=2.0),
        "dc": _trial(sqlite_uri, parent, 1, "dc", 0.1, 64, 0, "reached_target", tta=1.0),
        "div": _trial(sqlite_uri, parent, 2, "vanilla", 9.0, 64, 0, "diverged"),
        "stopped": _trial(
            sqlite_uri, parent, 3, "dc", 0.01, 64, 0, "failed", ended="FAILED", **{STOPPED_STEP_TAG: "4"}
        ),
        "orphan": _trial(sqlite_uri, parent, 4, "dc", 0.02, 64, 0, None, ended=None),
    }
    for seed in (7, 8):
        _trial(sqlite_uri, parent, 10 + seed, "vanilla", 0.1, 64, seed, "reached_target", phase=CONFIRM_PHASE, tta=2.5)
        _trial(sqlite_uri, parent, 20 + seed, "dc", 0.1, 64, seed, "reached_target", phase=CONFIRM_PHASE, tta=1.5)
    return sqlite_uri, parent, runs


def _states(uri, run_ids):
    client = MlflowClient(uri)
    return {k: (client.get_run(r).info.status, client.get_run(r).data.tags.get(STATUS_TAG)) for k, r in run_ids.items()}


def test_collect_reads_records_and_tables_and_changes_nothing(sweep):
    uri, parent, runs = sweep
    before = _states(uri, {**runs, "parent": parent})
    outcome = collect_sweep(uri, parent)
    assert _states(uri, {**runs, "parent": parent}) == before
    assert outcome.parent_run_id == parent and len(outcome.records) == 5  # the confirm runs are not search records
    status = {r.run_id: r.status for r in outcome.records}
    assert status[runs["stopped"]] is Status.STOPPED_EARLY and status[runs["orphan"]] is Status.FAILED
    assert [(r.mechanism, r.time_to_accuracy_s) for r in outcome.best_rows] == [("vanilla", 2.0), ("dc", 1.0)]
    assert "Confirmed with fresh seeds" in outcome.table
    assert "| dc | 0.1 | 64 | 2 | 100% | 1.5 ± 0 | 0.15 ± 0 | 1.67 ± 0.00 [1.67–1.67] |" in outcome.table


def test_close_ends_unfinished_children_logs_the_outputs_and_ends_the_parent(sweep):
    uri, parent, runs = sweep
    collected = collect_sweep(uri, parent)
    outcome = close_sweep(uri, parent)
    assert _states(uri, runs) == {
        "fast": ("FINISHED", "reached_target"),
        "dc": ("FINISHED", "reached_target"),
        "div": ("FINISHED", "diverged"),
        "stopped": ("KILLED", "stopped_early"),
        "orphan": ("FAILED", "failed"),
    }
    assert (outcome.table, outcome.best_rows) == (collected.table, collected.best_rows)
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["num_trials"] == 5 and run.data.metrics["num_reached"] == 2
    assert run.data.metrics["speedup/dc"] == pytest.approx(2.0)
    assert {a.path for a in client.list_artifacts(parent)} == {
        "summary.md",
        "summary.csv",
        "pairs.md",
        "pairs.csv",
        "trials.csv",
        "time_vs_batch.png",
        "speedup.png",
    }
    assert collect_sweep(uri, parent).table == outcome.table
    assert run.data.tags["mlflow.note.content"] == outcome.table  # the run page's description is the answer


def test_write_outputs_adds_the_loss_ratio_figure_for_several_replications(sqlite_uri, tmp_path):
    parent = create_run(sqlite_uri, "rep", "sweep-rep", {}, {KIND_TAG: SWEEP_KIND})
    for i, (r, batch) in enumerate([(1, 16), (1, 512), (2, 16), (2, 512)]):
        _trial(sqlite_uri, parent, i, "vanilla", 0.1, batch, 0, "max_passes", replication=r)
    outcome = collect_sweep(sqlite_uri, parent)
    paths = write_outputs(tmp_path, outcome.records, outcome.best_rows, outcome.table)
    assert [p.name for p in paths] == [
        "summary.md",
        "summary.csv",
        "pairs.md",
        "pairs.csv",
        "trials.csv",
        "time_vs_batch.png",
        "speedup.png",
        "loss_ratio_vs_r.png",
        "critical.csv",
        "critical_batch.png",
    ]
    assert (tmp_path / "summary.md").read_text() == outcome.table + "\n"


def test_several_batch_sizes_give_the_critical_batch_size_in_every_answer(sqlite_uri):
    """B_crit with its interval in the printed table, summary.md, the run's description and its metrics."""
    parent = create_run(sqlite_uri, "rep", "sweep-crit", {}, {KIND_TAG: SWEEP_KIND})
    i = 0
    for batch in (16, 32, 64, 128, 256):
        for seed, noise in enumerate((0.95, 1.05)):
            updates = round(100 * (1 + 64 / batch) * noise)
            _trial(
                sqlite_uri, parent, i, "vanilla", 0.1, batch, seed, "reached_target", tta=updates / 10, updates=updates
            )
            i += 1
    outcome = close_sweep(sqlite_uri, parent)
    (fit,) = outcome.critical
    assert fit.b_crit == pytest.approx(64, rel=0.05)
    for text in (outcome.table, outcome.console_table):
        assert "| B_crit |" in text and f"| vanilla | {float(f'{fit.b_crit:.3g}'):g} (" in text
    run = MlflowClient(sqlite_uri).get_run(parent)
    assert run.data.tags["mlflow.note.content"] == outcome.table
    assert run.data.metrics["critical_batch/vanilla"] == pytest.approx(fit.b_crit)
    assert (
        run.data.metrics["critical_batch/vanilla_low"] <= fit.b_crit <= run.data.metrics["critical_batch/vanilla_high"]
    )
    artifacts = {a.path for a in MlflowClient(sqlite_uri).list_artifacts(parent)}
    assert {"critical.csv", "critical_batch.png"} <= artifacts
