"""The raygd command line: help, and bad input rejected before Ray starts with nothing recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def raygd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raygd.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_train():
    out = raygd("--help", cwd=REPO)
    assert out.returncode == 0 and "train" in out.stdout
    assert "--set" in raygd("train", "--help", cwd=REPO).stdout


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["train.global_batch_size=33"], "train.global_batch_size"),
        (["mechanism.drop_prob=1.2"], "mechanism.drop_prob"),
        (["train.model=vgg16"], "train.model"),
        (["data.data_dir=/nonexistent/fmnist"], "data.data_dir"),
        (["data.train_size=100000"], "data.train_size"),
        (["train.global_batch_size=1024"], "train.global_batch_size"),
    ],
)
def test_bad_input_exits_2_naming_it_and_records_nothing(tmp_path, idx_dir, overrides, named):
    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("raygd-quickstart")  # an existing store stays untouched
    base = [f"data.data_dir={idx_dir}", "data.train_size=null", f"tracking.tracking_uri=sqlite:///{db}"]
    out = raygd(
        "train",
        str(REPO / "configs/quickstart.yaml"),
        *[a for o in base + overrides for a in ("--set", o)],
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert named in out.stderr and "Traceback" not in out.stderr
    assert "Started a local Ray" not in out.stderr
    assert (
        MlflowClient(f"sqlite:///{db}").search_runs(
            [e.experiment_id for e in MlflowClient(f"sqlite:///{db}").search_experiments()]
        )
        == []
    )


def test_the_printed_mlflow_ui_command_runs_from_where_it_was_printed(tmp_path):
    # After `make`, the venv is not activated: the command must name an mlflow that exists (not rely on PATH).
    import shutil

    from raygd.cli import mlflow_ui_command

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = mlflow_ui_command(uri).split()
    exe = command[0]
    assert Path(exe).is_file() if "/" in exe else shutil.which(exe) is not None, command
    assert command[1:] == ["ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5000"]
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)  # from this cwd
    assert out.returncode == 0 and "version" in out.stdout.lower()
    assert mlflow_ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000 in a browser"
