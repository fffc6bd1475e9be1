"""Issue #33: SIGINT (Ctrl-C) or SIGTERM (a job's stop) ends `raygd sweep` and `raygd train` as an interruption.

The sweep tests run the real command in a subprocess, signal it once a trial has finished and the next is training,
check the exit status, the one line it ends with, the parent run left RUNNING with its tags, then run the resume
command exactly as printed. The unit tests cover the pieces without Ray: the handlers, the printed command, the console.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raygd.records import INTERRUPTED_TAG, KEY_TAG, TRIALS_FINISHED_TAG, TRIALS_TOTAL_TAG, child_runs
from tests.sweeps import write_sweep_spec

RESUME_PREFIX = "resume it with: "


def _in_a_terminal_of_its_own():
    """The child's SIGINT as a terminal's: handled (a shell's background job would have it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], cwd: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=dict(os.environ, RAY_ADDRESS=""),
        start_new_session=True,  # its own process group, as a terminal's foreground job
        stdout=(out / "stdout.txt").open("w"),
        stderr=(out / "stderr.txt").open("w"),
        preexec_fn=_in_a_terminal_of_its_own,
    )


def _wait_for(client: MlflowClient, experiment: str, ready, timeout_s: float = 400):
    """Poll the experiment's runs until ``ready(runs)`` returns something."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        exp = client.get_experiment_by_name(experiment)
        found = ready(client.search_runs([exp.experiment_id]) if exp else [])
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{experiment}: nothing to interrupt within {timeout_s} s")


def _one_done_one_training(runs):
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    training = [r for r in children if r.info.status == "RUNNING" and "train/loss" in r.data.metrics]
    if any(r.info.status == "FINISHED" for r in children) and training:
        return children[0].data.tags["mlflow.parentRunId"]
    return None


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


@pytest.mark.parametrize(
    "sig, to_group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],  # Ctrl-C reaches the terminal's process group; kill, the driver
    ids=["SIGINT", "SIGTERM"],
)
def test_an_interrupted_sweep_stays_resumable_and_its_printed_command_finishes_it(
    tmp_path, idx_dir, sqlite_uri, sig, to_group
):
    # As in test_sweep.py's kill test: small step sizes and a checkpoint every other update keep each of the two
    # trials training for seconds (~76 updates), so the signal lands inside the second trial's loop.
    path = write_sweep_spec(
        tmp_path, idx_dir, sqlite_uri, "int-sweep", {"step_size": [0.0005, 0.001], "mechanism": [{"name": "vanilla"}]}
    )
    spec = yaml.safe_load(path.read_text())
    spec["base"]["train"].update(checkpoint_every_steps=2, target_accuracy=0.99, max_passes=4)
    path.write_text(yaml.safe_dump(spec))
    override = "sweep.space.step_size=[0.0005, 0.001]"  # the same grid; its space needs quoting in the command
    command = [sys.executable, "-m", "raygd.cli", "sweep", str(path), "--set", override]
    proc = _start(command, tmp_path, tmp_path)
    client = MlflowClient(sqlite_uri)
    parent_id = _wait_for(client, "int-sweep", _one_done_one_training)
    os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
    assert proc.wait(timeout=180) == 128 + sig
    out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()

    # one line: how far it got and the command that resumes it; no table, no Tune advice, no trace
    last = out.rstrip().splitlines()[-1]
    name = signal.Signals(sig).name
    assert f"raygd sweep int-sweep: interrupted by {name} after " in last and RESUME_PREFIX in last, out[-2000:]
    assert "| mechanism |" not in out and "reached the target" not in out
    assert "Tuner.restore" not in out + err and "Traceback" not in err and "Aborted" not in err, err[-3000:]
    parent = client.get_run(parent_id)
    finished = [c for c in child_runs(sqlite_uri, parent_id) if c.info.status == "FINISHED"]
    assert parent.info.status == "RUNNING"
    assert parent.data.tags[INTERRUPTED_TAG] == name
    assert parent.data.tags[TRIALS_FINISHED_TAG] == str(len(finished)) and parent.data.tags[TRIALS_TOTAL_TAG] == "2"
    assert f"after {len(finished)} of 2 trials" in last
    before = {c.info.run_id: c.info.end_time for c in finished}

    # the command as printed, in a shell: it runs what had not finished, once
    resume = last.split(RESUME_PREFIX, 1)[1]
    assert shlex.split(resume)[1:] == ["sweep", str(path), "--set", override, "--resume"]
    done = subprocess.run(
        resume, shell=True, cwd=tmp_path, env=dict(os.environ, RAY_ADDRESS=""), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "raygd sweep int-sweep: 2 trials" in done.stdout
    children = child_runs(sqlite_uri, parent_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.tags[KEY_TAG] for c in children}) == 2
    for c in children:
        steps = _steps(client, c.info.run_id)
        assert steps and len(steps) == len(set(steps)), (c.info.run_name, sorted(steps))
        if c.info.run_id in before:  # finished before the signal: reported again, not trained again
            assert c.info.end_time == before[c.info.run_id] and c.data.tags["raygd.attempt"] == "1"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and INTERRUPTED_TAG not in parent.data.tags


def test_an_interrupted_train_run_ends_killed_with_status_130(tmp_path, idx_dir, sqlite_uri):
    config = {
        "data": {"data_dir": str(idx_dir), "eval_size": 600},
        "train": {
            "model": "logreg",
            "num_workers": 2,
            "global_batch_size": 32,
            "step_size": 0.0003,
            "target_accuracy": 0.99,
            "max_passes": 40,  # minutes at a checkpoint every other update: the signal lands in the loop
            "eval_every_steps": 4,
            "checkpoint_every_steps": 2,
        },
        "tracking": {"tracking_uri": sqlite_uri, "experiment_name": "int-train"},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = _start([sys.executable, "-m", "raygd.cli", "train", "run.yaml"], tmp_path, tmp_path)
    client = MlflowClient(sqlite_uri)
    run = _wait_for(
        client,
        "int-train",
        lambda runs: next((r for r in runs if r.info.status == "RUNNING" and "train/loss" in r.data.metrics), None),
    )
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    out, err = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert f"raygd train: interrupted by SIGINT; MLflow run {run.info.run_id} ended KILLED" in out, out + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags[INTERRUPTED_TAG] == "SIGINT"
    assert "raygd.status" not in ended.data.tags  # no outcome: the run did not end by itself


# --- the pieces, without Ray ------------------------------------------------------------------------------------


@pytest.fixture
def terminal_sigint():
    """SIGINT as a terminal's foreground job has it (Python's handler): a test run from a shell's background
    job inherits it ignored, and an ignored SIGINT rightly stays ignored (the test below)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signals_raise_interrupted_and_put_the_handlers_back(sig, code, terminal_sigint):
    from raygd.train import Interrupted, stop_signals

    before = signal.getsignal(sig)
    with pytest.raises(Interrupted) as stop, stop_signals():
        signal.raise_signal(sig)
        time.sleep(1)  # the handler runs here
    assert stop.value.exit_code == code and stop.value.signal_name == signal.Signals(sig).name
    assert signal.getsignal(sig) is before


