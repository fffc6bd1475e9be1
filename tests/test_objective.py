"""The searcher's objective: time to accuracy when reached, a finite penalty ordered by outcome otherwise."""

from __future__ import annotations

import math

import pytest

from raygd.records import Status
from tuning.objective import UNREACHED_PENALTY_S, objective_s, provisional_objective


@pytest.mark.parametrize("status", ["max_passes", "stopped_early", "running", "diverged", "error"])
@pytest.mark.parametrize("acc", [None, math.nan, 0.0, 0.5, 0.99, 1.0])
def test_every_miss_is_finite_and_worse_than_any_reached_time(status, acc):
    miss = objective_s(status, 3.0, acc)  # a time on an unreached trial is ignored
    assert math.isfinite(miss) and miss >= UNREACHED_PENALTY_S > objective_s("reached_target", 1e6, acc)


def test_reached_is_its_time_and_misses_rank_nearer_first():
    assert objective_s("reached_target", 2.5, 0.9) == 2.5
    assert objective_s("reached_target", math.nan, 0.9) == objective_s("max_passes", None, 0.9)
    ordered = [
        objective_s("max_passes", None, 0.8),
        objective_s("stopped_early", None, 0.4),
        objective_s("max_passes", None, math.nan),
        objective_s("diverged", None, 0.9),
        objective_s("error", None, 1.0),
    ]
    assert ordered == sorted(ordered) and len(set(ordered)) == len(ordered)


def test_provisional_objective_of_an_evaluation():
    assert provisional_objective({"train/loss": 0.3, "train/accuracy": 0.75}) == objective_s("running", None, 0.75)
    assert provisional_objective({"train/loss": math.nan, "train/accuracy": 0.1}) == objective_s("diverged", None, 0)


@pytest.mark.parametrize("acc", [None, 0.0, 0.9, 1.0])
def test_failed_has_the_penalty_of_the_legacy_error(acc):
    assert objective_s(Status.FAILED, None, acc) == objective_s("failed", None, acc) == objective_s("error", None, acc)
    assert objective_s("failed", None, acc) == 4 * UNREACHED_PENALTY_S
