"""Each example under ``examples/`` at its smoke size: examples/charlm (model, data, raygd's own loop, the CLI).

The Ray test (``raygd train`` through the real CLI in a subprocess) is listed in conftest.py's
``STARTS_RAY_IN_A_SUBPROCESS``; the others need no Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from examples.charlm import data as charlm_data
from examples.charlm.model import build
from raygd.config import load_run_config
from raygd.data import load_data
from raygd.diversity import gradient_diversity, norm_routes
from raygd.loop import train_rank
from raygd.loss import mean_loss
from raygd.models import check_workload

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CHARLM = [
    "data.name=examples.charlm.data:load",
    "data.args={train_sequences: 64, test_sequences: 16, context: 32}",
    "train.model=examples.charlm.model:build",
]


@pytest.fixture(scope="module")
def small():
    return charlm_data.load(train_sequences=64, test_sequences=16)


def test_charlm_data_is_fixed_vocabulary_next_char_windows(small):
    train, test = small
    x, y = train.tensors
    assert x.shape == y.shape == (64, 64) and x.dtype == y.dtype == torch.long
    assert test.tensors[0].shape == (16, 64)
    assert train.num_classes == test.num_classes == len(charlm_data.VOCAB) == 98
    assert int(max(x.max(), y.max())) < train.num_classes and int(min(x.min(), y.min())) >= 0
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one char
    assert train.source.startswith(f"python{sys.version_info.major}.{sys.version_info.minor}.")
    again = [charlm_data.load(train_sequences=8, test_sequences=4, max_files=24, seed=s)[0] for s in (0, 0, 1)]
    assert torch.equal(again[0].tensors[0], again[1].tensors[0])  # deterministic
    assert not torch.equal(again[0].tensors[0], again[2].tensors[0])
    assert again[0].source.endswith("24 files (21 train, 3 test)")


def test_charlm_splits_by_file_and_maps_other_chars_to_unknown():
    files = charlm_data.stdlib_files()
    assert len(files) >= 2 and files == sorted(files)
    train_files, test_files = charlm_data.split_files(files, seed=0, test_fraction=0.125)
    assert not set(train_files) & set(test_files) and sorted(train_files + test_files) == files
    assert len(test_files) == max(1, round(len(files) * 0.125))
    ids = charlm_data.encode("def f(x):\n\treturn x  # é\r")
    assert charlm_data.decode(ids) == "def f(x):\n\treturn x  # \ufffd\ufffd"
    with pytest.raises(ValueError, match="train_sequences"):
        charlm_data.load(train_sequences=10**9, max_files=4)


def test_charlm_model_gives_logits_per_position_and_sgd_lowers_the_loss(small):
    torch.manual_seed(0)
    x, y = small[0].tensors
    model = build((64,), small[0].num_classes)
    assert model(x[:3]).shape == (3, 64, 98)
    assert model.head.weight is not model.tok.weight  # untied: exact per-example norms refuse shared weights
    assert all(not isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm)) for m in model.modules())
    assert set(norm_routes(model).values()) <= {"ghost:embedding", "ghost:layer_norm", "ghost:linear"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(8):  # 8 sequences of 32 chars (T may be below the context)
        loss = mean_loss(model(x[:8, :32]), y[:8, :32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses
    with pytest.raises(ValueError, match="input_shape"):
        build((8, 8), 98)


def test_charlm_exact_diversity_matches_a_loop_over_sequences(small):
    torch.manual_seed(0)
    x, y = small[0].tensors[0][:6, :16], small[0].tensors[1][:6, :16]
    model = build((16,), 98, d_model=32, n_heads=2).double()
    div = gradient_diversity(model, x, y, batch_size=4)
    grads = []
    for i in range(6):
        model.zero_grad()
        mean_loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = torch.stack(grads)
    assert div.n == 6
    assert div.sum_sq_norms == pytest.approx(float((g * g).sum()), rel=1e-6)
    assert div.sum_grad_sq_norm == pytest.approx(float(g.sum(0) @ g.sum(0)), rel=1e-6)


def test_charlm_trains_in_raygd_loop_by_import_string(monkeypatch):
    monkeypatch.chdir(REPO)  # the README runs it from the repository root
    cfg = load_run_config(
        None,
        [
            *CHARLM,
            "train.num_workers=1",
            "data.eval_size=32",
            "train.bound_sample=16",
            "train.target_loss=3.3",
            "train.step_size=0.1",
            "train.global_batch_size=8",
            "train.max_passes=6",
            "train.eval_every_passes=0.25",
        ],
    )
    data = load_data(cfg.data, cfg.train.seed)
    assert data.n == 64 and data.num_classes == 98 and data.input_shape == (32,)
    check_workload(cfg, data)
    logged = []
    summary = train_rank(cfg, data, report=logged.append)
    assert summary.status == "reached_target", summary
    assert logged[-1]["train/loss"] <= 3.3 < logged[0]["train/loss"]
    assert logged[-1]["diversity/batch_bound"] >= 1


def test_charlm_raygd_train_cli_reaches_a_loss_target(tmp_path):
    db = tmp_path / "mlflow.db"
    overrides = [
        *CHARLM,
        "train.num_workers=2",
        "train.global_batch_size=8",
        "train.step_size=0.1",
        "train.target_loss=3.3",
        "train.max_passes=6",
        "train.eval_every_passes=0.25",
        "data.eval_size=32",
        "train.bound_sample=16",
        "mechanism.name=dropconnect",
        "mechanism.drop_prob=0.1",
        "mechanism.dropconnect_granularity=per_worker",
        f"tracking.tracking_uri=sqlite:///{db}",
        "tracking.experiment_name=charlm-smoke",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, "-m", "raygd.cli", "train", str(EXAMPLES / "charlm/train.yaml")]
        + [a for o in overrides for a in ("--set", o)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("charlm-smoke").experiment_id])
    assert run.data.tags.get("raygd.status") == "reached_target", json.dumps(run.data.tags)[:2000]
    assert run.data.metrics["train/loss"] <= 3.3
    assert run.data.params["train.model"] == "examples.charlm.model:build"
