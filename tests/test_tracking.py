"""MLflow records on a real SQLite store: rank-zero seam, nesting, redaction, provenance."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from raygd.tracking import PARENT_TAG, Tracker, create_run, provenance_tags, redact_uri


def test_tracker_logs_steps_on_rank_zero_only(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {"train.step_size": 0.1}, {"k": "v"})
    Tracker(sqlite_uri, run_id, enabled=False).log_metrics({"train/loss": 9.0}, step=1)
    rank0 = Tracker(sqlite_uri, run_id, enabled=True)
    for step, loss in ((10, 1.0), (20, 0.5), (30, float("nan"))):
        rank0.log_metrics({"train/loss": loss}, step=step)
    rank0.finish()
    client = MlflowClient(sqlite_uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 1.0), (20, 0.5)]
    run = client.get_run(run_id)
    assert run.data.params["train.step_size"] == "0.1" and run.info.status == "FINISHED"


def test_disabled_tracker_needs_no_store():
    tracker = Tracker(None, None, enabled=True)
    assert not tracker.enabled
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.finish()


def test_child_run_points_at_its_parent(sqlite_uri):
    parent = create_run(sqlite_uri, "exp", "parent", {}, {})
    child = create_run(sqlite_uri, "exp", "child", {}, {}, parent_run_id=parent)
    assert MlflowClient(sqlite_uri).get_run(child).data.tags[PARENT_TAG] == parent


@pytest.mark.parametrize(
    "uri, secret",
    [
        ("http://alice:s3cret@mlflow.internal:5000", "s3cret"),
        ("postgresql://u:hunter2@db/mlflow", "hunter2"),
        ("https://host/path?token=abc123&x=1", "abc123"),
    ],
)
def test_passwords_in_uris_are_redacted_in_params(sqlite_uri, uri, secret):
    assert secret not in redact_uri(uri) and "***" in redact_uri(uri)
    run_id = create_run(sqlite_uri, "exp", "r", {"tracking.tracking_uri": uri}, {})
    assert secret not in MlflowClient(sqlite_uri).get_run(run_id).data.params["tracking.tracking_uri"]


def test_provenance_tags_name_versions_and_commit():
    tags = provenance_tags({"cluster.num_workers": 2})
    for key in ("raygd.version", "raygd.git_commit", "ray.version", "torch.version", "mlflow.version"):
        assert tags[key]
    assert tags["cluster.num_workers"] == "2"


@pytest.mark.parametrize("uri", ["sqlite:////abs/path/mlflow.db", "sqlite:///mlflow.db", "http://127.0.0.1:5000"])
def test_uris_without_secrets_are_logged_unchanged(uri):
    assert redact_uri(uri) == uri


def test_store_checks_name_the_tracking_uri(tmp_path):
    from raygd.config import ConfigError
    from raygd.tracking import check_tracking_store

    check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a writable folder: fine
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri .* does not exist"):
        check_tracking_store(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri = 'http://u:\*\*\*@127.0.0.1:1' cannot be reached"):
        check_tracking_store("http://u:pw@127.0.0.1:1")  # the password is not echoed either


def test_a_shipped_job_records_the_commit_it_was_submitted_from(monkeypatch):
    from raygd.tracking import git_commit

    monkeypatch.setenv("RAYGD_GIT_COMMIT", "abc123-dirty")
    assert provenance_tags()["raygd.git_commit"] == "abc123-dirty"
    monkeypatch.delenv("RAYGD_GIT_COMMIT")
    assert git_commit() != "abc123-dirty"


def test_a_restarted_tracker_logs_only_steps_after_those_recorded(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {}, {})
    first = Tracker(sqlite_uri, run_id, enabled=True)
    assert first.resume_point("train/loss") == (-1, None)
    for step in (0, 5, 10):
        first.log_metrics({"train/loss": float(step)}, step=step)
    again = Tracker(sqlite_uri, run_id, enabled=True)
    again.logged_through = again.resume_point("train/loss")[0]
    assert again.logged_through == 10
    for step in (5, 10, 15):  # redone after the checkpoint at step 5
        again.log_metrics({"train/loss": 100.0 + step}, step=step)
    history = MlflowClient(sqlite_uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (5, 5.0), (10, 10.0), (15, 115.0)]


def test_tracker_reads_the_run_status(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {}, {})
    tracker = Tracker(sqlite_uri, run_id, enabled=True)
    assert tracker.status() == "RUNNING"
    tracker.finish("KILLED")
    assert tracker.status() == "KILLED" and Tracker(sqlite_uri, run_id, enabled=False).status() is None


def test_a_run_records_its_training_data_as_an_mlflow_dataset_input(sqlite_uri, idx_dir):
    from raygd.config import load_run_config
    from raygd.data import load_data
    from raygd.tracking import log_dataset

    digests = []
    for r in (1, 2):
        cfg = load_run_config(None, [f"data.data_dir={idx_dir}", f"data.replication={r}"])
        data = load_data(cfg.data, 0)
        run_id = create_run(sqlite_uri, "datasets", f"r{r}", {}, {})
        log_dataset(sqlite_uri, run_id, cfg.data, data)
        (logged,) = MlflowClient(sqlite_uri).get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.name == ("fashion_mnist" if r == 1 else "fashion_mnist-r2")
        assert [(t.key, t.value) for t in logged.tags] == [("mlflow.data.context", "training")]
        profile = json.loads(logged.dataset.profile)
        assert profile["num_rows"] == data.n == 600 and profile["num_classes"] == 10 and profile["replication"] == r
        digests.append(logged.dataset.digest)
    assert digests[0] != digests[1]  # replicated data is a different data set


def test_a_trial_run_is_named_by_what_it_varies(idx_dir):
    from raygd.config import load_run_config
    from tuning.trial import run_name

    cfg = load_run_config(None, ["train.global_batch_size=256", "train.step_size=0.1", "data.replication=4"])
    assert run_name("dropconnect(p=0.4)", cfg, "search") == "dropconnect(p=0.4) B=256 γ=0.1 seed=0 r=4"
    assert run_name("vanilla", load_run_config(None, []), "confirm").endswith(" (confirm)")


def test_buffered_metrics_reach_the_store_at_the_interval_and_on_leaving(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {}, {})
    client, tracker = MlflowClient(sqlite_uri), Tracker(sqlite_uri, run_id, enabled=True)
    stored = lambda: [m.step for m in client.get_metric_history(run_id, "train/loss")]  # noqa: E731
    with tracker.buffered(flush_every_s=3600):
        for step in (1, 2, 3):
            tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
        assert stored() == []  # held back: no write per evaluation
    assert stored() == [1, 2, 3]
    with tracker.buffered(flush_every_s=0.0):  # every call due: written at once, as outside the block
        tracker.log_metrics({"train/loss": 0.1}, step=4)
        assert stored() == [1, 2, 3, 4]


def test_a_block_that_raises_still_sends_its_metrics_before_the_run_ends(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {}, {})
    tracker = Tracker(sqlite_uri, run_id, enabled=True)
    with pytest.raises(RuntimeError), tracker.buffered(flush_every_s=3600):
        tracker.log_metrics({"a": 1.0}, step=1)
        raise RuntimeError("boom")
    with tracker.buffered(flush_every_s=3600):
        tracker.log_metrics({"a": 2.0}, step=2)
        tracker.finish()  # the run's end never overtakes what it logged
        assert MlflowClient(sqlite_uri).get_run(run_id).info.status == "FINISHED"
        assert [m.value for m in MlflowClient(sqlite_uri).get_metric_history(run_id, "a")] == [1.0, 2.0]


def test_more_held_metrics_than_one_log_batch_takes_are_sent_in_several(sqlite_uri):
    run_id = create_run(sqlite_uri, "exp", "r", {}, {})
    tracker = Tracker(sqlite_uri, run_id, enabled=True)
    with tracker.buffered(flush_every_s=3600):
        for step in range(1, 1201):  # 2400 metrics: over MLflow's 1000 per call
            tracker.log_metrics({"a": float(step), "b": -float(step)}, step=step)
    history = MlflowClient(sqlite_uri).get_metric_history(run_id, "b")
    assert sorted((m.step, m.value) for m in history) == [(s, -float(s)) for s in range(1, 1201)]
