"""A real slow network on one machine (tests/netlink.py): the link, its clean-up, its tags, and a sweep across it.

Pure parts (any machine): ``raygd.network`` tags a driver's runs ``shaped`` from ``$RAYGD_SHAPED_LINK``;
``raygd project`` takes the modelled transfer over the shaped link out of such runs' step times
(a real SQLite MLflow store, no Ray). As root with ``ip`` and ``tc``: a ``ShapedLink`` limits what TCP
gets to its rate and leaves nothing behind (also on an exception, on SIGTERM, and after SIGKILL at the
next start); a two-node ``ShapedRayCluster`` runs a 2-trial sweep with one Train worker per node whose
runs record ``raygd.network = shaped``, and afterwards its namespace, veth pair and qdiscs are gone.
Elsewhere those tests skip, naming why (``-ra`` prints it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raygd import costmodel as cm
from raygd import project
from raygd.config import ConfigError
from raygd.network import NETWORK_TAG, RATE_TAG, SHAPED, SHAPED_ENV, network_tags, shaped_rate_mbit
from raygd.records import KIND_TAG, MECHANISM_LABEL_TAG, STATUS_TAG, SWEEP_KIND, TRIAL_TAG
from raygd.tracking import create_run
from tests.localray import BIN, marked_pids
from tests.netlink import SUBNET, ShapedLink, ShapedRayCluster, run, unavailable

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable()
needs_link = pytest.mark.skipif(REASON is not None, reason=f"no shaped link here: {REASON}")


def _gone(link: ShapedLink) -> None:
    """Nothing of ``link`` is left: no namespace (``ip netns list``), no veth (``ip link``), no qdisc of it."""
    assert link.namespace not in run("ip", "netns", "list").stdout
    links = run("ip", "-o", "link", "show").stdout
    assert link.host_dev not in links and link.node_dev not in links
    assert link.host_dev not in run("tc", "qdisc", "show").stdout
    assert link.exists() == {"namespace": False, "veth": False, "qdisc": False}


# --- tags and the projection of shaped runs (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    "env, network, world_size, expected",
    [
        ({}, None, 2, {}),
        ({SHAPED_ENV: "100"}, None, 2, {NETWORK_TAG: SHAPED, RATE_TAG: "100"}),
        ({SHAPED_ENV: "2.5"}, None, 2, {NETWORK_TAG: SHAPED, RATE_TAG: "2.5"}),
        ({SHAPED_ENV: "100"}, None, 1, {}),  # one worker: nothing crosses the link
        ({SHAPED_ENV: "10"}, object(), 2, {NETWORK_TAG: "emulated", RATE_TAG: "10"}),  # the wait on top of the link
        ({SHAPED_ENV: " "}, None, 2, {}),
    ],
)
def test_network_tags_name_a_shaped_link_from_the_drivers_environment(env, network, world_size, expected):
    assert network_tags(network, world_size, env) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["fast", "0", "-3", "nan", "inf"])
def test_a_bad_shaped_rate_is_refused_naming_the_variable(value):
    with pytest.raises(ConfigError, match=SHAPED_ENV):
        shaped_rate_mbit({SHAPED_ENV: value})


def test_shaped_link_bandwidth_is_the_tcp_payload_share_of_the_rate():
    link = cm.shaped_link(100.0)
    assert link.bandwidth_bytes_per_s == pytest.approx(100e6 / 8 * 1448 / 1514)
    with pytest.raises(ValueError, match="rate_mbit"):
        cm.shaped_link(0.0)


def test_project_takes_the_shaped_transfer_out_of_shaped_runs_step_times(sqlite_uri):
    """Runs over a shaped link at two rates and one unshaped: the compute fit is the same machine's compute."""
    fixed, per_example, params = 2e-3, 1e-5, 330
    parent = create_run(sqlite_uri, "shaped", "sweep", {}, {KIND_TAG: SWEEP_KIND})
    client = MlflowClient(sqlite_uri)
    for i, (batch, rate) in enumerate([(32, None), (256, None), (64, 1.0), (128, 10.0)]):
        p = {"train.model": "logreg", "data.name": "synthetic", "data.synthetic_features": 32, "data.n": 4096}
        p.update({"train.num_workers": 2, "train.global_batch_size": batch, "train.step_size": 0.1, "train.seed": 0})
        p.update({"mechanism.name": "vanilla", "data.num_classes": 10})
        tags = {TRIAL_TAG: f"t{i}", MECHANISM_LABEL_TAG: "vanilla", STATUS_TAG: "reached_target"}
        step_s = fixed + per_example * batch / 2
        if rate is not None:
            tags.update(network_tags(None, 2, {SHAPED_ENV: f"{rate:g}"}))
            step_s += cm.comm_time(4 * params, 2, cm.shaped_link(rate))
        run_id = create_run(sqlite_uri, "shaped", f"t{i}", p, tags, parent_run_id=parent)
        for key, value in {"steps": 100, "train_time_s": 100 * step_s, "updates_to_accuracy": 100}.items():
            client.log_metric(run_id, key, value)
        client.log_metric(run_id, "time_to_accuracy_s", 100 * step_s)
        client.set_terminated(run_id, "FINISHED")
    trials = project.read_trials(sqlite_uri, parent)
    assert sorted(t.shaped_rate_mbit or 0 for t in trials) == [0, 0, 1.0, 10.0]
    (compute, fit), *_ = project.fit_measured_compute(trials).values()
    assert compute.per_example_s == pytest.approx(per_example) and compute.fixed_s == pytest.approx(fixed)
    assert fit is not None and fit.max_relative_residual < 1e-9


