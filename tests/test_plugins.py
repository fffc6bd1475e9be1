"""The user's own model and data by import string (``raygd.plugins``), sequence models and the loss target,
on a real user module written to a folder and imported from the working directory; no Ray."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from raygd.config import load_run_config
from raygd.data import DataError, load_data
from raygd.loop import train_rank
from raygd.loss import correct_and_count, example_losses, mean_loss, summed_loss
from raygd.models import build_model, check_workload, model_size

USER_MODULE = '''
import torch
from torch import nn


class Pairs(torch.utils.data.Dataset):
    """A map-style data set of (input, label) pairs, as users write them."""

    num_classes = 4

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 12, generator=g)
        teacher = torch.randn(12, 4, generator=torch.Generator().manual_seed(99))
        self.y = (self.x @ teacher).argmax(1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load(n_train=512, n_test=128):
    return Pairs(n_train, 0), Pairs(n_test, 1)


def mlp(input_shape, num_classes, width=32):
    (d,) = input_shape
    return nn.Sequential(nn.Linear(d, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, num_classes))


def copy_task(n_train=256, n_test=64, length=8, vocab=6):
    """Predict the token one position back (position 0 wraps around: 7 of 8 positions are learnable)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(vocab, (n_train + n_test, length), generator=g)
    y = x.roll(1, dims=1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class Window(nn.Module):
    def __init__(self, vocab, d):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        e = self.embed(x)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.head(self.norm(torch.relu(self.mix(torch.cat([e, prev], dim=-1)))))


def window(input_shape, num_classes, d=16):
    return Window(num_classes, d)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``userplugins`` in a fresh folder that is the working directory (not on sys.path until raygd puts it there)."""
    (tmp_path / "userplugins.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    sys.modules.pop("userplugins", None)
    yield tmp_path
    sys.modules.pop("userplugins", None)


def _cfg(*overrides: str):
    return load_run_config(None, ["train.num_workers=1", "data.eval_size=128", "train.bound_sample=0", *overrides])


def test_a_map_style_user_data_set_becomes_tensors_with_its_class_count(user_module):
    cfg = _cfg("data.name=userplugins:load", "data.args={n_train: 300, n_test: 50}")
    data = load_data(cfg.data, seed=0)
    import userplugins  # raygd put the working directory on sys.path

    ref = userplugins.Pairs(300, 0)
    assert data.n == 300 and data.num_classes == 4 and data.input_shape == (12,)
    assert torch.equal(data.x_train, ref.x) and torch.equal(data.y_train, ref.y)
    sub = load_data(_cfg("data.name=userplugins:load", "data.train_size=100", "data.replication=4").data, seed=3)
    assert sub.n == 100 and len(torch.unique(sub.x_train, dim=0)) == 25  # r = 4: a quarter of them, four times


def test_a_user_model_and_data_train_to_a_loss_target(user_module):
    cfg = _cfg(
        "data.name=userplugins:load",
        "train.model=userplugins:mlp",
        "train.model_args={width: 24}",
        "train.target_loss=0.6",
        "train.step_size=0.5",
        "train.global_batch_size=32",
        "train.max_passes=20",
        "train.diversity_estimator=in_step",
    )
    assert cfg.train.target_accuracy is None and cfg.train.target_label == "train loss <= 0.6"
    data = load_data(cfg.data, cfg.train.seed)
    check_workload(cfg, data)
    logged = []
    summary = train_rank(cfg, data, report=logged.append)
    assert summary.status == "reached_target", summary
    assert logged[-1]["train/loss"] <= 0.6 < logged[0]["train/loss"]
    assert all(m["train/loss"] > 0.6 for m in logged[:-1])  # stopped at the first evaluation at or below it
    assert math.isfinite(logged[-1]["diversity/batch_bound"]) and logged[-1]["diversity/batch_bound"] >= 1


def test_a_sequence_model_counts_sequences_and_token_accuracy(user_module):
    cfg = _cfg(
        "data.name=userplugins:copy_task",
        "train.model=userplugins:window",
        "train.target_accuracy=0.85",
        "train.step_size=2.0",
        "train.global_batch_size=16",
        "train.max_passes=40",
        "train.diversity_estimator=in_step",
    )
    data = load_data(cfg.data, cfg.train.seed)
    assert data.n == 256 and data.y_train.shape == (256, 8) and data.num_classes == 6
    check_workload(cfg, data)
    summary = train_rank(cfg, data)
    assert summary.status == "reached_target" and summary.final_train_accuracy >= 0.85
    assert summary.passes_to_accuracy == pytest.approx(summary.steps * 16 / 256)  # passes over sequences


def test_sequence_loss_and_accuracy_match_a_loop_over_examples_and_positions():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(5, 7, 11, generator=g, dtype=torch.float64), torch.randint(11, (5, 7), generator=g)
    per_example = torch.stack(
        [sum(F.cross_entropy(logits[i, t : t + 1], y[i, t : t + 1]) for t in range(7)) / 7 for i in range(5)]
    )
    assert torch.allclose(example_losses(logits, y), per_example)
    assert float(summed_loss(logits, y)) == pytest.approx(float(per_example.sum()))
    assert float(mean_loss(logits, y)) == pytest.approx(float(per_example.mean()))
    right = sum(int(logits[i, t].argmax() == y[i, t]) for i in range(5) for t in range(7))
    assert correct_and_count(logits, y) == (right, 35)
    flat_logits, flat_y = logits[:, 0], y[:, 0]
    assert torch.allclose(example_losses(flat_logits, flat_y), F.cross_entropy(flat_logits, flat_y, reduction="none"))


def test_model_size_counts_linear_macs_per_position(user_module):
    cfg = _cfg("data.name=userplugins:copy_task", "train.model=userplugins:window", "train.model_args={d: 16}")
    data = load_data(cfg.data, 0)
    model = build_model(cfg.train.model, data.input_shape, data.num_classes, cfg.train.model_args)
    params, grad_bytes, macs = model_size(model, data.x_train[:1])
    assert params == sum(p.numel() for p in model.parameters()) and grad_bytes == 4 * params
    assert macs == 8 * (32 * 16 + 16 * 6)  # T = 8 positions through mix (2d -> d) and head (d -> vocab)


def test_a_data_set_over_the_memory_limit_is_refused_naming_the_limit(user_module, monkeypatch):
    monkeypatch.setenv("RAYGD_MAX_DATA_BYTES", "1000")
    with pytest.raises(DataError, match=r"data.name = 'userplugins:load' holds .* over the .*RAYGD_MAX_DATA_BYTES"):
        load_data(_cfg("data.name=userplugins:load").data, 0)


def test_the_readme_image_example_trains_by_import_string(idx_dir, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repository root, as the README runs it
    cfg = _cfg(
        f"data.data_dir={idx_dir}",
        "train.model=examples.fashion_mlp.model:build",
        "train.model_args={width: 64}",
        "train.target_accuracy=0.7",
        "train.global_batch_size=32",
        "train.max_passes=10",
    )
    data = load_data(cfg.data, cfg.train.seed)
    model = check_workload(cfg, data)
    assert [type(m).__name__ for m in model][1:3] == ["Linear", "LayerNorm"]
    summary = train_rank(cfg, data)
    assert summary.status == "reached_target", summary
