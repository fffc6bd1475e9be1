"""Load on a cluster's MLflow server: concurrent trials logging through raygd's tracker, PostgreSQL vs SQLite.

Every trial of every sweep on a cluster logs to one ``mlflow server`` on the head. This bench
starts, on 127.0.0.1 only, a throwaway PostgreSQL server (tests/pgserver.py) and two MLflow
servers as cluster/mlflow-server.sh runs them (gunicorn, ``--workers 2``, job runner off): one
backed by a PostgreSQL database, one by a SQLite file. Against each, ``--writers`` concurrent
writers each act as one trial: a run created with ``raygd.tracking.create_run`` (as the sweep
driver does), then ``Tracker.log_metrics`` of ``--metrics`` metrics at each of ``--steps`` steps
(as a trial's rank-0 Train worker does, one ``log-batch`` request per step). Then every run's
metric history is read back and compared point by point.

Writers are processes (forked), not threads: each trial on a cluster is its own process with
its own HTTP connection, and MLflow's client spends real CPU per request (protobuf/JSON, requests),
which threads would serialise on one GIL, so a thread pool would measure the client, not the server.

Printed per backend: points written (log calls that returned), points read back with the right
value, points lost, log calls that raised (after MLflow's client's own retries), 5xx answers in
the server's access log (MLflow's client retries those), p50/p99 latency of one ``log_metrics`` call,
and the wall time of the logging phase. Exits 1 if a point is lost or a backend did not answer.

    .venv/bin/python -m bench.tracking_load                          # 64 writers x 200 steps x 10 metrics
    .venv/bin/python -m bench.tracking_load --writers 8 --steps 20   # smoke size, seconds

cluster/README.md shows its output.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.localray import MlflowServer
from tests.pgserver import PostgresServer

REPO = Path(__file__).resolve().parents[1]

BACKENDS = ("postgresql", "sqlite")
EXPERIMENT = "tracking-load"
ACCESS_STATUS = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3}) ')


@dataclass
class LoadResult:
    """What one backend did under the load."""

    backend: str
    writers: int
    steps: int
    metrics: int
    written: int = 0
    """Points whose ``log_metrics`` call returned."""
    read_back: int = 0
    """Points found in the runs' metric histories with the value that was logged."""
    log_errors: int = 0
    """``log_metrics`` calls (and run creations) that raised, after MLflow's client retried."""
    server_5xx: int = 0
    requests: int = 0
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    runs_found: int = 0

    @property
    def expected(self) -> int:
        return self.writers * self.steps * self.metrics

    @property
    def lost(self) -> int:
        return self.expected - self.read_back

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def metric_value(writer: int, step: int, k: int) -> float:
    """The value writer ``writer`` logs for metric ``k`` at ``step``: distinct and exact in a float."""
    return writer * 1_000_000 + step * 100 + k


def metric_key(k: int) -> str:
    return f"load/m{k:02d}"


def _writer(index: int, uri: str, steps: int, metrics: int, start, out) -> None:
    """One trial: create its run (as the sweep driver does), wait for the others, log every step (as rank 0)."""
    from raygd.tracking import Tracker, create_run

    latencies, written, errors, run_id = [], 0, 0, None
    try:
        run_id = create_run(
            uri, EXPERIMENT, f"writer-{index:03d}", {"writer": index, "steps": steps}, {"bench": "tracking_load"}
        )
    except Exception:  # counted, like every failed call
        errors += 1
    start.wait()
    if run_id is not None:
        tracker = Tracker(uri, run_id, enabled=True)
        for step in range(steps):
            values = {metric_key(k): metric_value(index, step, k) for k in range(metrics)}
            t0 = time.perf_counter()
            try:
                tracker.log_metrics(values, step)
                written += metrics
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - t0)
    out.put((index, run_id, written, errors, latencies))


def run_load(backend: str, uri: str, writers: int, steps: int, metrics: int) -> LoadResult:
    """``writers`` forked writer processes against the MLflow server at ``uri``; then read every point back."""
    from mlflow.tracking import MlflowClient

    result = LoadResult(backend, writers, steps, metrics)
    client = MlflowClient(uri)  # MLflow keys its HTTP sessions by PID: forked writers open their own
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(i, uri, steps, metrics, start, out)) for i in range(writers)]
    for p in procs:
        p.start()
    start.wait(timeout=600)  # every run created: the logging phase starts for all at once
    t0 = time.perf_counter()
    runs = {}
    for _ in procs:
        index, run_id, written, errors, latencies = out.get(timeout=3600)
        runs[index] = run_id
        result.written += written
        result.log_errors += errors
        result.latencies_s += latencies
    result.wall_s = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=60)
    result.read_back = _read_back(client, runs, steps, metrics)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    result.runs_found = len(client.search_runs([experiment.experiment_id], max_results=10_000))
    return result


