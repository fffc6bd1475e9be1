"""The loop body in-process (no Ray): targets, divergence, the clock, exact data parallelism."""

from __future__ import annotations

import math

import pytest
import torch

from raygd.config import load_run_config
from raygd.data import load_data
from raygd.loop import build_state, run_loop, train_rank
from tests.dist import run_group


def _cfg(idx_dir, *overrides):
    return load_run_config(
        None,
        [
            f"data.data_dir={idx_dir}",
            "train.num_workers=1",
            "train.model=logreg",
            "train.global_batch_size=32",
            "train.eval_every_steps=5",
            *overrides,
        ],
    )


def test_reaches_target_and_accounts_passes(idx_dir):
    cfg = _cfg(idx_dir, "train.target_accuracy=0.9", "train.step_size=0.05")
    summary = train_rank(cfg, load_data(cfg.data, 0))
    assert summary.status == "reached_target" and summary.final_train_accuracy >= 0.9
    assert summary.updates_to_accuracy == summary.steps and summary.steps % 5 == 0
    assert summary.passes_to_accuracy == pytest.approx(summary.steps * 32 / 600)
    assert 0 < summary.time_to_accuracy_s == summary.train_time_s
    assert summary.final_test_accuracy > 0.8


def test_unreached_target_ends_at_max_passes_without_a_time(idx_dir):
    cfg = _cfg(idx_dir, "train.target_accuracy=1.0", "train.step_size=1e-6", "train.max_passes=1")
    summary = train_rank(cfg, load_data(cfg.data, 0))
    assert summary.status == "max_passes" and summary.time_to_accuracy_s is None
    assert summary.steps == math.ceil(600 / 32) and summary.passes_to_accuracy is None


def test_divergence_ends_the_run_with_its_step(idx_dir):
    cfg = _cfg(idx_dir, "train.model=mnist_cnn", "train.step_size=50", "train.target_accuracy=0.99")
    summary = train_rank(cfg, load_data(cfg.data, 0))
    assert summary.status == "diverged" and summary.time_to_accuracy_s is None
    assert 1 <= summary.diverged_at_step <= summary.steps <= 10
    assert summary.summary_metrics()["diverged"] == 1.0


def test_evaluation_is_paused_out_of_the_clock(idx_dir):
    # Evaluating 600 examples every step costs more than a logreg step; the clock must not see it.
    cfg = _cfg(
        idx_dir,
        "train.eval_every_steps=1",
        "train.target_accuracy=1.0",
        "train.max_passes=2",
        "train.step_size=1e-6",
        "data.eval_size=300",
        "train.model=mnist_cnn",
        "train.max_passes=0.5",
    )
    reports = []
    summary = train_rank(cfg, load_data(cfg.data, 0), report=reports.append)
    assert len(reports) == summary.steps
    assert summary.eval_time_s > 0
    assert reports[-1]["time/train_s"] == pytest.approx(summary.train_time_s)
    assert summary.train_time_s == pytest.approx(sum(r["perf/step_s"] for r in reports), rel=1e-9)


def _final_weights(rank, world_size, cfg, data):
    w = build_state(cfg, data, rank, world_size)
    summary = run_loop(w)
    return summary.steps, {k: v.detach().clone() for k, v in w.model.state_dict().items()}


@pytest.mark.parametrize("model, sampling", [("mnist_cnn", "shuffle"), ("logreg", "with_replacement")])
def test_two_workers_equal_one_worker_at_the_same_global_batch(idx_dir, model, sampling):
    # 20 updates of B=32 over n=600: max_passes = 20 * 32 / 600; an unreachable target keeps it going.
    overrides = [
        f"train.model={model}",
        f"data.sampling={sampling}",
        "train.target_accuracy=1.0",
        f"train.max_passes={20 * 32 / 600}",
        "train.step_size=0.05",
        "train.eval_every_steps=100",
    ]
    cfg1 = _cfg(idx_dir, *overrides)
    cfg2 = _cfg(idx_dir, *overrides, "train.num_workers=2")
    data = load_data(cfg1.data, 0)
    steps1, single = _final_weights(0, 1, cfg1, data)
    (steps_a, rank0), (_, rank1) = run_group(_final_weights, 2, cfg2, data)
    assert steps1 == steps_a == 20
    initial = build_state(cfg1, data).model.state_dict()
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name])
        assert not torch.allclose(value, initial[name])  # the weights did move
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-5)


