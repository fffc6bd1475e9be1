"""A real multi-node Ray cluster and a real MLflow server on this machine, started and stopped by PID.

Other people run Ray on the same machine, so nothing here uses a default port, the default
``/tmp/ray`` temp dir, ``~/.ray/auth_token`` or ``ray stop`` (which kills every Ray process
of the user). Each node is ``ray start --block`` in its own session with free ports and its
own temp dir; every process started carries a unique marker in its environment, and
``stop()`` ends exactly the processes that carry it (job drivers run in sessions of their
own, so the session id alone would miss them). Token authentication is on, with a token
file that lives in the cluster's folder.

    with LocalRayCluster(tmp_path) as cluster:
        cluster.start(head_cpus=0, node_cpus=(1,))   # a head and a 1-CPU worker node
        cluster.dashboard_url                         # the Jobs API, for raygd submit --address
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent
MARKER_VAR = "RAYGD_TEST_CLUSTER_ID"
READY_LINE = "This command will now block forever"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """The IP address Ray picks for nodes on this machine."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def marked_pids(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``MARKER_VAR=marker`` (this process excluded)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            pids.append(int(entry))
    return pids


def kill_marked(marker: str, grace_s: float = 3.0) -> int:
    """SIGTERM every process carrying ``marker``, SIGKILL what is left after ``grace_s``; returns the count."""
    pids = marked_pids(marker)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in marked_pids(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not marked_pids(marker):
            break
    return len(pids)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait until ``text`` appears in ``log``; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace") if log.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{content[-3000:]}")
        time.sleep(0.3)
    raise TimeoutError(f"{text!r} not in {log} after {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")


class LocalRayCluster:
    """A head node and extra nodes, each ``ray start --block`` with free ports and token auth."""

    def __init__(self, root: Path | None = None, extra_env: dict[str, str] | None = None):
        # Unix socket paths are limited to ~107 bytes: keep Ray's temp dirs short, under /tmp.
        self.root = Path(tempfile.mkdtemp(prefix="rgd", dir="/tmp")) if root is None else root
        self.marker = uuid.uuid4().hex
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(24))
        self.token_path.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                MARKER_VAR: self.marker,
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0",
                **(extra_env or {}),
            }
        )
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.procs: list[subprocess.Popen] = []
        self.gcs_address: str | None = None
        self.dashboard_url: str | None = None

    def _launch(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{name[:1]}", dir=self.root))
        log = self.root / f"{name}.log"
        ports = {
            flag: free_port()
            for flag in (
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port",
                "--metrics-export-port",
            )
        }
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            f"--temp-dir={temp_dir}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            *[f"{k}={v}" for k, v in ports.items()],
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
            )
        self.procs.append(proc)
        return proc, log

    def start(
        self,
        head_cpus: int = 0,
        node_cpus: tuple[int, ...] = (),
        autoscaling_config: Path | None = None,
        gcs_port: int | None = None,
        timeout_s: float = 180,
    ) -> None:
        """Start the head (its dashboard, i.e. the Jobs API, on 127.0.0.1 only) and, at the same time, one
        worker node per entry of ``node_cpus`` (``ray start --address`` waits for the head's GCS).

        A node whose ``ray start`` exits during start-up (a free port taken by someone else between
        choosing and binding it, on a busy machine) is started once more with new ports.
        """
        fixed_gcs_port = gcs_port
        for attempt in (1, 2):
            gcs_port, dash_port = fixed_gcs_port or free_port(), free_port()
            args = [
                "--head",
                f"--port={gcs_port}",
                f"--dashboard-port={dash_port}",
                "--dashboard-host=127.0.0.1",
                f"--ray-client-server-port={free_port()}",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--num-cpus={head_cpus}",
            ]
            if autoscaling_config is not None:
                args.append(f"--autoscaling-config={autoscaling_config}")
            self.gcs_address = f"{node_ip()}:{gcs_port}"
            self.dashboard_url = f"http://127.0.0.1:{dash_port}"
            head = self._launch(f"head{attempt}", args)
            # Worker nodes get their own temp dir: nodes on one machine must not share runtime_resources/.
            node_args = [[f"--address={self.gcs_address}", f"--num-cpus={cpus}"] for cpus in node_cpus]
            nodes = [self._launch(f"node{i + 1}-{attempt}", a) for i, a in enumerate(node_args)]
            try:
                wait_for_line(head[1], READY_LINE, head[0], timeout_s)
                break
            except RuntimeError:
                kill_marked(self.marker)  # this attempt's head and nodes
                if attempt == 2:
                    raise
        for i, (proc, log) in enumerate(nodes):
            try:
                wait_for_line(log, READY_LINE, proc, timeout_s)
            except RuntimeError:
                proc, log = self._launch(f"node{i + 1}-again", node_args[i])
                wait_for_line(log, READY_LINE, proc, timeout_s)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the State API (HTTP, with the token)."""
        import requests

        r = requests.get(
            f"{self.dashboard_url}/api/v0/nodes",
            params={"limit": 1000, "detail": "true"},
            headers=self.auth_headers(),
            timeout=30,
        )
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def client_env(self) -> dict[str, str]:
        """Environment for a client of this cluster (token file, no stray RAY_ADDRESS)."""
        env = dict(self.env)
        env.pop(MARKER_VAR)
        return env

    def stop(self) -> int:
        """End every process this cluster started; returns how many there were."""
        count = kill_marked(self.marker)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return count

    def remove_files(self) -> None:
        """Delete the cluster's folder (logs, temp dirs, token); call after ``stop()``."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port, SQLite store in ``root`` (or ``backend_store_uri``, e.g.
    a PostgreSQL database of tests/pgserver.py); ``extra_args`` go to ``mlflow server``; stopped by PID."""

    def __init__(
        self,
        root: Path,
        backend_store_uri: str | None = None,
        workers: int = 1,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "mlflow-server.log"
        store = backend_store_uri or f"sqlite:///{root / 'server.db'}"
        # MLflow's job runner (7 huey consumer processes, for GenAI jobs) is not needed to track runs.
        env = {**os.environ, **(env or {}), MARKER_VAR: self.marker, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    store,
                    "--artifacts-destination",
                    str(root / "artifacts"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(workers),
                    *extra_args,
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=root,
            )

    def wait_ready(self, timeout_s: float = 120) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not ready after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        kill_marked(self.marker)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
