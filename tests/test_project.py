"""Tests for raygd/project.py: a real SQLite MLflow store holding a sweep's parent run and child runs written
with the records schema (no Ray), projected by hand and through ``raygd project``; and the premise of a
projection: updates to target do not depend on P (in-process logistic regression, P = 1 vs a gloo P = 2)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from raygd import costmodel as cm
from raygd import project, project_report
from raygd.cli import main
from raygd.config import ConfigError, load_run_config
from raygd.data import load_data
from raygd.loop import train_rank
from raygd.network import EMULATED, NETWORK_TAG
from raygd.records import KIND_TAG, MECHANISM_LABEL_TAG, STATUS_TAG, SWEEP_KIND, TRIAL_TAG
from raygd.tracking import create_run
from tests.dist import run_group

FIXED, PER_EXAMPLE = 2e-3, 1e-5
"""This machine's (made-up, exact) compute: t_step = 2 ms + 10 µs · B/P."""
LOGREG_PARAMS = 32 * 10 + 10


def _trial(uri, parent, i, mech, step, batch, updates, status="reached_target", emulated=None, seed=0, extra=None):
    params = {
        "train.model": "logreg",
        "data.name": "synthetic",
        "data.synthetic_features": 32,
        "data.num_classes": 10,
        "data.n": 4096,
        "mechanism.name": mech,
        "mechanism.quant_bucket_size": 512,
        "train.num_workers": 2,
        "train.step_size": step,
        "train.global_batch_size": batch,
        "train.seed": seed,
        **(extra or {}),
    }
    tags = {TRIAL_TAG: f"t{i}", MECHANISM_LABEL_TAG: mech, STATUS_TAG: status}
    step_s = FIXED + PER_EXAMPLE * batch / 2
    if emulated:
        params.update({f"train.network.{k}": v for k, v in emulated.items()})
        tags[NETWORK_TAG] = EMULATED
        link = cm.Link.from_gbps_us(emulated["bandwidth_gbps"], emulated["latency_us"])
        step_s += cm.comm_time(cm.payload_bytes(LOGREG_PARAMS, mech), 2, link, "ring", cm.collective_of(mech))
    run_id = create_run(uri, "proj", f"t{i}", params, tags, parent_run_id=parent)
    client = MlflowClient(uri)
    steps = updates if status == "reached_target" else 500
    metrics = {"steps": steps, "train_time_s": steps * step_s}
    if status == "reached_target":
        metrics.update(updates_to_accuracy=updates, time_to_accuracy_s=steps * step_s, passes_to_accuracy=1.0)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture
def sweep(sqlite_uri):
    parent = create_run(sqlite_uri, "proj", "sweep-proj", {}, {KIND_TAG: SWEEP_KIND})
    _trial(sqlite_uri, parent, 0, "vanilla", 0.1, 32, 120)
    _trial(sqlite_uri, parent, 1, "vanilla", 0.1, 256, 100)
    _trial(sqlite_uri, parent, 2, "quantize", 0.1, 256, 120)
    _trial(sqlite_uri, parent, 3, "quantize", 0.1, 64, 300, emulated={"bandwidth_gbps": 0.01, "latency_us": 100.0})
    _trial(sqlite_uri, parent, 4, "vanilla", 0.5, 256, 0, status="max_passes")
    return sqlite_uri, parent


def test_projection_is_measured_updates_times_modelled_step(sweep):
    uri, parent = sweep
    trials = project.read_trials(uri, parent)
    assert len(trials) == 5 and {t.num_params for t in trials} == {LOGREG_PARAMS}
    fits = project.fit_measured_compute(trials)
    for compute, _ in fits.values():  # the emulated quantize trial's wait is taken out before fitting
        assert compute.per_example_s == pytest.approx(PER_EXAMPLE) and compute.fixed_s == pytest.approx(FIXED)
    target = project.resolve_target(bandwidth_gbps=1.0, latency_us=50.0)
    proj = project.project(trials, target, [8, 32])
    link = cm.Link.from_gbps_us(1.0, 50.0)
    row = next(r for r in proj.trials if r["trial_id"] == "t1" and r["workers"] == 32)
    by_hand = (
        FIXED + PER_EXAMPLE * 256 / 32 + 2 * 31 * 50e-6 + 2 * 31 / 32 * 4 * LOGREG_PARAMS / link.bandwidth_bytes_per_s
    )
    assert row["projected_time_to_accuracy_s"] == pytest.approx(100 * by_hand)
    quant = next(r for r in proj.trials if r["trial_id"] == "t2" and r["workers"] == 8)
    q_hand = FIXED + PER_EXAMPLE * 32 + 7 * 50e-6 + 7 * (LOGREG_PARAMS + 4) / link.bandwidth_bytes_per_s
    assert quant["projected_time_to_accuracy_s"] == pytest.approx(120 * q_hand)  # all_gather of int8 + a norm


