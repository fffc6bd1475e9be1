"""Integration: real Ray Tune sweeps (TorchTrainer per trial) recorded in a real MLflow SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tuning.spec import load_sweep_spec
from tuning.sweep import KEY_TAG, PHASE_TAG, child_runs, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _write_spec(tmp_path, idx_dir, sqlite_uri, name, space, **extra) -> Path:
    spec = {
        "name": name,
        "base": {"data": {"data_dir": str(idx_dir), "eval_size": 600},
                 "train": {"model": "logreg", "num_workers": 2, "target_accuracy": 0.9, "max_passes": 3,
                           "eval_every_steps": 4, "global_batch_size": 32},
                 "tracking": {"tracking_uri": sqlite_uri}},
        "space": space, "storage_path": str(tmp_path / "ray_results"), **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_four_trial_sweep_has_one_parent_four_children_and_the_right_winner(ray_session, tmp_path, idx_dir,
                                                                            sqlite_uri):
    # step size 1e-4 never reaches 90% in 3 passes: the sweep must rank it last, not crash.
    path = _write_spec(tmp_path, idx_dir, sqlite_uri, "it-sweep",
                       {"step_size": [0.05, 1e-4], "mechanism": [{"name": "vanilla"}, {"name": "sgld",
                                                                                        "sgld_sigma": 0.001}]},
                       confirm_seeds=[7])
    outcome = run_sweep(load_sweep_spec(str(path)))
    client = MlflowClient(sqlite_uri)
    children = child_runs(sqlite_uri, outcome.parent_run_id)
    confirm = [c for c in children if c.data.tags[PHASE_TAG] == "confirm"]
    children = [c for c in children if c.data.tags[PHASE_TAG] == "search"]
    # the confirm phase re-runs each mechanism's winner (step 0.05) with the new seed
    assert sorted((c.data.tags["raygd.mechanism_label"], c.data.params["train.step_size"], c.data.params["train.seed"])
                  for c in confirm) == [("sgld(sigma=0.001)", "0.05", "7"), ("vanilla", "0.05", "7")]
    assert "Confirmed with fresh seeds" in outcome.table
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags[KEY_TAG] for c in children}) == 4
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"summary.csv", "summary.md", "time_vs_batch.png", "speedup.png"} <= artifacts
    reached = [c for c in children if "time_to_accuracy_s" in c.data.metrics]
    assert {float(c.data.params["train.step_size"]) for c in reached} == {0.05}
    fastest = min(reached, key=lambda c: c.data.metrics["time_to_accuracy_s"])
    winner = min((r for r in outcome.best_rows if r.time_to_accuracy_s is not None),
                 key=lambda r: r.time_to_accuracy_s)
    assert winner.mechanism == fastest.data.tags["raygd.mechanism_label"]
    assert winner.time_to_accuracy_s == fastest.data.metrics["time_to_accuracy_s"]
    assert "vanilla" in outcome.table and "sgld(sigma=0.001)" in outcome.table

    # `raygd report` rebuilds the same table and files from MLflow alone
    from raygd.cli import main

    assert main(["report", "it-sweep", "--tracking-uri", sqlite_uri, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "summary.md").read_text().strip() == outcome.table.strip()
    assert {"summary.csv", "trials.csv", "time_vs_batch.png", "speedup.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()}


def _sweep_cmd(path, *extra):
    return [sys.executable, "-m", "raygd.cli", "sweep", str(path), *extra]


def test_resume_after_the_sweep_process_is_killed_makes_no_duplicate_children(tmp_path, idx_dir, sqlite_uri):
    path = _write_spec(tmp_path, idx_dir, sqlite_uri, "resume-sweep",
                       {"step_size": [0.05, 0.1, 0.2], "mechanism": [{"name": "vanilla"}]})
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(_sweep_cmd(path), cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(sqlite_uri)
    deadline = time.time() + 300
    parent = None
    while time.time() < deadline:  # kill once the first trial has finished and the second has started
        exp = client.get_experiment_by_name("resume-sweep")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        if sum(r.info.status == "FINISHED" for r in children) >= 1 and len(children) >= 2:
            parent = children[0].data.tags["mlflow.parentRunId"]
            break
        time.sleep(0.5)
    assert parent, "the sweep did not get going"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (same process group)
    proc.wait()
    done = subprocess.run(_sweep_cmd(path, "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    children = child_runs(sqlite_uri, parent)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags[KEY_TAG] for c in children}) == 3
    assert client.get_run(parent).info.status == "FINISHED"
