"""`raygd diversity`: the table, the MLflow record, and bad flags rejected before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raygd.config import ConfigError, load_run_config
from raygd.diversity import gradient_diversity
from raygd.measure import measure_replications, parse_list
from raygd.models import build_model

REPO = Path(__file__).resolve().parents[1]


def test_rows_match_the_exact_estimator_and_mechanisms_raise_the_bound(idx_dir):
    import torch

    cfg = load_run_config(None, [f"data.data_dir={idx_dir}", "train.model=logreg", "data.train_size=200"])
    rows = measure_replications(cfg, [1, 4], ["vanilla", "sgld", "quantize"])
    assert [(r.replication, r.mechanism) for r in rows] == [
        (1, "vanilla"),
        (1, "sgld"),
        (1, "quantize"),
        (4, "vanilla"),
        (4, "sgld"),
        (4, "quantize"),
    ]
    from raygd.data import load_data

    data = load_data(cfg.data, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model("logreg", data.input_shape, data.num_classes)
    exact = gradient_diversity(model, data.x_train, data.y_train, dtype=torch.float64).batch_bound
    assert rows[0].batch_bound == pytest.approx(exact, rel=1e-9)
    assert rows[0].delta == pytest.approx(exact / 200)
    for r in (1, 4):
        by = {row.mechanism: row.batch_bound for row in rows if row.replication == r}
        assert by["sgld"] >= by["vanilla"] and by["quantize"] >= by["vanilla"]


@pytest.mark.parametrize("text, kind", [("1,x", int), ("0,2", int), ("", int)])
def test_bad_lists_name_the_flag(text, kind):
    with pytest.raises(ConfigError, match="--replication"):
        parse_list(text, kind, "--replication")


def test_cli_prints_the_table_and_records_a_run(tmp_path, idx_dir):
    db = tmp_path / "mlflow.db"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "raygd.cli",
            "diversity",
            str(REPO / "configs/quickstart.yaml"),
            "--set",
            f"data.data_dir={idx_dir}",
            "--set",
            "data.train_size=300",
            "--set",
            "train.model=logreg",
            "--set",
            f"tracking.tracking_uri=sqlite:///{db}",
            "--set",
            "train.max_passes=1",
            "--replication",
            "1,2",
            "--mechanism",
            "vanilla,dropconnect",
            "--along-training",
            "--every",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 2 | dropconnect |" in out.stdout and "B_D" in out.stdout
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("raygd-quickstart").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["raygd.kind"] == "diversity"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"diversity.csv", "diversity.md", "batch_bound_vs_r.png", "batch_bound_vs_training.png"} <= artifacts
    history = client.get_metric_history(runs[0].info.run_id, "diversity/batch_bound")
    assert [m.step for m in history] == [0, 2, 3]  # ceil(300 / 128) = 3 updates: every 2, and the last


def test_cli_rejects_a_bad_mechanism_before_any_work(tmp_path, idx_dir):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "raygd.cli",
            "diversity",
            str(REPO / "configs/quickstart.yaml"),
            "--set",
            f"data.data_dir={idx_dir}",
            "--mechanism",
            "vanilla,dropout",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--mechanism" in out.stderr and not (tmp_path / "mlflow.db").exists()