# --- the link itself (root, ip, tc) -----------------------------------------------------------------------------


def _tcp_mbit(link: ShapedLink, nbytes: int) -> float:
    """Goodput of one TCP transfer from the root namespace into the link's namespace (a receiver there)."""
    receiver = (
        "import socket,sys\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((sys.argv[1],0));s.listen(1)\n"
        "print(s.getsockname()[1],flush=True);c,_=s.accept();n=0\n"
        "while n<int(sys.argv[2]):\n b=c.recv(1<<20)\n if not b: break\n n+=len(b)\n"
        "c.sendall(b'k')\n"
    )
    cmd = ["ip", "netns", "exec", link.namespace, sys.executable, "-c", receiver, link.node_ip, str(nbytes)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection((link.node_ip, port), timeout=30) as conn:
            start = time.perf_counter()
            conn.sendall(b"\0" * nbytes)
            conn.recv(1)
            elapsed = time.perf_counter() - start
    finally:
        proc.wait(timeout=30)
    return nbytes * 8 / elapsed / 1e6


@needs_link
def test_tbf_limits_what_tcp_gets_across_the_pair_to_the_rate():
    with ShapedLink(rate_mbit=20) as link:
        assert link.exists() == {"namespace": True, "veth": True, "qdisc": True}
        assert "rate 20Mbit" in link.qdiscs() and link.qdiscs().count("tbf") == 2  # both ends
        shaped = _tcp_mbit(link, 5_000_000)  # 2 s at the rate
        assert 0.75 * 20 < shaped <= 20 * 1.02, shaped  # the payload's share of the rate, less on a busy machine
        link.set_rate(None)
        assert "tbf" not in link.qdiscs()
        assert _tcp_mbit(link, 5_000_000) > 3 * 20  # unshaped: the veth's own speed
    _gone(link)


@needs_link
def test_the_link_uses_only_its_own_slash_30_and_names():
    before = run("ip", "-o", "-4", "addr", "show").stdout
    with ShapedLink(rate_mbit=100) as link:
        assert link.pair is not None and link.pair.prefixlen == 30 and link.pair.subnet_of(SUBNET)
        added = set(run("ip", "-o", "-4", "addr", "show").stdout.splitlines()) - set(before.splitlines())
        assert [line.split()[1] for line in added] == [link.host_dev] and link.host_ip in added.pop()
        routes = run("ip", "route", "show", "dev", link.host_dev).stdout.split()
        assert routes[0] == str(link.pair)  # the pair's own connected route, nothing beyond it
        inside = run("ip", "-o", "link", "show", ns=link.namespace).stdout
        assert link.node_dev in inside and len(inside.splitlines()) == 2  # lo and its end of the pair, nothing else
    assert run("ip", "-o", "-4", "addr", "show").stdout == before
    _gone(link)


@needs_link
def test_an_exception_inside_the_context_removes_everything():
    with pytest.raises(RuntimeError, match="boom"), ShapedLink(rate_mbit=50) as link:
        assert link.exists()["namespace"]
        raise RuntimeError("boom")
    _gone(link)


@needs_link
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_process_stopped_by_a_signal_removes_its_link(sig):
    code = (  # SIGINT handled as in a terminal (a shell's background job, CI's perhaps, starts it ignored)
        "import signal,sys,time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.netlink import ShapedLink\n"
        "with ShapedLink(rate_mbit=10) as link:\n"
        "    print(link.namespace, link.host_dev, link.node_dev, flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    namespace, host_dev, node_dev = proc.stdout.readline().split()
    link = ShapedLink()
    link.namespace, link.host_dev, link.node_dev = namespace, host_dev, node_dev
    assert link.exists()["namespace"]
    proc.send_signal(sig)
    assert proc.wait(timeout=30) != 0
    _gone(link)


@needs_link
def test_a_link_left_by_a_killed_process_is_removed_by_the_next_one():
    code = (
        "import sys,time; sys.path.insert(0, sys.argv[1])\n"
        "from tests.netlink import ShapedLink\n"
        "link = ShapedLink(rate_mbit=10).up()\n"
        "print(link.namespace, link.host_dev, link.node_dev, flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    namespace, host_dev, node_dev = proc.stdout.readline().split()
    proc.kill()  # SIGKILL: no handler, no atexit
    proc.wait(timeout=30)
    stale = ShapedLink()
    stale.namespace, stale.host_dev, stale.node_dev = namespace, host_dev, node_dev
    assert stale.exists()["namespace"]
    with ShapedLink(rate_mbit=10) as fresh:
        assert fresh.exists()["namespace"]
        _gone(stale)
    _gone(fresh)


# --- two Ray nodes over the link --------------------------------------------------------------------------------

RATE_MBIT = 10.0
FEATURES = 2048
"""Logistic regression on 2048 features: 20,490 parameters, an 82 KB all-reduce, ~70 ms at 10 Mbit/s."""
SWEEP = [
    "quickstart",
    *("--set", "data.name=synthetic", "--set", f"data.synthetic_features={FEATURES}"),
    *("--set", "data.synthetic_size=1024", "--set", "data.eval_size=256", "--set", "data.train_size=null"),
    *("--set", "train.max_passes=1", "--set", "train.eval_every_passes=0.5", "--set", "train.target_accuracy=0.99"),
    *("--set", "sweep.space.step_size=[0.1]", "--set", "sweep.space.global_batch_size=[64, 128]"),
    *("--set", "sweep.space.mechanism=[{name: vanilla}]", "--set", "sweep.extend_edges=false"),
    *("--set", "train.diversity_estimator=none", "--set", "sweep.name=shaped-smoke"),
]


def _train_worker_nodes(cluster: ShapedRayCluster) -> list[str]:
    import requests

    r = requests.get(
        f"{cluster.dashboard_url}/api/v0/actors",
        params={"limit": 1000, "detail": "true"},
        headers=cluster.auth_headers(),
        timeout=30,
    )
    r.raise_for_status()
    actors = r.json()["data"]["result"]["result"]
    return [a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker" and a.get("node_id")]  # placed


@needs_link
@pytest.mark.ray
def test_a_sweep_on_two_nodes_over_a_shaped_link_records_it_and_leaves_nothing_behind(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen_nodes: set[str] = set()
    with ShapedRayCluster(rate_mbit=RATE_MBIT) as cluster:
        cluster.start()
        link, marker = cluster.link, cluster.marker
        assert {n["node_ip"] for n in cluster.alive_nodes()} == {link.host_ip, link.node_ip}
        env = {**cluster.driver_env(), "HOME": str(tmp_path)}
        assert env[SHAPED_ENV] == "10" and env["RAY_ADDRESS"].startswith(f"{link.host_ip}:")
        done = threading.Event()

        def watch() -> None:  # the Train workers' nodes while the pool is up
            while not done.wait(1.0):
                with contextlib.suppress(Exception):  # the State API may be slow to answer on a busy machine
                    seen_nodes.update(_train_worker_nodes(cluster))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cmd = [str(BIN / "raygd"), "sweep", *SWEEP, "--set", f"tracking.tracking_uri={uri}"]
        cmd += ["--set", f"sweep.storage_path={tmp_path / 'tune'}"]
        out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=540)
        done.set()
        watcher.join(timeout=5)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        seen_nodes.update(_train_worker_nodes(cluster))
        nodes = {n["node_id"] for n in cluster.alive_nodes()}
    assert len(nodes) == 2 and seen_nodes == nodes, (seen_nodes, nodes)  # one Train worker on each node

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("shaped-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get(KIND_TAG) != SWEEP_KIND]
    assert len(children) == 2
    payload = 4 * (FEATURES * 10 + 10)
    transfer_s = cm.comm_time(payload, 2, cm.shaped_link(RATE_MBIT))
    for child in children:
        tags, metrics = child.data.tags, child.data.metrics
        assert tags[NETWORK_TAG] == SHAPED and tags[RATE_TAG] == "10" and tags["cluster.nodes"] == "2"
        assert child.data.params["train.num_workers"] == "2"
        # every update's all-reduce crossed the 10 Mbit/s link: each step took at least its transfer
        assert metrics["train_time_s"] / metrics["steps"] > 0.9 * transfer_s, (metrics, transfer_s)
    trials = project.read_trials(uri, next(r.info.run_id for r in runs if r.data.tags.get(KIND_TAG) == SWEEP_KIND))
    assert {t.shaped_rate_mbit for t in trials} == {RATE_MBIT}

    _gone(link)
    assert marked_pids(marker) == []
    assert not any(name.startswith(f"raygd-{os.getpid()}-") for name in run("ip", "netns", "list").stdout.split())
