"""Autoscaling on one machine: Ray's fake multi-node provider adds nodes for a sweep and removes them after.

Starts a real Ray head (0 CPUs, token auth, free ports) whose autoscaler uses
``provider: {type: fake_multinode}``: a "node" it launches is a real raylet on this machine.
A ``raygd sweep`` whose trials need ``--workers`` CPUs (one per Train worker) cannot run on
the head, so the autoscaler must add worker nodes; after the sweep the nodes sit idle and
``idle_timeout_minutes`` must remove them. The script records the number of alive worker
nodes every second and prints a timeline and a verdict; it exits 1 if nodes were not added,
the sweep failed, or idle nodes were not removed. Everything it started is stopped by PID.

    .venv/bin/python -m bench.autoscale [--workers 2] [--idle-timeout-s 10]

cluster/README.md shows its output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.localray import BIN, LocalRayCluster, free_port, node_ip

REPO = Path(__file__).resolve().parents[1]

WORKER_TYPE = "ray.worker.cpu"


def fake_cluster_config(gcs_address: str, max_nodes: int, idle_timeout_s: float) -> dict:
    """A complete autoscaler config for the fake provider (the monitor reads it as is: nothing is filled in)."""
    return {
        "cluster_name": "raygd-fake",
        "max_workers": max_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_launch_config_check": True,
            "disable_node_updaters": True,
        },
        "auth": {"ssh_user": "nobody"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": max_nodes},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class Timeline(threading.Thread):
    """Polls the alive worker node count every ``period_s`` seconds."""

    def __init__(self, cluster: LocalRayCluster, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.cluster, self.period_s = cluster, period_s
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self.samples: list[tuple[float, int]] = []
        self.events: list[tuple[float, str]] = []
        self.stopped = threading.Event()

    def mark(self, event: str) -> None:
        self.events.append((time.monotonic() - self.t0, event))

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                count = sum(1 for n in self.cluster.alive_nodes() if not n.get("is_head_node"))
            except Exception:  # the dashboard is busy on 2 cores: skip this sample
                count = None
            if count is not None:
                self.samples.append((time.monotonic() - self.t0, count))
            self.stopped.wait(self.period_s)

    def nodes_now(self) -> int:
        return self.samples[-1][1] if self.samples else -1


def sweep_command(workers: int, root: Path) -> list[str]:
    sets = [
        "data.name=synthetic",
        "data.train_size=null",
        "data.eval_size=512",
        "data.synthetic_size=2048",
        f"train.num_workers={workers}",
        "train.max_passes=1",
        "train.target_accuracy=0.6",
        "sweep.space.step_size=[0.4]",
        "sweep.space.global_batch_size=[64]",
        "sweep.space.mechanism=[{name: vanilla}]",
        "sweep.name=autoscale-bench",
        f"sweep.storage_path={root / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]
    return [str(BIN / "raygd"), "sweep", "quickstart", *[a for s in sets for a in ("--set", s)]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Train workers per trial = CPUs = fake nodes needed")
    parser.add_argument("--idle-timeout-s", type=float, default=10.0, help="autoscaler idle_timeout_minutes, in s")
    parser.add_argument("--scale-down-timeout-s", type=float, default=180.0)
    args = parser.parse_args()

    cluster = LocalRayCluster(extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    config_path = cluster.root / "fake-cluster.yaml"
    ok = False
    try:
        # The provider needs the GCS address before the head starts: reserve the port, write the config.
        gcs_port = free_port()
        config = fake_cluster_config(f"{node_ip()}:{gcs_port}", args.workers, args.idle_timeout_s)
        config_path.write_text(json.dumps(config))
        t_start = time.monotonic()
        cluster.start(head_cpus=0, autoscaling_config=config_path, gcs_port=gcs_port)
        print(
            f"head up in {time.monotonic() - t_start:.1f} s at {cluster.gcs_address}; "
            f"fake provider, worker type {WORKER_TYPE} (1 CPU), max {args.workers} nodes, "
            f"idle timeout {args.idle_timeout_s:g} s",
            flush=True,
        )
        timeline = Timeline(cluster)
        timeline.start()
        env = {**cluster.client_env(), "RAY_ADDRESS": cluster.gcs_address}
        timeline.mark("sweep submitted")
        sweep = subprocess.run(
            sweep_command(args.workers, cluster.root),
            env=env,
            cwd=cluster.root,
            capture_output=True,
            text=True,
            timeout=900,
        )
        timeline.mark(f"sweep exited {sweep.returncode}")
        peak = max((n for _, n in timeline.samples), default=0)
        deadline = time.monotonic() + args.scale_down_timeout_s
        while timeline.nodes_now() != 0 and time.monotonic() < deadline:
            time.sleep(1)
        timeline.mark(f"worker nodes now {timeline.nodes_now()}")
        timeline.stopped.set()
        timeline.join()
        events = autoscaler_events(cluster.root, timeline.t0_wall)
        print_timeline(timeline, events)
        table = [line for line in sweep.stdout.splitlines() if line.startswith(("|", "raygd sweep"))]
        print("\n".join(table) or sweep.stdout[-2000:] + sweep.stderr[-3000:])
        removed_idle = any("(idle)" in text for _, text in events)
        ok = sweep.returncode == 0 and peak >= args.workers and timeline.nodes_now() == 0 and removed_idle
        print(
            f"\nverdict: nodes added {peak} (needed {args.workers}), sweep exit {sweep.returncode}, "
            f"idle nodes left {timeline.nodes_now()}, removed as idle by the autoscaler: {removed_idle} "
            f"-> {'OK' if ok else 'FAILED'}"
        )
    finally:
        stopped = cluster.stop()
        print(
            f"stopped {stopped} processes started by this script (by PID)"
            + ("" if ok else f"; logs kept in {cluster.root}")
        )
        if ok:
            cluster.remove_files()
    return 0 if ok else 1


def autoscaler_events(root: Path, t0_wall: float) -> list[tuple[float, str]]:
    """The autoscaler's own ``:event_summary:`` lines from the head's monitor.log, in seconds since ``t0_wall``."""
    events = []
    for log in root.glob("h*/session_2*/logs/monitor.log"):
        for line in log.read_text(errors="replace").splitlines():
            if ":event_summary:" in line:
                stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
                events.append((stamp - t0_wall, "autoscaler: " + line.split(":event_summary:", 1)[1].strip()))
    return events


def print_timeline(timeline: Timeline, events: list[tuple[float, str]]) -> None:
    """One line per change in the worker node count, with the events in between."""
    rows, last = list(events), None
    for t, n in timeline.samples:
        if n != last:
            rows.append((t, f"worker nodes alive: {n}"))
            last = n
    rows += timeline.events
    print("\n  t (s)  event")
    for t, text in sorted(rows):
        print(f"{t:7.1f}  {text}")


if __name__ == "__main__":
    sys.exit(main())