def test_unreached_trials_are_reported_not_extrapolated(sweep):
    uri, parent = sweep
    proj = project.project(project.read_trials(uri, parent), project.resolve_target(), [2, 64])
    rows = [r for r in proj.trials if r["trial_id"] == "t4"]
    assert rows and all(r["projected_time_to_accuracy_s"] == "" and r["status"].startswith("not reached") for r in rows)
    small = next(r for r in proj.trials if r["trial_id"] == "t0" and r["workers"] == 64)
    assert small["status"] == "B=32 < P" and small["projected_time_to_accuracy_s"] == ""
    assert "did not reach the target" in project_report.table(proj)


def test_best_per_mechanism_and_speedup_follow_the_link(sweep):
    """Fast link: vanilla's B=32 (120 cheap updates) wins; a slow link charges per update, so B=256 wins."""
    uri, parent = sweep
    trials = project.read_trials(uri, parent)
    fast = project.project(trials, project.resolve_target(bandwidth_gbps=1000, latency_us=0), [2])
    slow = project.project(trials, project.resolve_target(bandwidth_gbps=0.001, latency_us=1000), [2])
    best_fast = {r["mechanism"]: r for r in fast.best}
    best_slow = {r["mechanism"]: r for r in slow.best}
    assert best_fast["vanilla"]["global_batch_size"] == 32 and best_slow["vanilla"]["global_batch_size"] == 256
    assert best_slow["vanilla"]["projected_speedup_vs_vanilla"] == pytest.approx(1.0)
    ratio = best_slow["vanilla"]["projected_time_to_accuracy_s"] / best_slow["quantize"]["projected_time_to_accuracy_s"]
    assert best_slow["quantize"]["projected_speedup_vs_vanilla"] == pytest.approx(ratio)
    assert ratio > 1  # 4x fewer bytes per update outweighs 20% more updates on a slow link
    assert fast.figure1 and all(r["projected_pass_speedup"] > 0 for r in fast.figure1)
    rho = [r for r in slow.rho_map if r["mechanism"] == "quantize"]
    assert rho and rho[0]["projected_speedup_vs_vanilla"] < rho[-1]["projected_speedup_vs_vanilla"]


def test_projected_speedup_has_the_seeds_bootstrap_interval(sqlite_uri):
    """Three seeds a pair: the best pair is the lowest mean projected TTA, the speedup is the ratio of means, and
    its 95% interval matches the exact bootstrap distribution (all 27 × 27 resamples, enumerated)."""
    import itertools

    import numpy as np

    parent = create_run(sqlite_uri, "proj", "sweep-seeds", {}, {KIND_TAG: SWEEP_KIND})
    updates = {"vanilla": (100, 110, 160), "quantize": (90, 95, 140)}
    for k, (mech, ups) in enumerate(updates.items()):
        for seed, u in enumerate(ups):
            _trial(sqlite_uri, parent, 10 * k + seed, mech, 0.1, 256, u, seed=seed)
    _trial(sqlite_uri, parent, 30, "quantize", 0.1, 64, 700)  # one seed, slower: not the best
    proj = project.project(project.read_trials(sqlite_uri, parent), project.resolve_target(bandwidth_gbps=0.01), [2])
    best = {r["mechanism"]: r for r in proj.best}
    step = {
        m: next(r["projected_step_s"] for r in proj.trials if r["mechanism"] == m and r["global_batch_size"] == 256)
        for m in updates
    }
    mean = {m: float(np.mean([u * step[m] for u in ups])) for m, ups in updates.items()}
    q = best["quantize"]
    assert q["global_batch_size"] == 256 and q["seeds"] == 3
    assert (q["fastest_batch_low"], q["fastest_batch_high"]) == (256, 256)  # B = 64's 700 updates lose every resample
    assert "| quantize | 0.1 | 256 (256–256) |" in project_report.table(proj)
    assert q["projected_time_to_accuracy_s"] == pytest.approx(mean["quantize"])
    assert q["projected_speedup_vs_vanilla"] == pytest.approx(mean["vanilla"] / mean["quantize"])
    exact = sorted(
        np.mean([updates["vanilla"][i] * step["vanilla"] for i in a])
        / np.mean([updates["quantize"][i] * step["quantize"] for i in b])
        for a in itertools.product(range(3), repeat=3)
        for b in itertools.product(range(3), repeat=3)
    )
    lo, hi = np.percentile(exact, [2.5, 97.5])
    width = hi - lo
    assert q["projected_speedup_low"] == pytest.approx(lo, abs=0.1 * width)
    assert q["projected_speedup_high"] == pytest.approx(hi, abs=0.1 * width)
    assert best["vanilla"]["projected_speedup_low"] == ""  # the baseline has no interval against itself
    cell = f"{q['projected_speedup_vs_vanilla']:.2f} ({q['projected_speedup_low']:.2f}–"
    assert cell in project_report.table(proj) and "n.s." not in project_report.table(proj)  # 1.40 (1.02–1.92)
    row = {"projected_speedup_vs_vanilla": 1.1, "projected_speedup_low": 0.9, "projected_speedup_high": 1.3}
    assert project_report._speedup_cell(row) == "1.10 (0.90–1.30) n.s."
    assert all(r["projected_speedup_low"] != "" for r in proj.rho_map)


