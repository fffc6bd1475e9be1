"""raygd submit: bad input stops before any work; a real two-node Ray cluster runs a submitted sweep.

The integration test starts, on this machine, a Ray head (0 CPUs, token auth, free ports), a
second node with 1 CPU (so the Train worker can only run there) and a real ``mlflow server``
on 127.0.0.1; the nodes get ``MLFLOW_TRACKING_URI`` the way the configs in ``cluster/`` set it.
``raygd submit`` ships a user's working directory (a folder holding only ``usernet.py``, their own
model and data by import string) and runs a one-trial sweep with it; the runs are then read back
from the server over HTTP. Everything started is stopped by PID (never ``ray stop``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raygd.config import ConfigError
from raygd.submit import build_entrypoint, resolve_address, split_entrypoint, working_dir_size
from tests.localray import LocalRayCluster, MlflowServer, free_port, marked_pids

REPO = Path(__file__).resolve().parents[1]
SWEEP = [
    "raygd",
    "sweep",
    "quickstart",
    "--set",
    "data.name=usernet:load",
    "--set",
    "train.model=usernet:build",
    "--set",
    "data.train_size=null",
    "--set",
    "data.eval_size=512",
    "--set",
    "train.num_workers=1",
    "--set",
    "train.max_passes=1",
    "--set",
    "train.target_accuracy=0.6",
    "--set",
    "sweep.space.step_size=[0.4]",
    "--set",
    "sweep.space.global_batch_size=[64]",
    "--set",
    "sweep.space.mechanism=[{name: vanilla}]",
    "--set",
    "sweep.name=cluster-smoke",
]


USER_MODULE = """
import torch
from torch import nn


def load(n=1280):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    y = (x @ torch.randn(32, 10, generator=g)).argmax(1)
    return (x[:1024], y[:1024]), (x[1024:], y[1024:])


def build(input_shape, num_classes, width=32):
    d = input_shape[0]
    return nn.Sequential(nn.Linear(d, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, num_classes))
