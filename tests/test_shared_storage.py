"""``sweep.storage_path``: checked before Ray starts; on a two-node Ray cluster a sweep whose Train worker is
killed resumes its trial from the checkpoint in the shared storage path.

On one machine every folder is shared by the nodes, as an NFS mount or a bucket is on a real cluster.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from raygd.config import ConfigError
from tests.localray import BIN
from tests.sweeps import write_sweep_spec
from tests.test_submit import cluster  # noqa: F401  (the two-node cluster: head 0 CPUs + a 1-CPU node, MLflow)
from tuning.spec import load_sweep_spec, storage_root
from tuning.sweep import split_storage_dir


@pytest.mark.parametrize(
    "value, named",
    [
        ("ray_results", "it is relative"),
        ("ftp://host/ray_results", "does not read 'ftp'"),
        ("s3:///ray_results", "names no bucket"),
        ("s3://AKIAKEY:secret@bucket/ray_results", "holds credentials"),
        ("file://ray_results", "absolute path (file:///path)"),
        ("s3://YOUR-BUCKET/raygd", "is no bucket name"),  # the cluster configs' placeholder, not yet replaced
        (7, "not a non-empty string"),
    ],
)
def test_a_bad_storage_path_fails_naming_the_field_before_ray(tmp_path, idx_dir, value, named):
    path = write_sweep_spec(tmp_path, idx_dir, "sqlite:///x.db", "s", {"step_size": [0.1]}, storage_path=value)
    with pytest.raises(ConfigError, match=r"sweep\.storage_path") as err:
        load_sweep_spec(str(path))
    assert named in str(err.value) and "s3://bucket/path" in str(err.value)


@pytest.mark.parametrize(
    "value, root, tune_parent",
    [
        ("s3://bucket/raygd/", "s3://bucket/raygd", "s3://bucket/raygd"),
        ("gs://bucket", "gs://bucket", "gs://bucket"),
        ("/mnt/shared/ray_results", "/mnt/shared/ray_results", "/mnt/shared/ray_results"),
        (None, str(Path.home() / "ray_results"), str(Path.home() / "ray_results")),
    ],
)
def test_a_uri_reaches_ray_as_given_and_a_path_absolute(tmp_path, idx_dir, value, root, tune_parent):
    path = write_sweep_spec(tmp_path, idx_dir, "sqlite:///x.db", "s", {"step_size": [0.1]}, storage_path=value)
    spec = load_sweep_spec(str(path))
    assert storage_root(spec.storage_path) == root
    assert split_storage_dir(f"{root}/s-0123456789ab") == (tune_parent, "s-0123456789ab")


def test_the_clusters_storage_path_from_the_environment_is_the_default_a_spec_or_set_overrides(
    tmp_path, idx_dir, monkeypatch
):
    monkeypatch.setenv("RAYGD_STORAGE_PATH", "gs://team-bucket/raygd")
    path = write_sweep_spec(tmp_path, idx_dir, "sqlite:///x.db", "s", {"step_size": [0.1]}, storage_path=None)
    assert load_sweep_spec(str(path)).storage_path == "gs://team-bucket/raygd"
    assert load_sweep_spec(str(path), ["sweep.storage_path=/mnt/nfs/r"]).storage_path == "/mnt/nfs/r"
    given = write_sweep_spec(tmp_path, idx_dir, "sqlite:///x.db", "g", {"step_size": [0.1]})  # its own folder
    assert load_sweep_spec(str(given)).storage_path == str(tmp_path / "ray_results")
    monkeypatch.setenv("RAYGD_STORAGE_PATH", "s3://YOUR-BUCKET/raygd")
    with pytest.raises(ConfigError, match=r"sweep\.storage_path \(from \$RAYGD_STORAGE_PATH\) = 's3://YOUR-BUCKET"):
        load_sweep_spec(str(path))


CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _configured_storage_paths() -> dict[str, str]:
    """RAYGD_STORAGE_PATH as each cluster config sets it for the sweep drivers on the head."""
    import yaml

    found = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        head_start = " ".join(yaml.safe_load(path.read_text()).get("head_start_ray_commands", []))
        match = re.search(r"export RAYGD_STORAGE_PATH=(\S+?);", head_start)
        found[path.name] = match.group(1) if match else ""
    for doc in yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text()):
        if doc and doc.get("kind") == "RayCluster":
            head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            found["kuberay/raycluster.yaml"] = next(
                (e["value"] for e in head.get("env", []) if e["name"] == "RAYGD_STORAGE_PATH"), ""
            )
    return found


def test_every_cluster_config_sets_a_shared_storage_path_that_is_refused_until_its_bucket_is_set():
    from tuning.spec import check_storage_path

    found = _configured_storage_paths()
    assert set(found) == {"aws.yaml", "aws-minimal.yaml", "gcp.yaml", "kuberay/raycluster.yaml"}, found
    for name, value in found.items():
        assert value.startswith(("s3://YOUR-BUCKET/", "gs://YOUR-BUCKET/")), (name, value)
        with pytest.raises(ConfigError, match="no bucket name"):
            check_storage_path(value)
        check_storage_path(value.replace("YOUR-BUCKET", "my-raygd-checkpoints"))


def _registered_checkpoint(storage: Path) -> str | None:
    """The checkpoint Ray Train has recorded for a pool (its snapshot in storage), not one still being written:
    a worker killed between writing and reporting a checkpoint restarts from the one before."""
    for snapshot in storage.glob("raygd-pool-*/checkpoint_manager_snapshot.json"):
        found = re.search(r"[0-9a-f]{32}-step_\d+", snapshot.read_text(errors="replace"))
        if found:
            return found.group(0)
    return None


def _actors(cluster) -> list[dict]:  # noqa: F811
    r = requests.get(
        f"{cluster.dashboard_url}/api/v0/actors",
        params={"limit": 1000, "detail": "true"},
        headers=cluster.auth_headers(),
        timeout=30,
    )
    r.raise_for_status()
    return r.json()["data"]["result"]["result"]


def _train_workers(cluster) -> list[dict]:  # noqa: F811
    return [a for a in _actors(cluster) if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"]


def test_a_killed_worker_on_the_other_node_resumes_its_trial_from_the_shared_storage_path(cluster, tmp_path, idx_dir):  # noqa: F811
    from mlflow.tracking import MlflowClient

    # One trial, one Train worker: the head has no CPUs, so the worker runs on the other node. The CNN at a
    # small step size trains for ~200 updates, checkpointed every 5: time to kill it after the first one.
    shared = cluster.root / "shared"  # both nodes see it (one machine), like an NFS mount on a real cluster
    uri = cluster.mlflow.url  # a remote MLflow server: the trial's system metrics go there over HTTP
    train = {"model": "mnist_cnn", "num_workers": 1, "target_accuracy": 0.9, "max_passes": 40}
    train.update(eval_every_steps=5, max_failures=1)
    spec = write_sweep_spec(tmp_path, idx_dir, uri, "shared-storage", {"step_size": [0.005]}, train)
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.gcs_address, "HOME": str(tmp_path)}
    log = tmp_path / "sweep.log"
    with open(log, "wb") as out:  # -v: the workers' lines (the restart's resume step) reach the driver's output
        sweep = subprocess.Popen(
            [str(BIN / "raygd"), "sweep", str(spec), "-v", "--set", f"sweep.storage_path={shared}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420
        while not _registered_checkpoint(shared):  # the trial's first checkpoint is in storage, and Ray knows it
            assert sweep.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        head = next(n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"])
        workers = _train_workers(cluster)
        assert len(workers) == 1 and workers[0]["node_id"] != head, workers
        os.kill(workers[0]["pid"], signal.SIGKILL)
        assert sweep.wait(timeout=480) == 0, log.read_text()[-4000:]
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    output = log.read_text()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shared-storage")
    assert experiment is not None
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 1
    child = children[0]
    run_id = child.info.run_id
    assert child.info.status == "FINISHED" and child.data.tags["raygd.status"] in ("reached_target", "max_passes")
    assert child.data.tags["raygd.attempt"] == "2" and child.data.metrics["train/restarts"] == 1.0
    # The second attempt started from a checkpoint, not from step 0 ...
    resumed = [int(s) for s in re.findall(r"raygd: restart 1: resuming at step (\d+)", output)]
    assert resumed and resumed[0] >= 5, output[-4000:]
    # ... the trial's checkpoint in the shared storage path, in the pool's Train run, named by the trial's run
    parent = child.data.tags["mlflow.parentRunId"]
    kept = list((shared / f"raygd-pool-{parent}-0").glob(f"**/{run_id}-step_*"))
    assert kept and all((k / "model.pt").is_file() and (k / "rank_0.pt").is_file() for k in kept), sorted(
        str(p.relative_to(shared)) for p in shared.rglob("*.pt")
    )
    assert max(int(k.name.rsplit("_", 1)[1]) for k in kept) >= resumed[0]
    steps = [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.timestamp)]
    assert steps and steps == sorted(set(steps))  # the redone steps were not logged twice
    # MLflow's system metrics of both attempts, through the remote server
    system = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(system) >= 2 and "system/system_memory_usage_megabytes" in child.data.metrics
