"""bench/paper/archive.py: the paper store and its unfinished sweeps' Tune folders survive a new machine."""

from __future__ import annotations

import tarfile

import pytest

from bench.paper import archive
from raygd.records import KIND_TAG, SWEEP_KIND, TUNE_DIR_TAG, mlflow_client
from raygd.tracking import Tracker, create_run


def _sweep(uri: str, name: str, tune_dir, running: bool) -> str:
    run_id = create_run(
        uri, name, f"sweep-{name}", {"step_size": "0.2"}, {KIND_TAG: SWEEP_KIND, TUNE_DIR_TAG: str(tune_dir)}
    )
    tracker = Tracker(uri, run_id, enabled=True)
    tracker.log_metrics({"best/time_to_accuracy_s": 12.5}, step=3)
    if not running:
        mlflow_client(uri).set_terminated(run_id, "FINISHED")
    return run_id


def test_save_then_restore_on_a_new_machine_gives_the_same_runs_and_tune_folder(tmp_path):
    store = tmp_path / "out" / "mlflow.db"
    uri = f"sqlite:///{store}"
    running, finished = tmp_path / "ray" / "sweep-a", tmp_path / "ray" / "sweep-b"
    for d in (running, finished):
        (d / "trial_1" / "checkpoint_000002").mkdir(parents=True)
        (d / "trial_1" / "checkpoint_000002" / "model.pt").write_bytes(b"x" * 1000)
        (d / "trial_1" / "result.json").write_text('{"done": true}')
        (d / "searcher-state.pkl").write_bytes(b"state")
    a = _sweep(uri, "paper-a", running, running=True)
    b = _sweep(uri, "paper-b", finished, running=False)
    saved = tmp_path / "state.tar.gz"
    manifest = archive.save(uri, saved)
    assert list(manifest["tune_dirs"].values()) == [str(running)]  # only the resumable sweep's folder
    with tarfile.open(saved) as tar:
        assert not [n for n in tar.getnames() if "checkpoint_" in n]

    # the new machine: neither the store nor the Tune folders are there
    store.unlink()
    for d in (running, finished):
        for f in sorted(d.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        d.rmdir()
    archive.restore(store, saved)
    client = mlflow_client(uri)
    assert client.get_run(a).info.status == "RUNNING" and client.get_run(b).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(a, "best/time_to_accuracy_s")] == [12.5]
    assert (running / "searcher-state.pkl").read_bytes() == b"state"
    assert (running / "trial_1" / "result.json").read_text() == '{"done": true}'
    assert not (running / "trial_1" / "checkpoint_000002").exists() and not finished.exists()

    with pytest.raises(SystemExit, match="exists"):  # a store that is there is never replaced silently
        archive.restore(store, saved)
    clone = tmp_path / "clone" / "mlflow.db"  # another checkout: the store goes to its own path
    archive.restore(clone, saved)
    assert mlflow_client(f"sqlite:///{clone}").get_run(a).info.status == "RUNNING"


def test_only_a_sqlite_store_can_be_saved(tmp_path):
    with pytest.raises(SystemExit, match="sqlite"):
        archive.save("http://127.0.0.1:5000", tmp_path / "x.tar.gz")
    with pytest.raises(SystemExit, match="no MLflow store"):
        archive.save(f"sqlite:///{tmp_path / 'none.db'}", tmp_path / "x.tar.gz")
