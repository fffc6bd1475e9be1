"""Evaluation in the loop (issue #14): the pass-based schedule is fair across B, and evaluations measure
test accuracy and the generalization gap alongside train accuracy (every k-th, ``train.test_every_evals``,
and always the one that ends the run). In-process, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from raygd.config import CHECKPOINT_AT_EVALUATIONS, load_run_config
from raygd.data import eval_indices, load_data
from raygd.loop import build_state, eval_schedule, every_examples, every_steps, run_loop
from raygd.records import EVAL_RESOLUTION_METRIC, GAP_AT_TARGET_METRIC
from tests.dist import run_group

N_SYNTH = 4096


def _reference_eval_steps(examples: int, batch: int, steps: int) -> list[int]:
    """Brute force: for each multiple k·N of the example count, the first update whose examples reach it."""
    out = []
    for k in range(1, steps * batch // examples + 1):
        out.append(next(s for s in range(1, steps + 1) if s * batch >= k * examples))
    return sorted(set(out))


@pytest.mark.parametrize("examples", [1024, 700, 64, 10])
@pytest.mark.parametrize("batch", [64, 512])
def test_every_examples_evaluates_at_the_first_update_reaching_each_multiple(examples, batch):
    steps = 3 * 4096 // batch
    due = every_examples(examples, batch)
    got = [s for s in range(1, steps + 1) if due(s)]
    assert got == _reference_eval_steps(examples, batch, steps)
    if examples <= batch:
        assert got == list(range(1, steps + 1))  # every update


def test_evaluation_points_fall_at_the_same_example_counts_for_b64_and_b512():
    def counts(batch: int) -> list[int]:
        due = every_examples(1024, batch)
        return [s * batch for s in range(1, 3 * 4096 // batch + 1) if due(s)]

    assert counts(64) == counts(512) == [1024 * k for k in range(1, 13)]
    # The fixed-update schedule (every 16 updates, the same points at B=64) is 8x coarser at B=512.
    old = every_steps(16)
    assert [s * 64 for s in range(1, 3 * 4096 // 64 + 1) if old(s)] == counts(64)
    assert [s * 512 for s in range(1, 3 * 4096 // 512 + 1) if old(s)] == [8192]


def _cfg(*overrides: str):
    return load_run_config(
        None,
        [
            "data.name=synthetic",
            f"data.synthetic_size={N_SYNTH}",
            "data.eval_size=500",
            "train.model=logreg",
            "train.num_workers=1",
            "train.step_size=0.2",
            "train.target_accuracy=1.0",
            "train.max_passes=1",
            *overrides,
        ],
    )


@pytest.mark.parametrize(
    "overrides, resolution",
    [
        (["train.global_batch_size=64", "train.eval_every_passes=0.25"], 0.25),
        (["train.global_batch_size=512", "train.eval_every_passes=0.25"], 0.25),
        (["train.global_batch_size=512", "train.eval_every_passes=0.05"], 512 / N_SYNTH),  # N = 205 < B
        (["train.global_batch_size=64", "train.eval_every_steps=10"], 10 * 64 / N_SYNTH),  # explicit override
    ],
)
def test_eval_schedule_resolution_in_passes(overrides, resolution):
    _, got = eval_schedule(_cfg(*overrides), N_SYNTH)
    assert got == pytest.approx(resolution)


def _run(*overrides: str):
    cfg = _cfg(*overrides)
    reports: list[dict[str, float]] = []
    state = build_state(cfg, load_data(cfg.data, 0))
    summary = run_loop(state, report=reports.append)
    return cfg, state, summary, reports


def test_run_loop_evaluates_at_the_same_example_counts_for_b64_and_b512():
    counts = {}
    for batch in (64, 512):
        _, _, summary, reports = _run(f"train.global_batch_size={batch}", "train.eval_every_passes=0.25")
        counts[batch] = [int(r["step"]) * batch for r in reports]
        assert [r["progress/passes"] for r in reports] == [0.25, 0.5, 0.75, 1.0]
        assert summary.extra[EVAL_RESOLUTION_METRIC] == 0.25
    assert counts[64] == counts[512] == [1024, 2048, 3072, 4096]


def test_every_evaluation_logs_test_accuracy_and_the_generalization_gap():
    cfg, state, summary, reports = _run("train.global_batch_size=64", "train.eval_every_passes=0.5")
    assert len(reports) == 2
    for r in reports:
        assert r["train/generalization_gap"] == pytest.approx(r["train/accuracy"] - r["test/accuracy"])
    # The last evaluation is at the final weights: brute force over the fixed test sample.
    idx = eval_indices(state.data.y_test.shape[0], cfg.data.eval_size, cfg.train.seed)
    with torch.no_grad():
        pred = state.model(state.data.x_test[idx]).argmax(1)
    assert reports[-1]["test/accuracy"] == pytest.approx(float((pred == state.data.y_test[idx]).float().mean()))
    assert GAP_AT_TARGET_METRIC not in summary.extra  # the target 1.0 was not reached
    assert 0.0 <= summary.final_test_accuracy <= 1.0


def test_test_accuracy_at_every_kth_evaluation_and_at_the_last():
    _, _, summary, reports = _run(
        "train.global_batch_size=64", "train.eval_every_passes=0.05", "train.test_every_evals=3"
    )
    assert summary.status == "max_passes" and len(reports) == 20
    tested = [i for i, r in enumerate(reports, 1) if "test/accuracy" in r]
    assert tested == [1, 4, 7, 10, 13, 16, 19, 20]  # every 3rd from the first, and the last update's
    for r in reports:
        assert ("train/generalization_gap" in r) == ("test/accuracy" in r)


def test_test_accuracy_at_the_evaluation_that_reaches_the_target_whatever_the_schedule():
    overrides = ["train.global_batch_size=64", "train.eval_every_passes=0.05", "train.target_accuracy=0.6"]
    _, _, every, every_reports = _run(*overrides, "train.max_passes=5")
    _, _, sparse, reports = _run(*overrides, "train.max_passes=5", "train.test_every_evals=1000")
    assert sparse.status == every.status == "reached_target" and len(reports) == len(every_reports) > 2
    assert [i for i, r in enumerate(reports, 1) if "test/accuracy" in r] == [1, len(reports)]
    assert reports[-1]["test/accuracy"] == every_reports[-1]["test/accuracy"]  # same weights, same sample
    assert sparse.extra[GAP_AT_TARGET_METRIC] == pytest.approx(every.extra[GAP_AT_TARGET_METRIC])


def test_the_gap_at_the_target_is_recorded_from_the_evaluation_that_reached_it():
    _, _, summary, reports = _run(
        "train.global_batch_size=64", "train.eval_every_passes=0.05", "train.target_accuracy=0.6", "train.max_passes=5"
    )
    assert summary.status == "reached_target"
    assert len(reports) > 1 and reports[-1]["train/accuracy"] >= 0.6 > reports[-2]["train/accuracy"]
    assert summary.extra[GAP_AT_TARGET_METRIC] == pytest.approx(reports[-1]["train/generalization_gap"])
    # the resolution of passes-to-target: evaluations every round(0.05 n) = 205 examples
    assert summary.extra[EVAL_RESOLUTION_METRIC] == pytest.approx(205 / N_SYNTH)


def test_a_replication_control_is_evaluated_on_the_replicated_arms_examples():
    # Through any path that builds the state (Ray, CLI, in-process), not only bench.paper.run's.
    replicated = _cfg("data.replication=4", "train.seed=3")
    control = _cfg("data.replication=4", "data.replication_control=true", "train.seed=3")
    rep, ctl = load_data(replicated.data, 3), load_data(control.data, 3)
    assert ctl.n == N_SYNTH // 4 and ctl.paired_eval_index is not None
    s_rep, s_ctl = build_state(replicated, rep), build_state(control, ctl)
    assert s_ctl.x_eval.shape[0] == replicated.data.eval_size
    assert torch.equal(s_ctl.x_eval, s_rep.x_eval) and torch.equal(s_ctl.y_eval, s_rep.y_eval)


def test_default_checkpoints_fall_at_the_pass_based_evaluations():
    cfg = _cfg("train.global_batch_size=64", "train.eval_every_passes=0.25", "train.max_failures=1")
    assert cfg.train.checkpoint_interval == CHECKPOINT_AT_EVALUATIONS
    saved: list[int] = []
    run_loop(build_state(cfg, load_data(cfg.data, 0)), checkpoint=lambda m, s: saved.append(int(m["step"])))
    assert [s * 64 for s in saved] == [1024, 2048, 3072]  # not at the final evaluation


def _test_accuracies(rank, world_size, cfg, data):
    reports: list[dict[str, float]] = []
    run_loop(build_state(cfg, data, rank, world_size), report=reports.append)
    return [(r["test/accuracy"], r["train/accuracy"]) for r in reports]


def test_test_accuracy_is_summed_over_rank_slices():
    # 2 workers see the same global batches as 1 (raygd's sampler); the rank-sliced test sample,
    # summed in the evaluation's one all-reduce, must give one worker's numbers.
    overrides = ["train.global_batch_size=64", "train.eval_every_passes=0.5", "data.eval_size=301"]
    cfg1, cfg2 = _cfg(*overrides), _cfg(*overrides, "train.num_workers=2")
    data = load_data(cfg1.data, 0)
    single = _test_accuracies(0, 1, cfg1, data)
    rank0, rank1 = run_group(_test_accuracies, 2, cfg2, data)
    assert rank0 == rank1
    for (t1, a1), (t2, a2) in zip(single, rank0, strict=True):
        assert t1 == pytest.approx(t2, abs=1e-9) and a1 == pytest.approx(a2, abs=1e-9)
        assert not math.isnan(t1)


def test_two_ranks_take_the_same_test_decisions_on_a_sparse_schedule():
    # Test accuracy every 4th evaluation and at the one reaching the target: an extra all-reduce that
    # both ranks must enter together (a rank deciding alone would hang the group).
    overrides = [
        "train.global_batch_size=64",
        "train.eval_every_passes=0.05",
        "train.target_accuracy=0.6",
        "train.max_passes=5",
        "train.test_every_evals=4",
        "data.eval_size=301",
    ]
    cfg1, cfg2 = _cfg(*overrides), _cfg(*overrides, "train.num_workers=2")
    data = load_data(cfg1.data, 0)
    single = _sparse_reports(0, 1, cfg1, data)
    rank0, rank1 = run_group(_sparse_reports, 2, cfg2, data)
    assert rank0 == rank1 and len(single) == len(rank0) > 4
    assert [t is not None for t, _ in rank0] == [i % 4 == 0 or i == len(rank0) - 1 for i in range(len(rank0))]
    for (t1, a1), (t2, a2) in zip(single, rank0, strict=True):
        assert a1 == pytest.approx(a2, abs=1e-9) and (t1 is None) == (t2 is None)
        assert t1 is None or t1 == pytest.approx(t2, abs=1e-9)


def _sparse_reports(rank, world_size, cfg, data):
    reports: list[dict[str, float]] = []
    run_loop(build_state(cfg, data, rank, world_size), report=reports.append)
    return [(r.get("test/accuracy"), r["train/accuracy"]) for r in reports]