def _exact_bound(cfg, data, model):
    from raygd.diversity import gradient_diversity

    return gradient_diversity(model, data.x_train, data.y_train, dtype=torch.float64).batch_bound


@pytest.mark.parametrize(
    "estimator, world_size, mechanism",
    [("in_step", 1, "vanilla"), ("in_step", 2, "vanilla"), ("free", 2, "vanilla"), ("in_step", 2, "quantize")],
)
def test_online_diversity_tracks_the_exact_bound(idx_dir, estimator, world_size, mechanism):
    # A tiny step size keeps w (nearly) fixed, so the smoothed estimate should approach the exact B_D at w.
    # Quantize at P = 2 (2 levels: rounding noise several times the mean gradient's norm): the estimate
    # reads the hook's quantized mean less its rounding variance, and must still be the plain gradient's.
    cfg = _cfg(
        idx_dir,
        f"mechanism.name={mechanism}",
        "mechanism.quant_levels=2",
        f"train.diversity_estimator={estimator}",
        f"train.num_workers={world_size}",
        "train.step_size=1e-7",
        "train.target_accuracy=1.0",
        "train.max_passes=8",
        "train.eval_every_steps=150",
        "train.diversity_every_steps=1",
        "data.sampling=with_replacement",
        "train.global_batch_size=64",
    )
    data = load_data(cfg.data, 0)
    reports = (
        run_group(_diversity_reports, world_size, cfg, data)[0]
        if world_size > 1
        else _diversity_reports(0, 1, cfg, data)
    )
    exact = _exact_bound(cfg, data, build_state(_cfg(idx_dir), data).model)  # same seed: same initial w
    assert reports and all(math.isfinite(r["diversity/batch_bound"]) for r in reports)
    assert reports[-1]["diversity/delta"] == pytest.approx(reports[-1]["diversity/batch_bound"] / data.n)
    assert reports[-1]["diversity/batch_bound"] == pytest.approx(exact, rel=0.35 if estimator == "free" else 0.15)


def _measured_run(rank, world_size, cfg, data):
    w = build_state(cfg, data, rank, world_size)
    summary = run_loop(w)
    ema_steps = w.estimator.ema.steps if w.estimator else 0
    return summary.steps, ema_steps, {k: v.detach().clone() for k, v in w.model.state_dict().items()}


@pytest.mark.parametrize("estimator", ["free", "in_step"])
def test_the_online_estimator_measures_every_kth_update_and_leaves_training_unchanged(idx_dir, estimator):
    # 20 updates at P=2, measuring updates 0, 3, ..., 18 (7 of them): the free estimator's measured
    # updates skip DDP's all-reduce and reduce by hand, which must give the same weights as DDP.
    common = [
        "train.num_workers=2",
        "train.target_accuracy=1.0",
        f"train.max_passes={20 * 32 / 600}",
        "train.step_size=0.05",
        "train.eval_every_steps=100",
    ]
    data = load_data(_cfg(idx_dir).data, 0)
    (steps, _, plain), _ = run_group(_measured_run, 2, _cfg(idx_dir, *common), data)
    (steps_m, measured, weights), (_, measured1, weights1) = run_group(
        _measured_run,
        2,
        _cfg(idx_dir, *common, f"train.diversity_estimator={estimator}", "train.diversity_every_steps=3"),
        data,
    )
    assert steps == steps_m == 20 and measured == measured1 == 7
    for name, value in plain.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(weights[name], weights1[name])


