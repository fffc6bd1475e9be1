"""Integration: real Ray Tune sweeps (TorchTrainer per trial) recorded in a real MLflow SQLite store."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raygd.records import EXTEND_INLINE_TAG, KEY_TAG, PHASE_TAG, TUNE_DIR_TAG, child_runs
from tests.conftest import kill_process_tree
from tests.sweeps import write_sweep_spec as _write_spec
from tuning.objective import UNREACHED_PENALTY_S
from tuning.rounds import grid_configs, ordered_grid
from tuning.spec import load_sweep_spec, mechanism_label
from tuning.stats import rank_trials
from tuning.sweep import _param_space, _search_alg, run_sweep

REPO = Path(__file__).resolve().parents[1]


def test_four_trial_sweep_has_one_parent_four_children_and_the_right_winner(ray_session, tmp_path, idx_dir, sqlite_uri):
    # step size 1e38 overflows float32 within two steps: those trials must be recorded as diverged,
    # with the step, and ranked last, while the others finish. The winner 0.002 (~17 updates to target
    # on these data) is the grid's lower edge: extend_edges runs 0.001 for each mechanism, which needs about
    # twice the updates; at ~0.1 s per trial timing noise can still pick 0.001, and then round 2 tries 0.0005.
    # Either way the extension goes down only, stops by its limit, and the table marks what is still an edge
    # (the deterministic stop at an interior winner: tests/test_edges.py).
    path = _write_spec(
        tmp_path,
        idx_dir,
        sqlite_uri,
        "it-sweep",
        {"step_size": [0.002, 1e38], "mechanism": [{"name": "vanilla"}, {"name": "sgld", "sgld_sigma": 0.001}]},
        train={"max_passes": 4},
        confirm_seeds=[7],
        extend_edges=True,
        extend_edges_rounds=2,
        trial_order="shuffled",
    )
    spec = load_sweep_spec(str(path))
    outcome = run_sweep(spec)
    client = MlflowClient(sqlite_uri)
    children = child_runs(sqlite_uri, outcome.parent_run_id)
    confirm = [c for c in children if c.data.tags[PHASE_TAG] == "confirm"]
    extend = [c for c in children if c.data.tags[PHASE_TAG] == "extend"]
    children = [c for c in children if c.data.tags[PHASE_TAG] == "search"]
    # round 1 runs 0.001 for each mechanism; a further round only goes on down, and only where 0.001 won
    added = sorted((c.data.tags["raygd.mechanism_label"], float(c.data.params["train.step_size"])) for c in extend)
    assert {("sgld(sigma=0.001)", 0.001), ("vanilla", 0.001)} <= set(added) and len(added) <= 4, added
    assert all(step <= 0.001 for _, step in added), added
    rounds = {float(c.data.params["train.step_size"]): c.data.tags["raygd.extend_round"] for c in extend}
    assert rounds[0.001] == "1" and set(rounds.values()) <= {"1", "2"}, rounds
    # the rounds ran in the grid's Tune experiment (tuning.rounds), not in experiments of their own
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags[EXTEND_INLINE_TAG] == "1"
    tune_dir = Path(parent.data.tags[TUNE_DIR_TAG])
    assert tune_dir.is_dir() and not Path(f"{tune_dir}-extend1").exists()
    for row in outcome.best_rows:  # interior, or still on the lower edge after the stated limit, and marked
        assert row.step_edge in (None, "low") and (row.step_edge is None or f"| {row.step_size:g}↓ |" in outcome.table)
    # γ + 0.001, or γ + 0.0005, 0.001 where timing noise made 0.001 win round 1 (a loaded machine)
    assert re.search(r"Grid edges extended: sgld\(sigma=0\.001\): γ \+ (0\.0005, )?0\.001\b", outcome.table)
    # the confirm phase re-runs each mechanism's winner (after the extension) with the new seed
    assert sorted(
        (c.data.tags["raygd.mechanism_label"], float(c.data.params["train.step_size"]), c.data.params["train.seed"])
        for c in confirm
    ) == sorted((r.mechanism, r.step_size, "7") for r in outcome.best_rows)
    assert "Confirmed with fresh seeds" in outcome.table
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)

    # the grid ran in its shuffled order (sweep.trial_order), which is not Tune's
    def pairs(configs):
        return [(float(c["step_size"]), mechanism_label(c["mechanism"])) for c in configs]

    assert pairs(ordered_grid(spec)) != pairs(grid_configs(spec.space))
    started = sorted(children, key=lambda c: c.info.start_time)
    assert [(float(c.data.params["train.step_size"]), c.data.tags["raygd.mechanism_label"]) for c in started] == pairs(
        ordered_grid(spec)
    )
    assert len({c.data.tags[KEY_TAG] for c in children}) == 4
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"summary.csv", "summary.md", "time_vs_batch.png", "speedup.png"} <= artifacts
    reached = [c for c in children if "time_to_accuracy_s" in c.data.metrics]
    assert {float(c.data.params["train.step_size"]) for c in reached} == {0.002}
    diverged = [c for c in children if c.data.tags["raygd.status"] == "diverged"]
    assert {float(c.data.params["train.step_size"]) for c in diverged} == {1e38} and len(diverged) == 2
    for c in diverged:
        assert 1 <= c.data.metrics["diverged_at_step"] <= c.data.metrics["steps"]
    ranked = rank_trials([r for r in outcome.records if r.phase == "search"])
    assert [r.status for r in ranked] == ["reached_target"] * 2 + ["diverged"] * 2
    assert {r.run_id for r in ranked[2:]} == {c.info.run_id for c in diverged}
    fastest = min(
        [*reached, *(c for c in extend if "time_to_accuracy_s" in c.data.metrics)],
        key=lambda c: c.data.metrics["time_to_accuracy_s"],
    )
    winner = min((r for r in outcome.best_rows if r.time_to_accuracy_s is not None), key=lambda r: r.time_to_accuracy_s)
    assert winner.mechanism == fastest.data.tags["raygd.mechanism_label"]
    assert winner.time_to_accuracy_s == fastest.data.metrics["time_to_accuracy_s"]
    assert "vanilla" in outcome.table and "sgld(sigma=0.001)" in outcome.table

    # `raygd report` rebuilds the same table and files from MLflow alone
    from raygd.cli import main

    assert main(["report", "it-sweep", "--tracking-uri", sqlite_uri, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "summary.md").read_text().strip() == outcome.table.strip()
    assert {"summary.csv", "trials.csv", "time_vs_batch.png", "speedup.png"} <= {
        p.name for p in (tmp_path / "report").iterdir()
    }


def _sweep_cmd(path, *extra):
    return [sys.executable, "-m", "raygd.cli", "sweep", str(path), *extra]


def test_resume_after_the_sweep_process_is_killed_makes_no_duplicate_children(tmp_path, idx_dir, sqlite_uri):
    # Small step sizes and a checkpoint every other update keep each trial training for seconds (~76
    # updates), so the kill lands inside the second (last) grid trial's loop, after it has logged and
    # checkpointed. The resumed sweep then runs its edge round (one trial) in the restored Tune experiment.
    path = _write_spec(
        tmp_path,
        idx_dir,
        sqlite_uri,
        "resume-sweep",
        {"step_size": [0.0005, 0.001], "mechanism": [{"name": "vanilla"}]},
        extend_edges=True,
        extend_edges_rounds=1,
    )
    spec = yaml.safe_load(path.read_text())
    spec["base"]["train"].update(checkpoint_every_steps=2, target_accuracy=0.99, max_passes=4)
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen(
        _sweep_cmd(path),
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = MlflowClient(sqlite_uri)
    deadline = time.time() + 300
    parent = partial = None
    while time.time() < deadline:  # kill once the first trial has finished and the second is training
        exp = client.get_experiment_by_name("resume-sweep")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        running = [r for r in children if r.info.status == "RUNNING" and "train/loss" in r.data.metrics]
        if sum(r.info.status == "FINISHED" for r in children) >= 1 and running:
            parent, partial = children[0].data.tags["mlflow.parentRunId"], running[0].info.run_id
            break
        time.sleep(0.2)
    assert parent, "the sweep did not get going"
    kill_process_tree(proc.pid)  # the driver, the local Ray it started and that Ray's workers
    proc.wait()
    assert client.get_run(partial).info.status == "RUNNING", "the killed trial ended its run: nothing to resume"
    logged_before = [m.step for m in client.get_metric_history(partial, "train/loss")]
    done = subprocess.run(
        _sweep_cmd(path, "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    children = child_runs(sqlite_uri, parent)
    extend = [c for c in children if c.data.tags[PHASE_TAG] == "extend"]
    assert len(extend) == 1 and extend[0].data.tags["raygd.extend_round"] == "1", [c.info.run_name for c in children]
    assert "grid edges, round 1/1: 1 trial beyond" in done.stdout and "trial 1/1  extend vanilla" in done.stdout
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags[KEY_TAG] for c in children}) == 3
    assert client.get_run(parent).info.status == "FINISHED"
    # The interrupted trial's run was reattached, not recreated: same run, continued from its checkpoint.
    reattached = client.get_run(partial)
    assert partial in {c.info.run_id for c in children} and reattached.data.tags["raygd.attempt"] == "2"
    assert reattached.data.metrics["train/restarts"] == 1.0
    steps = [m.step for m in sorted(client.get_metric_history(partial, "train/loss"), key=lambda m: m.timestamp)]
    assert steps[: len(logged_before)] == sorted(logged_before) and steps == sorted(set(steps)), steps


def _suggestions(spec, n: int) -> list[dict]:
    """The first n configs a fresh searcher built as the sweep builds it suggests (results not needed
    for them: TPE's first trials are seeded random draws)."""
    searcher = _search_alg(spec)
    assert searcher.set_search_properties(None, None, _param_space(spec))
    return [searcher.suggest(f"t{i}") for i in range(n)]


def _optuna_spec(tmp_path, idx_dir, sqlite_uri, seed: int, **extra):
    return load_sweep_spec(
        str(
            _write_spec(
                tmp_path,
                idx_dir,
                sqlite_uri,
                "it-optuna",
                {"step_size": {"low": 1e-4, "high": 0.1, "log": True}},
                search="optuna",
                num_samples=3,
                search_seed=seed,
                **extra,
            )
        )
    )


@pytest.mark.parametrize("search", ["optuna", "random"])
def test_searcher_suggestions_are_reproducible_from_the_seed(tmp_path, idx_dir, sqlite_uri, search):
    def steps(seed):
        spec = _optuna_spec(tmp_path, idx_dir, sqlite_uri, seed)
        spec.search = search
        if search == "optuna":
            return [c["step_size"] for c in _suggestions(spec, 4)]
        gen = _search_alg(spec)
        gen.add_configurations({"x": {"run": lambda config: None, "config": _param_space(spec), "num_samples": 4}})
        return [t.config["step_size"] for t in iter(lambda: gen.next_trial(), None)]

    first = steps(0)
    assert len(first) == 4 and all(1e-4 <= s <= 0.1 for s in first)
    assert steps(0) == first and steps(1) != first


def test_optuna_sweep_with_asha_stops_a_lagging_trial_and_the_next_one_still_runs(
    ray_session, tmp_path, idx_dir, sqlite_uri
):
    # Pick a searcher seed whose first suggestions are a step size that reaches 90% at the first evaluation
    # (>= 0.01 here) and then a hopeless one (<= 3e-4: ~10% after 4 steps): ASHA, comparing train accuracy
    # at 0.2 passes (step 4), must stop the second; the third must still start (nothing leaked) and end.
    def fits(seed):
        first, second, _ = (c["step_size"] for c in _suggestions(_optuna_spec(tmp_path, idx_dir, sqlite_uri, seed), 3))
        return first >= 0.01 and second <= 3e-4

    seed = next(s for s in range(500) if fits(s))
    spec = _optuna_spec(
        tmp_path, idx_dir, sqlite_uri, seed, scheduler="asha", asha_time_attr="progress/passes", asha_grace_period=0.2
    )
    expected = [c["step_size"] for c in _suggestions(spec, 3)]
    outcome = run_sweep(spec)
    children = sorted(child_runs(sqlite_uri, outcome.parent_run_id), key=lambda r: r.info.start_time)
    assert [float(c.data.params["train.step_size"]) for c in children] == pytest.approx(expected, rel=1e-12)
    first, stopped, last = children
    assert (first.info.status, first.data.tags["raygd.status"]) == ("FINISHED", "reached_target")
    assert (stopped.info.status, stopped.data.tags["raygd.status"]) == ("KILLED", "stopped_early")
    assert stopped.data.tags["raygd.stopped_at_step"] == "4" and stopped.data.metrics["final_train_accuracy"] < 0.5
    client = MlflowClient(sqlite_uri)
    assert client.get_metric_history(last.info.run_id, "train/accuracy"), "the trial after the stop never trained"
    assert last.info.status in ("FINISHED", "KILLED") and last.data.tags["raygd.status"] in (
        "reached_target",
        "max_passes",
        "stopped_early",
    )
    ranked = [r.run_id for r in rank_trials(outcome.records)]
    assert ranked.index(stopped.info.run_id) > ranked.index(first.info.run_id)
    # In the warm pool (the default) the stopped trial is abandoned at the first evaluation after the stop
    # reached the pool, and the same pool takes the next trial.
    after_stop = [
        m
        for m in client.get_metric_history(stopped.info.run_id, "train/accuracy")
        if m.timestamp > stopped.info.end_time
    ]
    assert len(after_stop) <= 1, after_stop
    assert stopped.data.tags["raygd.pool_id"] == last.data.tags["raygd.pool_id"]
    assert int(last.data.tags["raygd.pool_position"]) == int(stopped.data.tags["raygd.pool_position"]) + 1

    # what Optuna was told: the reached trial's time to accuracy, a finite penalty for the stopped one
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch()
    searcher.restore_from_dir(client.get_run(outcome.parent_run_id).data.tags[TUNE_DIR_TAG])
    values = [t.value for t in sorted(searcher._ot_study.trials, key=lambda t: t.number)]
    assert values[0] == pytest.approx(first.data.metrics["time_to_accuracy_s"])
    assert UNREACHED_PENALTY_S <= values[1] < 2 * UNREACHED_PENALTY_S
    assert all(v is not None and math.isfinite(v) for v in values)


def test_local_ray_workers_query_their_own_cluster(ray_session):
    """Ray Train's placement group cleaner (what frees a stopped trial's CPUs) asks the State API from a
    worker; with several local Ray instances on the machine it must still reach this one."""
    ray = ray_session

    @ray.remote
    def ask():
        from ray.util.state import list_nodes

        return os.environ.get("RAY_API_SERVER_ADDRESS"), [n.node_id for n in list_nodes()]

    url, nodes = ray.get(ask.remote())
    assert url == f"http://{ray._private.worker.get_dashboard_url()}"
    assert nodes == [ray.get_runtime_context().get_node_id()]


def _no_rounds(k):
    return []


def _one_result(config):
    from ray import tune

    tune.report({"x": config["x"]})


def test_a_resume_whose_tune_state_cannot_be_restored_stops_instead_of_starting_afresh(ray_session, tmp_path):
    """Tune logs a failed restore and starts the experiment afresh; a resumed sweep must stop instead (else it
    ends at once and is closed as finished, as the §4 re-run once was). Real Tune: a one-trial experiment with
    the sweep's searcher, its saved searcher state then made unreadable."""
    from ray import tune

    from raygd.config import ResumeError
    from tuning.rounds import EdgeSearcher
    from tuning.sweep import _fit_tuner

    tune_dir = str(tmp_path / "exp")
    searcher = EdgeSearcher([{"x": 1}], _no_rounds, rounds=0, say=lambda line: None)
    config = tune.TuneConfig(num_samples=-1, search_alg=searcher)
    _fit_tuner(_one_result, tune_dir, {}, config, False, tune.Callback(), None)
    states = list(Path(tune_dir).glob("searcher-state-*.pkl"))
    assert states and tune.Tuner.can_restore(tune_dir)
    _fit_tuner(_one_result, tune_dir, {}, None, True, None, None)  # a readable state resumes quietly
    for state in Path(tune_dir).glob("searcher-state-*.pkl"):
        state.write_bytes(b"not a pickle")
    with pytest.raises(ResumeError, match="could not restore the sweep's experiment state"):
        _fit_tuner(_one_result, tune_dir, {}, None, True, None, None)
    assert logging.getLogger("ray.tune.execution.tune_controller").filters == []  # the guard is removed
