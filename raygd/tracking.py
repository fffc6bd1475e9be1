"""MLflow records for a run: params, provenance tags, step and summary metrics.

The driver creates the run before Ray starts (so a run that fails to start is still
recorded as FAILED) and ends it; rank zero of the Train workers logs step metrics to
that run id through a ``Tracker``, which is a no-op on every other rank: the one seam
for rank-zero work. Ray's ``setup_mlflow`` starts its own run inside the worker, which
cannot be created before the workers exist nor nested under a sweep's parent run, so
the client calls here are made with MLflow's ``MlflowClient`` directly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from raygd import __version__
from raygd.records import ATTEMPT_TAG, GIT_COMMIT_TAG, PARENT_TAG, VERSION_TAG

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

SYSTEM_METRICS_INTERVAL_S = 2.0
"""Seconds between samples of a run's system metrics (each sample is one point, ``system/...`` at steps 0, 1, ...);
MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it."""
METRICS_FLUSH_S = 5.0
"""Inside ``Tracker.buffered`` (the training loop), metrics reach the store at most this long after
they are logged: one ``log_batch`` per interval instead of one per evaluation (~14 ms of CPU each into
SQLite here, a round trip each to a cluster's tracking server)."""
MAX_METRICS_PER_BATCH = 1000
"""MLflow's limit on the metrics of one ``log_batch`` call."""


def redact_uri(uri: str) -> str:
    """Replace the password in ``scheme://user:password@host`` (and token-like query values) with ***."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if parts.password:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(?i)((?:token|password|secret|key)=)[^&]*", r"\1***", parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing secret; urlunsplit would also drop a slash of sqlite:////abs/path
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def git_commit(cwd: Path | None = None) -> str:
    """The git commit of the working tree (``-dirty`` if modified), ``$RAYGD_GIT_COMMIT`` where the tree
    has no ``.git`` (a job shipped by ``raygd submit``), or ``unknown``."""
    import os

    if os.environ.get("RAYGD_GIT_COMMIT"):
        return os.environ["RAYGD_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance_tags(extra: dict[str, Any] | None = None) -> dict[str, str]:
    """raygd/ray/torch/mlflow versions and git commit, plus ``extra`` (e.g. cluster shape)."""
    import mlflow
    import ray
    import torch

    tags = {
        VERSION_TAG: __version__,
        GIT_COMMIT_TAG: git_commit(Path(__file__).resolve().parent),
        "ray.version": ray.__version__,
        "torch.version": torch.__version__,
        "mlflow.version": mlflow.__version__,
    }
    tags.update({k: str(v) for k, v in (extra or {}).items()})
    return tags


def check_tracking_store(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any Ray work, if the MLflow store cannot be written or reached.

    ``sqlite:///path``: the folder must exist and be writable (and the file, if it exists).
    ``http(s)://``: the server must answer (any HTTP status counts; only a failed connection fails).
    Other database stores are left to MLflow. Raises ``ConfigError`` naming tracking.tracking_uri.
    """
    import os
    import urllib.error
    import urllib.request

    from raygd.config import ConfigError

    shown = redact_uri(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        folder = path.parent
        problem = (
            f"the folder {folder} does not exist"
            if not folder.is_dir()
            else f"the folder {folder} is not writable"
            if not os.access(folder, os.W_OK | os.X_OK)
            else f"{path} is a folder"
            if path.is_dir()
            else f"{path} is not writable"
            if path.exists() and not os.access(path, os.W_OK)
            else None
        )
        if problem:
            raise ConfigError(
                f"tracking.tracking_uri = {shown!r} cannot be used: {problem}. Point it at a writable "
                "place, e.g. --set tracking.tracking_uri=sqlite:///mlflow.db (the working directory)."
            )
    elif urlsplit(tracking_uri).scheme in ("http", "https"):
        try:
            urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # the server answered (e.g. 401 behind auth, 404 on a proxy): reachable
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"tracking.tracking_uri = {shown!r} cannot be reached ({reason}). Start the server first, e.g. "
                "`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`, forward its "
                "port if it runs on a cluster, or use a local store: --set tracking.tracking_uri=sqlite:///mlflow.db."
            ) from None


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def create_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create an MLflow run holding ``params`` and ``tags``; returns its run id.

    ``parent_run_id`` nests the run under a parent (MLflow's ``mlflow.parentRunId`` tag).
    Values that look like URIs are logged with passwords redacted.
    """
    from mlflow.entities import Param

    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    safe = {k: redact_uri(v) if isinstance(v, str) and "://" in v else v for k, v in params.items()}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(safe.items())])
    return run.info.run_id


def log_dataset(tracking_uri: str, run_id: str, data_cfg: Any, data: Any) -> None:
    """Record the run's training data as an MLflow dataset input (the UI's Dataset column and filter).

    Name: the data set (with ``-r<r>`` when replicated); digest: the data config and the training labels;
    profile: examples, classes, replication, evaluation sample and test examples.
    """
    import dataclasses
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    spec = dataclasses.asdict(data_cfg)
    r = int(spec.get("replication", 1))
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode())
    digest.update(data.y_train.cpu().numpy().tobytes())
    profile = {
        "num_rows": data.n,
        "num_classes": data.num_classes,
        "replication": r,
        "eval_size": spec.get("eval_size"),
        "test_rows": int(data.x_test.shape[0]),
    }
    schema = {"features": {"shape": list(data.input_shape), "dtype": "float32"}, "targets": "class index"}
    dataset = Dataset(
        name=f"{spec['name']}-r{r}" if r > 1 else str(spec["name"]),
        digest=digest.hexdigest()[:16],
        source_type="local",
        source=json.dumps({"name": spec["name"], "data_dir": spec.get("data_dir")}, default=str),
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )
    tags = [InputTag("mlflow.data.context", "training")]
    _client(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])


class Tracker:
    """Logs metrics to one MLflow run from rank zero; every method is a no-op when disabled.

    Args:
        tracking_uri: absolute MLflow tracking URI.
        run_id: the run created by the driver, or None for no tracking at all.
        enabled: True on rank zero only.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool):
        self.run_id = run_id
        self._run = (_client(tracking_uri), run_id) if enabled and run_id and tracking_uri else None
        """(client, run id) where this rank logs, else None."""
        self.enabled = self._run is not None
        self.logged_through = -1
        """Step metrics at steps <= this are not logged again (set on a restart, see ``resume_point``)."""
        self._pending: list[Any] = []
        """Metrics logged but not yet sent (only inside ``buffered``)."""
        self._flush_every_s = 0.0
        self._flushed_at = time.monotonic()

    def resume_point(self, key: str) -> tuple[int, float | None]:
        """The last step logged for ``key`` in this run and its value ((-1, None) if none, or disabled).

        After a restart the loop redoes the steps between its checkpoint and the failure;
        ``log_metrics`` skips steps up to this one so the history has no duplicate steps.
        """
        self.flush()
        if self._run is None:
            return -1, None
        client, run_id = self._run
        history = client.get_metric_history(run_id, key)
        if not history:
            return -1, None
        last = max(history, key=lambda m: m.step)
        return last.step, last.value

    def next_attempt(self) -> int:
        """Count this start of the training loop in the run's ``raygd.attempt`` tag; returns it (1 = first)."""
        if self._run is None:
            return 1
        client, run_id = self._run
        attempt = int(client.get_run(run_id).data.tags.get(ATTEMPT_TAG, "0")) + 1
        self.set_tags({ATTEMPT_TAG: attempt})
        return attempt

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log flat slash-named metrics at ``step`` (non-finite values are skipped)."""
        if self._run is None or step <= self.logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and _finite(v)]
        if time.monotonic() - self._flushed_at >= self._flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Send the metrics ``buffered`` holds back (in batches of MLflow's limit)."""
        pending, self._pending, self._flushed_at = self._pending, [], time.monotonic()
        if self._run is None or not pending:
            return
        client, run_id = self._run
        for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=pending[i : i + MAX_METRICS_PER_BATCH])

    @contextlib.contextmanager
    def buffered(self, flush_every_s: float | None = None) -> Iterator[Tracker]:
        """Within the block, ``log_metrics`` sends what it holds at most every ``flush_every_s``
        (default ``METRICS_FLUSH_S``; 0 sends at every call, as outside the block).

        Everything held is sent on leaving the block, also when it raises, and before any other
        call to the run (tags, status, artifacts, end), so the store never lags the run's own
        record. A process that dies inside the block loses at most ``flush_every_s`` of metrics;
        a restart redoes them from its checkpoint (``run_loop`` flushes before each checkpoint).
        """
        saved, self._flush_every_s = self._flush_every_s, METRICS_FLUSH_S if flush_every_s is None else flush_every_s
        try:
            yield self
        finally:
            self._flush_every_s = saved
            self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush()
        if self._run is None:
            return
        from mlflow.entities import RunTag

        client, run_id = self._run
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path) -> None:
        self.flush()
        if self._run is not None:
            client, run_id = self._run
            client.log_artifact(run_id, str(path))

    def status(self) -> str | None:
        """The run's MLflow status (RUNNING, FINISHED, FAILED, KILLED), or None when disabled."""
        self.flush()
        if self._run is None:
            return None
        client, run_id = self._run
        return client.get_run(run_id).info.status

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status: FINISHED, FAILED or KILLED."""
        self.flush()
        if self._run is not None:
            client, run_id = self._run
            client.set_terminated(run_id, status)


def _finite(value: Any) -> bool:
    try:
        return float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def system_metrics(
    tracking_uri: str | None, run_id: str | None, enabled: bool, interval_s: float = SYSTEM_METRICS_INTERVAL_S
) -> Iterator[SystemMetricsMonitor | None]:
    """MLflow's own system-metrics logging for the run while the block runs (rank zero's node).

    MLflow's ``SystemMetricsMonitor`` samples CPU utilisation, memory, disk and network every
    ``interval_s`` (and GPU utilisation and memory where ``nvidia-ml-py`` finds an NVIDIA GPU) in a
    daemon thread and logs them as ``system/cpu_utilization_percentage``,
    ``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage``, ...
    On leaving the block, also when it raises, the thread is stopped and joined (it does not wait for
    the next sample), and one last sample is logged, so a run shorter than ``interval_s`` has one too.
    Continues the steps of an earlier attempt of the run (a restart). Yields the monitor, or None when
    disabled or when the monitor cannot start (psutil missing): metrics are never worth failing a run.
    """
    monitor = None
    if enabled and run_id and tracking_uri:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # INFO lines at start and stop
            # MLflow infers int from its default of 10; any number of seconds works (Event.wait).
            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=interval_s,  # pyright: ignore[reportArgumentType]
                resume_logging=True,
                tracking_uri=tracking_uri,
            )
            monitor.start()
        except Exception as err:  # psutil missing, store unreachable: the run goes on without them
            logging.getLogger(__name__).warning("raygd: no system metrics for run %s: %r", run_id, err)
            monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            _stop_system_metrics(monitor)


def _stop_system_metrics(monitor: SystemMetricsMonitor) -> None:
    """Stop and join the sampling thread, then log one last sample (the thread is gone: no race)."""
    with contextlib.suppress(Exception):  # the store may be what failed; the run's own error matters
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