"""


def raygd(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "raygd.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )


def user_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no Ray address or token variables, an empty home (no ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), **extra)
    return env


def submit_main(monkeypatch, capsys, tmp_path: Path, *args: str, **env: str) -> tuple[int, str, str]:
    """``raygd submit ...`` in this process (main() as the console script calls it) under ``user_env``."""
    from raygd.cli import main

    for key in os.environ:
        if key.startswith(("RAY_", "MLFLOW_")):
            monkeypatch.delenv(key)
    for key, value in user_env(tmp_path, **env).items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    code = main(["submit", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --- pure parts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, rest, command",
    [
        (["submit", "--", "raygd", "sweep", "q", "--set", "a=1"], ["submit"], ["raygd", "sweep", "q", "--set", "a=1"]),
        (
            ["submit", "--address", "h:1", "--", "raygd", "sweep", "--", "x"],
            ["submit", "--address", "h:1"],
            ["raygd", "sweep", "--", "x"],
        ),
        (["submit", "--status", "j"], ["submit", "--status", "j"], None),
        (["train", "c.yaml", "--", "x"], ["train", "c.yaml", "--", "x"], None),
    ],
)
def test_split_entrypoint_cuts_only_submit_at_the_first_double_dash(argv, rest, command):
    assert split_entrypoint(argv) == (rest, command)


@pytest.mark.parametrize(
    "flag, env, expected",
    [
        ("http://10.0.0.5:8265", {}, "http://10.0.0.5:8265"),
        ("127.0.0.1:9000", {}, "http://127.0.0.1:9000"),
        ("head.internal", {}, "http://head.internal:8265"),
        ("https://ray.example.com/", {}, "https://ray.example.com"),
        (None, {"RAY_API_SERVER_ADDRESS": "http://a:1"}, "http://a:1"),
        (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "http://127.0.0.1:8265"),  # a GCS address is not the Jobs API
        (None, {"RAY_ADDRESS": "http://b:2"}, "http://b:2"),
    ],
)
def test_resolve_address(monkeypatch, flag, env, expected):
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_address(flag) == expected


@pytest.mark.parametrize("flag", ["ray://head:10001", "auto", "http://h:port", "ftp://h:21", "http://:8265"])
def test_resolve_address_rejects_what_is_not_a_jobs_api_url(flag):
    with pytest.raises(ConfigError, match="from --address"):
        resolve_address(flag)


@pytest.mark.parametrize(
    "command, uri, expected",
    [
        (
            ["raygd", "sweep", "quickstart"],
            "http://10.0.0.2:5000",
            "raygd sweep quickstart --set tracking.tracking_uri=http://10.0.0.2:5000",
        ),
        (
            ["raygd", "train", "c.yaml", "--set", "tracking.tracking_uri=http://x:1"],
            "http://10.0.0.2:5000",
            "raygd train c.yaml --set tracking.tracking_uri=http://x:1",
        ),
        (
            ["raygd", "report", "quickstart"],
            "http://10.0.0.2:5000",
            "raygd report quickstart --tracking-uri http://10.0.0.2:5000",
        ),
        (
            ["python", "-m", "raygd.cli", "diversity", "c.yaml"],
            "http://m:5000",
            "python -m raygd.cli diversity c.yaml --set tracking.tracking_uri=http://m:5000",
        ),
        (["python", "script.py", "--x", "a b"], "http://m:5000", "python script.py --x 'a b'"),
    ],
)
def test_build_entrypoint_makes_the_tracking_uri_explicit(command, uri, expected):
    assert build_entrypoint(command, uri) == expected


def test_build_entrypoint_default_reads_the_clusters_mlflow_uri_in_the_jobs_shell(tmp_path):
    line = build_entrypoint(["raygd", "sweep", "q"], "cluster")
    run = "printf '%s\\n' " + line.split(" --set ", 1)[1]
    with_uri = subprocess.run(
        ["sh", "-c", run], capture_output=True, text=True, env={"MLFLOW_TRACKING_URI": "http://10.1.2.3:5000"}
    )
    assert with_uri.stdout.strip() == "tracking.tracking_uri=http://10.1.2.3:5000"
    without = subprocess.run(["sh", "-c", run], capture_output=True, text=True, env={})
    assert without.returncode != 0 and "raygd submit --tracking-uri" in without.stderr


def test_working_dir_excludes_leave_out_venv_git_and_mlflow_stores(tmp_path):
    (tmp_path / "raygd").mkdir()
    (tmp_path / "raygd" / "code.py").write_text("x = 1\n")
    for junk in (
        ".venv/lib/big.bin",
        ".git/objects/pack",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "raygd/__pycache__/code.pyc",
        "sub/mlartifacts/a.png",
    ):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_bytes(b"\0" * 4096)
    from raygd.submit import WORKING_DIR_EXCLUDES

    assert working_dir_size(tmp_path, WORKING_DIR_EXCLUDES) == (6, 1)
    assert working_dir_size(tmp_path, [])[1] == 7


# --- bad input: exit 2, the input named, the fix given, nothing started or uploaded --------------------------------


@pytest.mark.parametrize(
    "args, extra_env, named",
    [
        (["--address", "ray://head:10001", "--", "raygd", "sweep", "quickstart"], {}, "--address"),
        (
            ["--address", "http://127.0.0.1:{closed}", "--", "raygd", "sweep", "quickstart"],
            {},
            "cannot reach the Ray Jobs API at http://127.0.0.1:{closed}",
        ),
        (
            ["--", "raygd", "sweep", "quickstart"],
            {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:{closed}"},
            "ray dashboard cluster/aws.yaml",
        ),
        (
            [
                "--address",
                "http://127.0.0.1:{closed}",
                "--working-dir",
                "/nonexistent/dir",
                "--",
                "raygd",
                "sweep",
                "q",
            ],
            {},
            "--working-dir",
        ),
        (
            ["--address", "http://127.0.0.1:{closed}", "--", "raygd", "sweep", "q"],
            {"RAY_AUTH_TOKEN_PATH": "/nonexistent/token"},
            "RAY_AUTH_TOKEN_PATH",
        ),
        (["--address", "http://127.0.0.1:{closed}", "raygd", "sweep", "q", "--set", "a=1"], {}, "without `--`"),
        (
            [
                "--address",
                "http://127.0.0.1:{closed}",
                "--tracking-uri",
                "sqlite:///mlflow.db",
                "--",
                "raygd",
                "sweep",
                "q",
            ],
            {},
            "--tracking-uri 'sqlite:///mlflow.db'",
        ),
        (["--status", "raysubmit_x", "--", "raygd", "sweep", "q"], {}, "not both"),
        ([], {}, "needs a command after `--`"),
        (["--logs", "raysubmit_x", "--follow", "--stop", "raysubmit_y"], {}, None),  # argparse: not allowed together
    ],
)
def test_bad_input_exits_2_naming_it(monkeypatch, capsys, tmp_path, args, extra_env, named):
    closed = str(free_port())
    args = [a.replace("{closed}", closed) for a in args]
    env = {k: v.replace("{closed}", closed) for k, v in extra_env.items()}
    try:
        code, out, err = submit_main(monkeypatch, capsys, tmp_path, *args, **env)
    except SystemExit as exit_:  # argparse's own usage errors
        code, out, err = exit_.code, *capsys.readouterr()
    assert code == 2, err
    assert named is None or named.replace("{closed}", closed) in err
    assert out == ""  # no job id: nothing was submitted


def test_missing_double_dash_from_the_real_command_line(tmp_path):
    out = raygd("submit", "raygd", "sweep", "quickstart", "--set", "train.step_size=0.1", env=user_env(tmp_path))
    assert out.returncode == 2 and "without `--`" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_oversized_working_dir_is_refused_before_contacting_the_cluster(monkeypatch, capsys, tmp_path):
    big = tmp_path / "proj"
    big.mkdir()
    with open(big / "data.bin", "wb") as f:
        f.truncate(101 * 2**20)  # sparse: the size counts, the disk does not
    code, _out, err = submit_main(
        monkeypatch,
        capsys,
        tmp_path,
        "--address",
        f"http://127.0.0.1:{free_port()}",
        "--working-dir",
        str(big),
        "--",
        "raygd",
        "sweep",
        "q",
    )
    assert code == 2 and "--working-dir" in err and "--exclude" in err, err
    assert "cannot reach" not in err


# --- a real two-node cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + one 1-CPU node, token auth, and an MLflow server the nodes know as MLFLOW_TRACKING_URI."""
    cluster = None
    mlflow_server = None
    try:
        cluster = LocalRayCluster()
        mlflow_server = MlflowServer(cluster.root / "mlflow")  # starts while Ray starts
        cluster.env["MLFLOW_TRACKING_URI"] = mlflow_server.url
        cluster.start(head_cpus=0, node_cpus=(1,))
        mlflow_server.wait_ready()
        cluster.mlflow = mlflow_server
        yield cluster
    finally:
        markers = []
        if mlflow_server is not None:
            mlflow_server.stop()
            markers.append(mlflow_server.marker)
        if cluster is not None:
            cluster.stop()
            markers.append(cluster.marker)
        assert all(marked_pids(m) == [] for m in markers), "processes left running"
        if cluster is not None:
            cluster.remove_files()


