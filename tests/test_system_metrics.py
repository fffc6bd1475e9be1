"""System metrics of a run through MLflow's own monitor (``raygd.tracking.system_metrics``), on a real SQLite store."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from raygd.tracking import create_run, system_metrics

CPU, MEMORY = "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"


def _monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def _run(uri: str) -> str:
    return create_run(uri, "system-metrics", "monitored", {"a": 1}, {})


def test_a_monitored_run_records_cpu_and_memory_and_the_thread_ends_with_the_block(sqlite_uri):
    run_id = _run(sqlite_uri)
    with system_metrics(sqlite_uri, run_id, enabled=True, interval_s=0.5) as monitor:
        assert monitor is not None and len(_monitor_threads()) == 1
        busy_until = time.monotonic() + 2.5
        while time.monotonic() < busy_until:  # some CPU to measure
            sum(i * i for i in range(10_000))
        left = time.monotonic()
    assert time.monotonic() - left < 0.5 + 0.5  # joined at once, not after another sample
    assert _monitor_threads() == []

    client = MlflowClient(sqlite_uri)
    metrics = client.get_run(run_id).data.metrics
    assert {CPU, MEMORY} <= set(metrics), sorted(metrics)
    cpu = client.get_metric_history(run_id, CPU)
    assert len(cpu) >= 3 and sorted(m.step for m in cpu) == list(range(len(cpu)))  # ~5 samples + the last one
    assert all(0.0 <= m.value <= 100.0 for m in cpu) and max(m.value for m in cpu) > 0.0
    assert all(m.value > 0 for m in client.get_metric_history(run_id, MEMORY))


def test_a_run_shorter_than_the_interval_still_gets_a_sample_and_a_restart_continues_the_steps(sqlite_uri):
    run_id = _run(sqlite_uri)
    for _ in range(2):  # two attempts of one run, each shorter than the interval
        with system_metrics(sqlite_uri, run_id, enabled=True, interval_s=60):
            time.sleep(0.2)
    assert _monitor_threads() == []
    steps = sorted(m.step for m in MlflowClient(sqlite_uri).get_metric_history(run_id, CPU))
    assert steps == [0, 1]  # each attempt one point (its samples averaged), the second after the first


def test_the_monitor_stops_when_the_block_raises_and_is_off_on_other_ranks(sqlite_uri):
    run_id = _run(sqlite_uri)
    with pytest.raises(RuntimeError, match="boom"), system_metrics(sqlite_uri, run_id, enabled=True, interval_s=60):
        raise RuntimeError("boom")
    assert _monitor_threads() == []
    assert CPU in MlflowClient(sqlite_uri).get_run(run_id).data.metrics

    other = _run(sqlite_uri)
    with system_metrics(sqlite_uri, other, enabled=False) as monitor:
        assert monitor is None and _monitor_threads() == []
    assert MlflowClient(sqlite_uri).get_run(other).data.metrics == {}
