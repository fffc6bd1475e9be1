"""`raygd diversity`: the table, the MLflow record, and bad flags rejected before any work."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raygd.config import ConfigError, load_run_config
from raygd.diversity import gradient_diversity
from raygd.measure import DIFFERENTIAL_METRIC, measure_along_training, measure_replications, parse_list, table
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


def _brute_differential(model, before: dict, after: dict, x, y) -> float:
    """B̄_D(w, w′) = n Σ‖g_i(w) − g_i(w′)‖² / ‖Σ_i (g_i(w) − g_i(w′))‖², per-example gradients by a plain loop."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    def grads(params: dict) -> torch.Tensor:
        rows = []
        for i in range(x.shape[0]):
            leaves = {n: t.detach().double().requires_grad_() for n, t in params.items()}
            loss = F.cross_entropy(functional_call(model, leaves, (x[i : i + 1].double(),)), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(leaves.values()))]))
        return torch.stack(rows)

    diff = grads(after) - grads(before)
    return x.shape[0] * float(diff.square().sum() / diff.sum(0).square().sum())


def test_along_training_differential_bound_matches_a_per_example_loop(idx_dir):
    """The rows' B̄_D between consecutive iterates, against the same iterates replayed (the loop is
    deterministic) and per-example gradients by a plain loop."""
    import dataclasses

    from raygd.config import MechanismConfig
    from raygd.data import load_data
    from raygd.loop import build_state, every_steps, run_loop

    overrides = [f"data.data_dir={idx_dir}", "data.train_size=120", "train.global_batch_size=16", "train.max_passes=1"]
    cfg = load_run_config(None, [*overrides, "train.model=logreg", "train.step_size=0.5"])
    rows = measure_along_training(cfg, every=3, differential=True)
    assert rows[0].differential_bound is None and all(r.differential_bound is not None for r in rows[1:])

    train = dataclasses.replace(cfg.train, num_workers=1, diversity_estimator="none")
    single = dataclasses.replace(cfg, train=train, mechanism=MechanismConfig())
    data = load_data(cfg.data, cfg.train.seed)
    state = build_state(single, data)
    iterates = {0: {n: p.detach().clone() for n, p in state.model.named_parameters()}}

    def keep(metrics: dict) -> None:
        iterates[int(metrics["step"])] = {n: p.detach().clone() for n, p in state.model.named_parameters()}

    run_loop(state, report=keep, eval_due=every_steps(3), stop_at_target=False)
    assert [r.updates for r in rows] == sorted(iterates)
    x, y = data.x_train, data.y_train
    for before, row in itertools.pairwise(rows):
        want = _brute_differential(state.model, iterates[before.updates], iterates[row.updates], x, y)
        assert row.differential_bound == pytest.approx(want, rel=1e-6)
    assert "B̄_D(w_prev, w)" in table(rows) and "B̄_D" not in table(rows[:1])


def test_cli_differential_is_logged_to_mlflow_and_needs_along_training(tmp_path, idx_dir):
    db = tmp_path / "mlflow.db"
    base = [sys.executable, "-m", "raygd.cli", "diversity", str(REPO / "configs/quickstart.yaml")]
    sets = [f"data.data_dir={idx_dir}", "data.train_size=200", "train.model=logreg", "train.max_passes=1"]
    sets.append(f"tracking.tracking_uri=sqlite:///{db}")
    args = [a for s in sets for a in ("--set", s)]
    bad = subprocess.run([*base, *args, "--differential"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--differential" in bad.stderr
    out = subprocess.run(
        [*base, *args, "--along-training", "--every", "1", "--differential"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "B̄_D(w_prev, w)" in out.stdout
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("raygd-quickstart").experiment_id])[0]
    history = client.get_metric_history(run.info.run_id, DIFFERENTIAL_METRIC)
    assert [m.step for m in history] == [1, 2] and all(m.value >= 1.0 for m in history)  # ceil(200 / 128) = 2