def _read_back(client, runs: dict[int, str | None], steps: int, metrics: int) -> int:
    """Points of every run's history that match what its writer logged (each (step, value) at most once)."""

    def found(item: tuple[int, str, int]) -> int:
        index, run_id, k = item
        history = client.get_metric_history(run_id, metric_key(k))
        got = {(m.step, m.value) for m in history}
        return sum((step, metric_value(index, step, k)) in got for step in range(steps))

    items = [(i, run_id, k) for i, run_id in runs.items() if run_id for k in range(metrics)]
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(found, items))


def count_statuses(access_log: Path) -> tuple[int, int]:
    """(requests, 5xx answers) in a gunicorn access log."""
    codes = ACCESS_STATUS.findall(access_log.read_text(errors="replace")) if access_log.exists() else []
    return len(codes), sum(c.startswith("5") for c in codes)


def start_servers(root: Path, backends: tuple[str, ...], workers: int) -> tuple[PostgresServer | None, dict]:
    """A PostgreSQL server (if asked for) and one MLflow server per backend, all on 127.0.0.1; waits until ready."""
    pg, servers = None, {}
    try:
        if "postgresql" in backends:
            pg = PostgresServer().start()
            pg.create_database("mlflow")
        for backend in backends:
            folder = root / backend
            folder.mkdir(parents=True, exist_ok=True)
            # The cluster's way: the URI carries no password; libpq reads it from PGPASSWORD (~/.pgpass there).
            store = pg.uri("mlflow", password=False) if backend == "postgresql" else None
            env = {"PGPASSWORD": pg.password} if backend == "postgresql" else None
            servers[backend] = MlflowServer(
                folder,
                backend_store_uri=store,
                workers=workers,
                env=env,
                extra_args=("--gunicorn-opts", f"--access-logfile {folder / 'access.log'}"),
            )
        for server in servers.values():
            server.wait_ready(timeout_s=240)
    except BaseException:
        stop_servers(pg, servers)
        raise
    return pg, servers


def stop_servers(pg: PostgresServer | None, servers: dict) -> None:
    for server in servers.values():
        server.stop()
    if pg is not None:
        pg.stop()
        pg.remove_files()


def bench(
    backends: tuple[str, ...], writers: int, steps: int, metrics: int, workers: int, root: Path | None = None
) -> list[LoadResult]:
    """Start the servers, load each backend in turn (never both at once), stop everything by PID.

    ``root``: where the servers keep their stores and logs (default: a temporary folder, deleted at the end).
    """
    own_root = root is None
    root = Path(tempfile.mkdtemp(prefix="rgdload")) if own_root else root
    try:
        pg, servers = start_servers(root, backends, workers)
        try:
            results = []
            for backend, server in servers.items():
                result = run_load(backend, server.url, writers, steps, metrics)
                result.requests, result.server_5xx = count_statuses(server.log.parent / "access.log")
                results.append(result)
            return results
        finally:
            stop_servers(pg, servers)
    finally:
        if own_root:
            shutil.rmtree(root, ignore_errors=True)


def table(results: list[LoadResult]) -> str:
    rows = [
        "| backend | writers × steps × metrics | points written | read back | lost | log errors | server 5xx |"
        " requests | p50 log (ms) | p99 log (ms) | wall (s) | points/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.backend} | {r.writers} × {r.steps} × {r.metrics} | {r.written} | {r.read_back} | {r.lost} | "
            f"{r.log_errors} | {r.server_5xx} | {r.requests} | {r.latency_ms(0.50):.1f} | "
            f"{r.latency_ms(0.99):.1f} | {r.wall_s:.1f} | {r.written / r.wall_s:.0f} |"
        )
    return "\n".join(rows)


def context_line(workers: int) -> str:
    import mlflow

    commit = (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        or "unknown"
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{datetime.date.today()}, commit {commit}, {os.cpu_count()} cores, load average {load}, "
        f"mlflow {mlflow.__version__}, gunicorn --workers {workers}, everything on 127.0.0.1"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, default=64, help="concurrent trials (processes)")
    ap.add_argument("--steps", type=int, default=200, help="log_metrics calls per trial")
    ap.add_argument("--metrics", type=int, default=10, help="metrics per call")
    ap.add_argument("--workers", type=int, default=2, help="MLflow server workers (cluster/mlflow-server.sh: 2)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: postgresql,sqlite")
    args = ap.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    if not set(backends) <= set(BACKENDS):
        ap.error(f"--backends: choose from {','.join(BACKENDS)}")
    print(f"before: {context_line(args.workers)}", flush=True)
    results = bench(backends, args.writers, args.steps, args.metrics, args.workers)
    print(table(results))
    print(f"after: {context_line(args.workers)}")
    bad = [r.backend for r in results if r.lost or r.runs_found != r.writers]
    print(
        "verdict: "
        + (
            f"points lost or runs missing on {', '.join(bad)} -> FAIL"
            if bad
            else "every point read back on every backend -> OK"
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