def _diversity_reports(rank, world_size, cfg, data):
    reports = []
    train_rank(cfg, data, rank, world_size, report=reports.append)
    return reports


def _straight_and_resumed(rank, world_size, cfg, data, folder, resume_at):
    """Final weights of one uninterrupted run, and of a fresh worker resumed from its checkpoint at ``resume_at``."""
    from raygd.checkpoint import load_checkpoint, save_checkpoint

    saved = []

    def checkpoint(metrics, state):
        saved.append(state["step"])
        if state["step"] == resume_at:
            save_checkpoint(folder, state)

    w = build_state(cfg, data, rank, world_size)
    straight = run_loop(w, checkpoint=checkpoint)
    if world_size > 1:
        torch.distributed.barrier()  # every rank's file is written before any rank reads
    w2 = build_state(cfg, data, rank, world_size)
    resumed = run_loop(w2, resume={**load_checkpoint(folder, rank), "restarts": 1, "lost_train_s": 100.0})
    weights = [{k: v.detach().clone() for k, v in m.model.state_dict().items()} for m in (w, w2)]
    return saved, straight, resumed, weights


@pytest.mark.parametrize(
    "model, mechanism, world_size",
    [
        ("logreg", "vanilla", 1),
        ("mnist_cnn", "dropconnect", 1),
        ("mnist_cnn", "sgld", 1),
        ("logreg", "dropconnect", 2),
    ],
)
def test_resuming_from_a_checkpoint_continues_the_same_run(idx_dir, tmp_path, model, mechanism, world_size):
    # 20 updates, a checkpoint every 5 (default: at every evaluation once max_failures != 0). The resumed
    # run must end at exactly the same weights: sampler, torch RNG and the mechanism's per-rank generators
    # restored. (QSGD resumes equal in distribution only: DDP rebuilds its gradient buckets after the first
    # step of a fresh process, which reorders the buffer the quantizer draws over.)
    cfg = _cfg(
        idx_dir,
        f"train.model={model}",
        f"mechanism.name={mechanism}",
        f"train.num_workers={world_size}",
        "mechanism.dropconnect_granularity=per_worker",
        "mechanism.sgld_sigma=0.05",
        "train.target_accuracy=1.0",
        f"train.max_passes={20 * 32 / 600}",
        "train.max_failures=1",
        "train.step_size=0.002",
    )  # small enough that 100% accuracy is not reached in 20 updates
    data = load_data(cfg.data, 0)
    args = (cfg, data, tmp_path, 10)
    results = (
        run_group(_straight_and_resumed, world_size, *args) if world_size > 1 else [_straight_and_resumed(0, 1, *args)]
    )
    for saved, straight, resumed, (w_straight, w_resumed) in results:
        assert saved == [5, 10, 15]  # never at the final step
        assert resumed.steps == straight.steps == 20
        for name in w_straight:
            torch.testing.assert_close(w_resumed[name], w_straight[name], rtol=0, atol=1e-6)
        assert resumed.final_train_loss == pytest.approx(straight.final_train_loss, rel=1e-5)
        # The clock resumes from the checkpoint's and counts the discarded work; restarts are recorded.
        assert resumed.train_time_s > 100.0 > straight.train_time_s
        assert resumed.extra["train/restarts"] == 1.0 and straight.extra["train/restarts"] == 0.0


def test_checkpointing_is_off_unless_asked_for(idx_dir):
    cfg = _cfg(idx_dir, "train.target_accuracy=1.0", "train.max_passes=1")
    assert cfg.train.checkpoint_interval == 0
    assert _cfg(idx_dir, "train.max_failures=2").train.checkpoint_interval == 5  # every evaluation
    assert _cfg(idx_dir, "train.checkpoint_every_steps=7").train.checkpoint_interval == 7
    saved = []
    run_loop(build_state(cfg, load_data(cfg.data, 0)), checkpoint=lambda m, s: saved.append(s))
    assert saved == []