def client_env(cluster: LocalRayCluster, tmp_path: Path) -> dict[str, str]:
    """What a user sets: the token file only (raygd sends the token itself, RAY_AUTH_MODE unset)."""
    return user_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(cluster.token_path))


def test_submit_runs_a_sweep_on_the_cluster_and_its_runs_land_in_the_mlflow_server(
    cluster, tmp_path, monkeypatch, capsys
):
    from mlflow.tracking import MlflowClient

    storage = cluster.root / "tune"
    work = tmp_path / "work"  # the user's working directory: their module, nothing of raygd's
    work.mkdir()
    (work / "usernet.py").write_text(USER_MODULE)
    start = time.monotonic()
    out = raygd(
        "submit",
        "--address",
        cluster.dashboard_url,
        "--",
        *SWEEP,
        "--set",
        f"sweep.storage_path={storage}",
        env=client_env(cluster, tmp_path),
        cwd=work,
        timeout=480,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    job_id = out.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_"), out.stdout[:500]
    assert "raygd sweep cluster-smoke: 1 trials" in out.stdout  # the job's logs were streamed
    assert f"job {job_id} SUCCEEDED" in out.stderr

    client = MlflowClient(cluster.mlflow.url)  # read back over HTTP
    experiment = client.get_experiment_by_name("cluster-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raygd.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 1, [r.data.tags for r in runs]
    child = children[0]
    assert child.data.tags["cluster.nodes"] == "2" and child.data.params["train.num_workers"] == "1"
    # the head has 0 CPUs: the one Train worker ran on the second node, importing usernet from the shipped folder
    assert child.data.params["train.model"] == "usernet:build" and child.data.params["model.class"] == "Sequential"
    assert len(client.get_metric_history(child.info.run_id, "train/accuracy")) >= 1
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "summary.md" in artifacts, artifacts

    print(f"submitted sweep finished in {elapsed:.1f} s")
    token = {"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}
    code, out, _ = submit_main(
        monkeypatch, capsys, tmp_path, "--address", cluster.dashboard_url, "--status", job_id, **token
    )
    assert code == 0 and "SUCCEEDED" in out and "--set tracking.tracking_uri=" in out
    code, out, _ = submit_main(
        monkeypatch, capsys, tmp_path, "--address", cluster.dashboard_url, "--logs", job_id, **token
    )
    assert code == 0 and "raygd sweep cluster-smoke" in out


@pytest.mark.parametrize(
    "token_env, named",
    [
        ({}, "requires token authentication and no token was found"),
        ({"RAY_AUTH_TOKEN": "not-the-cluster-token"}, "rejected the token from $RAY_AUTH_TOKEN"),
    ],
)
def test_cluster_token_is_required_and_checked_before_upload(cluster, monkeypatch, capsys, tmp_path, token_env, named):
    import requests

    listed = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.auth_headers(), timeout=30).json()
    code, out, err = submit_main(
        monkeypatch, capsys, tmp_path, "--address", cluster.dashboard_url, "--", "python", "-c", "print(1)", **token_env
    )
    assert code == 2 and named in err and "RAY_AUTH_TOKEN_PATH" in err and out == "", err
    after = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.auth_headers(), timeout=30).json()
    assert len(after) == len(listed)  # nothing was submitted


def test_stop_ends_a_running_job(cluster, monkeypatch, capsys, tmp_path):
    token = {"RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}
    address = ["--address", cluster.dashboard_url]
    code, out, err = submit_main(
        monkeypatch,
        capsys,
        tmp_path,
        *address,
        "--working-dir",
        str(tmp_path),
        "--no-wait",
        "--",
        "sleep",
        "300",
        **token,
    )
    assert code == 0, err
    job_id = out.strip()
    code, out, err = submit_main(monkeypatch, capsys, tmp_path, *address, "--stop", job_id, **token)
    assert code == 0 and "STOPPED" in out, out + err
    code, out, err = submit_main(monkeypatch, capsys, tmp_path, *address, "--status", "raysubmit_nope", **token)
    assert code == 2 and "raysubmit_nope" in err and "--list" in err
