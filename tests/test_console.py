"""What `raygd sweep` prints: one screen by default, Tune's tables behind -v."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.sweeps import write_sweep_spec
from tuning.console import describe


def test_a_trial_is_described_by_what_it_varies():
    assert describe(
        {"step_size": 0.1, "global_batch_size": 64, "mechanism": {"name": "dropconnect", "drop_prob": 0.4}, "seed": 0}
    ) == ("dropconnect(p=0.4) γ=0.1 B=64 seed=0")
    assert (
        describe({"confirm": {"step_size": 0.4, "global_batch_size": 256, "mechanism": {"name": "vanilla"}, "seed": 7}})
        == "confirm vanilla γ=0.4 B=256 seed=7"
    )
    assert (
        describe({"extend": {"step_size": 0.8, "global_batch_size": 64, "mechanism": {"name": "vanilla"}, "seed": 0}})
        == "extend vanilla γ=0.8 B=64 seed=0"
    )
    assert describe({"step_size": 0.0123456, "mechanism": "sgld(sigma=0.01)", "replication": 4}) == (
        "sgld(sigma=0.01) γ=0.0123 r=4"
    )


@pytest.mark.ray
def test_sweep_console_fits_on_one_screen_and_ends_with_the_table_and_the_ui_link(tmp_path, idx_dir):
    space = {"step_size": [0.05, 0.1], "mechanism": [{"name": "vanilla"}, {"name": "dropconnect", "drop_prob": 0.4}]}
    path = write_sweep_spec(
        tmp_path,
        idx_dir,
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "console",
        space,
        {"target_accuracy": 0.8, "max_passes": 2},
    )
    done = subprocess.run(
        [sys.executable, "-m", "raygd.cli", "sweep", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, RAY_ADDRESS=""),
    )
    assert done.returncode == 0, done.stdout[-3000:]
    lines = done.stdout.rstrip().splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    # one trial at a time: one line per trial, its start written when it starts and its end appended
    for n in range(1, 5):
        assert any(line.startswith(f"trial {n}/4  ") and " -> " in line and "done," in line for line in lines), lines
    assert any("4 done, 0 running, 0 pending" in line for line in lines), lines
    table = next(i for i, line in enumerate(lines) if line.startswith("| mechanism |"))
    assert any(line.startswith("| vanilla |") for line in lines[table:])
    assert "#/experiments/" in lines[-1] and "workflowType=machine_learning" in lines[-1], lines[-3:]
    assert "mlflow ui --backend-store-uri" in lines[-2], lines[-3:]


def test_sequential_trials_print_one_line_each_and_concurrent_ones_two():
    """The reporter's own logic on Tune's trial fields (trial_id, config, status, last_result)."""
    import io
    from types import SimpleNamespace

    from tuning.console import ConsoleReporter

    def trial(i, status="RUNNING", result=None):
        config = {"step_size": 0.1, "global_batch_size": 64, "mechanism": {"name": "vanilla"}, "seed": i}
        return SimpleNamespace(trial_id=f"t{i}", config=config, status=status, last_result=result)

    reached = {"status": "reached_target", "time_to_accuracy_s": 1.5, "passes_to_accuracy": 0.5}
    out = io.StringIO()
    rep = ConsoleReporter(2, out=out, sequential=True)
    a, b = trial(0), trial(1, "PENDING")
    rep.on_trial_start(0, [a, b], a)
    assert out.getvalue() == "trial 1/2  vanilla γ=0.1 B=64 seed=0  ->"  # the start, while it runs
    a.last_result = reached
    rep.on_trial_complete(0, [a, b], a)
    a.status, b.status = "TERMINATED", "RUNNING"
    rep.on_trial_start(0, [a, b], b)
    rep.on_trial_error(0, [a, b], b)
    assert out.getvalue().splitlines() == [
        "trial 1/2  vanilla γ=0.1 B=64 seed=0  -> reached_target  time to acc 1.5 s  passes 0.5  "
        "[1 done, 0 running, 1 pending; best vanilla γ=0.1 B=64 seed=0 1.5 s]",
        "trial 2/2  vanilla γ=0.1 B=64 seed=1  -> error  [2 done, 0 running, 0 pending; "
        "best vanilla γ=0.1 B=64 seed=0 1.5 s]",
    ]
    out = io.StringIO()
    rep = ConsoleReporter(2, out=out)
    a, b = trial(0), trial(1)
    rep.on_trial_start(0, [a, b], a)
    rep.on_trial_start(0, [a, b], b)
    a.last_result = reached
    rep.on_trial_complete(0, [a, b], a)
    lines = out.getvalue().splitlines()
    assert [line[:16] for line in lines] == ["trial 1/2 start ", "trial 2/2 start ", "trial 1/2 end   "]
    assert lines[-1].endswith("[1 done, 1 running, 0 pending; best vanilla γ=0.1 B=64 seed=0 1.5 s]")
    # a restored experiment (Tune restores the reporter as pickled, best None): the trial numbers and the best
    # so far count the trials that finished before
    out = io.StringIO()
    rep = ConsoleReporter(3, out=out, sequential=True)
    earlier = dict(reached, time_to_accuracy_s=1.2)
    a, b, c = trial(0, "TERMINATED", reached), trial(1, "TERMINATED", earlier), trial(2)
    rep.on_trial_start(0, [a, b, c], c)
    c.last_result = reached
    rep.on_trial_complete(0, [a, b, c], c)
    assert out.getvalue().startswith("trial 3/3  vanilla γ=0.1 B=64 seed=2  -> reached_target"), out.getvalue()
    assert out.getvalue().endswith("[3 done, 0 running, 0 pending; best vanilla γ=0.1 B=64 seed=1 1.2 s]\n")


def test_an_edge_round_in_the_grids_experiment_is_counted_on_its_own():
    """tuning.rounds hands a round's trials out in the grid's Tune experiment: each is numbered within its round."""
    import io
    from types import SimpleNamespace

    from tuning.console import ConsoleReporter
    from tuning.trial import EXTEND_PARAM, EXTEND_ROUND_PARAM, EXTEND_SIZE_PARAM

    params = {"step_size": 0.1, "global_batch_size": 64, "mechanism": {"name": "vanilla"}, "seed": 0}
    reached = {"status": "reached_target", "time_to_accuracy_s": 1.5, "passes_to_accuracy": 0.5}
    grid = [
        SimpleNamespace(trial_id="g0", config=params, status="TERMINATED", last_result=reached),
        SimpleNamespace(trial_id="g1", config=dict(params, seed=1), status="TERMINATED", last_result=None),
    ]
    extend = {EXTEND_PARAM: dict(params, step_size=0.8), EXTEND_ROUND_PARAM: 1, EXTEND_SIZE_PARAM: 3}
    x = SimpleNamespace(trial_id="x", config=extend, status="RUNNING", last_result=None)
    out = io.StringIO()
    rep = ConsoleReporter(2, out=out, sequential=True)
    rep.on_trial_start(0, [*grid, x], x)
    x.last_result = dict(reached, time_to_accuracy_s=0.9)
    rep.on_trial_complete(0, [*grid, x], x)
    assert out.getvalue() == (
        "trial 1/3  extend vanilla γ=0.8 B=64 seed=0  -> reached_target  time to acc 0.9 s  passes 0.5  "
        "[1 done, 0 running, 2 pending; best extend vanilla γ=0.8 B=64 seed=0 0.9 s]\n"
    )
