"""What a sweep's searcher minimises: time to accuracy, with a finite, worst-ranked value for misses.

Optuna and ASHA need a number from every trial, also from one that never reached the
target, diverged, or was stopped early. A miss gets a penalty far above any real time,
ordered so that the searcher still learns which misses were closer:

    reached_target                    time_to_accuracy_s
    max_passes, stopped_early, running  UNREACHED_PENALTY_S * (2 - train accuracy)   in [P, 2P]
    diverged                          3 * UNREACHED_PENALTY_S
    failed (a legacy "error" too)     4 * UNREACHED_PENALTY_S

TPE only uses the order of the values, so the scale of the penalty does not matter.
Pure functions, no Ray: the Train controller imports this module for every trial.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from raygd.records import LEGACY_FAILED, Status

UNREACHED_PENALTY_S = 1e9
"""Penalty unit P (seconds): far above any time to accuracy a sweep measures."""


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def objective_s(status: str, time_to_accuracy_s: float | None, train_accuracy: float | None) -> float:
    """The value to minimise for a trial with this outcome (see the module docstring).

    Args:
        status: a ``Status`` value, ``running`` (a trial still training) or the legacy ``error`` (failed).
        time_to_accuracy_s: training seconds to the target (used only when reached).
        train_accuracy: the last measured training accuracy (nan or None counts as 0).
    Returns:
        A finite number; every reached trial ranks before every miss.
    """
    if status == Status.REACHED_TARGET and _finite(time_to_accuracy_s):
        return float(time_to_accuracy_s)
    if status == Status.DIVERGED:
        return 3 * UNREACHED_PENALTY_S
    if status in (Status.FAILED, LEGACY_FAILED):
        return 4 * UNREACHED_PENALTY_S
    acc = min(max(float(train_accuracy), 0.0), 1.0) if _finite(train_accuracy) else 0.0
    return UNREACHED_PENALTY_S * (2.0 - acc)


def provisional_objective(metrics: dict[str, Any]) -> float:
    """The objective of a running trial from one evaluation report (``train/loss``, ``train/accuracy``):
    what a searcher is told if the trial is stopped right after it."""
    loss = metrics.get("train/loss")
    status = Status.DIVERGED if loss is not None and not _finite(loss) else "running"
    return objective_s(status, None, metrics.get("train/accuracy"))