@pytest.mark.parametrize("rho", [0.1, 1.0, 10.0])
def test_link_for_rho_gives_that_rho_at_the_batch(sweep, rho):
    uri, parent = sweep
    trials = project.read_trials(uri, parent)
    link = project.link_for_rho(trials, rho, batch=256, workers=2, latency_us=50.0)
    compute = cm.Compute(PER_EXAMPLE, FIXED)
    cost = cm.step_cost(256, 2, compute, 4 * LOGREG_PARAMS, link)
    assert cost.rho == pytest.approx(rho) and link.latency_s == pytest.approx(50e-6)
    # by hand: 2 latency terms of 50 µs, and the ring's 2(P−1)/P of the bytes at P = 2
    t_compute = PER_EXAMPLE * 128
    assert link.bandwidth_bytes_per_s == pytest.approx(4 * LOGREG_PARAMS / (rho * t_compute - 2 * 50e-6))
    with pytest.raises(ValueError, match="latency alone"):
        project.link_for_rho(trials, 0.01, batch=256, latency_us=50.0)
    with pytest.raises(ValueError, match="no trial of 'sgld'"):
        project.link_for_rho(trials, 1.0, batch=256, mechanism="sgld")


def test_cli_prints_and_logs_to_the_parent_run(sweep, tmp_path, capsys):
    uri, parent = sweep
    code = main(
        ["project", "proj", "--tracking-uri", uri, "--profile", "paper-ec2", "--workers", "2,8", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("PROJECTED onto paper-ec2")
    assert (tmp_path / "projected_trials.csv").exists() and (tmp_path / "projected_figure1.png").exists()
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent, "projected")}
    assert "projected/projected_best.csv" in logged and "projected/projected.md" in logged


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "moon"], "--profile 'moon'"),
        (["--topology", "star"], "--topology 'star'"),
        (["--workers", "2,x"], "--workers"),
        (["--compute", "tpu"], "--compute 'tpu'"),
    ],
)
def test_bad_project_options_exit_2_naming_the_option(sweep, capsys, args, message):
    uri, _ = sweep
    assert main(["project", "proj", "--tracking-uri", uri, "--no-log", *args]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ConfigError):
        project.resolve_target(link="carrier-pigeon")


def _updates(rank, world_size, cfgs, data):
    return [train_rank(cfg, data, rank, world_size).updates_to_accuracy for cfg in cfgs]


def test_updates_to_target_do_not_depend_on_workers():
    """Fixed (γ, B, seed): P = 1 and P = 2 take the same updates to the target, for 3 seeds."""

    def cfg(seed, workers):
        return load_run_config(
            None,
            [
                "data.name=synthetic",
                "data.synthetic_size=1024",
                "train.model=logreg",
                f"train.num_workers={workers}",
                "train.global_batch_size=32",
                "train.step_size=0.5",
                "train.target_accuracy=0.8",
                "train.eval_every_steps=1",
                "train.diversity_estimator=none",
                f"train.seed={seed}",
            ],
        )

    data = load_data(cfg(0, 1).data, 0)
    single = [train_rank(cfg(s, 1), data).updates_to_accuracy for s in range(3)]
    pair = run_group(_updates, 2, [cfg(s, 2) for s in range(3)], data)
    assert all(u is not None for u in single)
    assert pair[0] == pair[1] == single


def test_any_model_projects_from_the_size_its_run_logged(sqlite_uri):
    """A user's model (an import string nothing here can import) projects from ``model.num_params`` and
    ``model.macs_per_example`` as the run logged them, and the table names the run's loss target."""
    parent = create_run(sqlite_uri, "proj", "sweep-user", {}, {KIND_TAG: SWEEP_KIND})
    user = {
        "train.model": "mypkg_not_installed.nets:build",
        "data.name": "mypkg_not_installed.data:load",
        "model.num_params": 812_345,
        "model.macs_per_example": 5.0e7,
        "train.target_loss": 1.8,
        "train.target_accuracy": None,
    }
    _trial(sqlite_uri, parent, 0, "vanilla", 0.5, 64, 200, extra=user)
    _trial(sqlite_uri, parent, 1, "quantize", 0.5, 64, 220, extra=user)
    (vanilla, quantize) = sorted(project.read_trials(sqlite_uri, parent), key=lambda t: t.mechanism_name)[::-1]
    assert vanilla.num_params == 812_345 and vanilla.macs_per_example == 5.0e7
    assert vanilla.target == "train loss <= 1.8"
    assert vanilla.payload == cm.payload_bytes(812_345, "vanilla") > quantize.payload
    proj = project.project([vanilla, quantize], project.resolve_target(bandwidth_gbps=1.0), [8])
    assert "time to train loss <= 1.8" in project_report.table(proj)