def test_a_signal_ignored_before_stays_ignored():
    from raygd.train import stop_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a background job
    try:
        with stop_signals():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.1)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_rays_plain_keyboard_interrupt_reads_as_the_signal_received():
    # ray.get / ray.wait raise a plain KeyboardInterrupt in place of what the handler raised inside them
    from raygd.train import RECEIVED, interrupted

    RECEIVED[:] = [signal.SIGTERM]
    stop = interrupted(KeyboardInterrupt())
    assert (stop.exit_code, stop.repeated) == (143, False)
    RECEIVED.append(signal.SIGINT)  # a second signal: stop at once, still SIGTERM's interruption
    assert interrupted(KeyboardInterrupt()).repeated and interrupted(KeyboardInterrupt()).exit_code == 143
    assert interrupted(stop) is stop
    RECEIVED.clear()
    assert interrupted(KeyboardInterrupt()).exit_code == 130  # plain Ctrl-C


def test_the_resume_command_repeats_the_spec_and_overrides_shell_quoted(monkeypatch):
    from raygd.cli import resume_command

    args = argparse.Namespace(spec="my sweeps/q.yaml", overrides=["sweep.space.step_size=[0.1, 0.4]", "a.b=it's"])
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    words = shlex.split(resume_command(args))
    assert Path(words[0]).name == "raygd"
    sets = ["--set", args.overrides[0], "--set", args.overrides[1]]
    assert words[1:] == ["sweep", "my sweeps/q.yaml", *sets, "--resume"]
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # in a Ray job: submitted again
    assert shlex.split(resume_command(args))[:5] == ["raygd", "submit", "--", "raygd", "sweep"]


class _Trial:
    def __init__(self, trial_id: str, config: dict, last_result: dict | None = None):
        self.trial_id, self.config, self.last_result, self.status = trial_id, config, last_result, "PENDING"


def test_the_stop_notice_gets_a_line_of_its_own_and_the_trial_line_it_broke_stays_broken(monkeypatch):
    from tuning import console

    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setitem(console._STDOUT, "line_open", False)
    reporter = console.ConsoleReporter(2, sequential=True)
    first, second = _Trial("a", {"step_size": 0.1}), _Trial("b", {"step_size": 0.2})
    first.status = "RUNNING"
    reporter.on_trial_start(0, [first, second], first)
    console.notice("raygd sweep: SIGINT: stopping")
    first.status = "TERMINATED"
    first.last_result = {"status": "max_passes", "passes": 1.0, "final_train_accuracy": 0.5}
    reporter.on_trial_complete(0, [first, second], first)  # it ended during the stop: a line of its own
    second.status = "RUNNING"
    reporter.on_trial_start(0, [first, second], second)
    reporter.on_experiment_end([first, second])  # ended with the second running: it says so
    assert out.getvalue().splitlines() == [
        "trial 1/2  vanilla γ=0.1  ->",
        "raygd sweep: SIGINT: stopping",
        "trial 1/2 end    max_passes  after 1 passes, train acc 0.500  [1 done, 0 running, 1 pending]",
        "trial 2/2  vanilla γ=0.2  -> stopped",
    ]


def test_submit_gives_a_stopped_job_time_to_stop_as_interrupted(monkeypatch, tmp_path):
    from raygd import submit

    sent = {}

    class Client:
        def submit_job(self, **kwargs):
            sent.update(kwargs)
            return "raysubmit_x"

    monkeypatch.setattr(submit, "connect", lambda address: Client())
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)
    args = argparse.Namespace(
        entrypoint=["raygd", "sweep", "quickstart"],
        list=False,
        status=None,
        logs=None,
        stop=None,
        follow=False,
        stray=[],
        address="http://127.0.0.1:8265",
        tracking_uri="http://10.0.0.5:5000",
        working_dir=str(tmp_path),
        exclude=[],
        submission_id=None,
        no_wait=True,
    )
    assert submit.cmd_submit(args) == 0
    assert sent["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == str(submit.JOB_STOP_WAIT_S)
