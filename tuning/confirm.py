"""The confirm phase's statistics: each winner re-run with fresh seeds, mean ± std over the seeds and the speedup
with its bootstrap interval (``raygd.stats.bootstrap_ratio``). Pure functions over trial records, like
``tuning.stats``; ``tuning.tables.confirm_markdown`` prints them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raygd.records import TrialRecord
from raygd.stats import N_BOOTSTRAP, bootstrap_ratio
from tuning.stats import BASELINE, finite, finite_times, mean_std, pair_stats


@dataclass(frozen=True)
class ConfirmRow:
    """A winner re-run with fresh seeds: mean ± sample std over the seeds that reached."""

    mechanism: str
    step_size: float
    global_batch_size: int
    n_seeds: int
    reached_frac: float
    time_mean_s: float | None
    time_std_s: float | None
    passes_mean: float | None
    passes_std: float | None
    speedup: float | None
    """Ratio of means T̄_baseline / T̄_mechanism; None unless every seed of both reached."""
    speedup_std: float | None
    """Bootstrap std of the ratio of means (seeds resampled independently on both sides)."""
    speedup_lo: float | None
    """2.5% bootstrap percentile."""
    speedup_hi: float | None
    """97.5% bootstrap percentile."""


def confirm_summary(
    records: Iterable[TrialRecord | Mapping[str, Any]],
    baseline: str = BASELINE,
    replication: int | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
) -> list[ConfirmRow]:
    """Per pair of a confirm phase: mean ± std of time and passes over reached seeds, and the speedup.

    Times and passes average over the seeds that reached (``reached_frac`` says how many);
    the speedup is stricter, as in ``best_per_mechanism``: defined only when every seed of the
    pair and of the baseline's best pair reached. Spread: ``bootstrap_ratio``.

    Args:
        records: the confirm phase's trial records (several seeds per pair).
        baseline: mechanism label of the reference.
        replication: as in ``pair_stats``.
        n_boot, seed: bootstrap resamples and the seed of its generator.
    Returns:
        One row per pair: baseline first, mechanisms by their best pair's score, best pair first within each.
    """
    pairs = pair_stats(records, replication)
    mech_best = {p.mechanism: p.score for p in reversed(pairs)}
    base = next((p for p in pairs if p.mechanism == baseline), None)
    base_times = finite_times(base.trials) if base is not None and base.reached else None
    rows = []
    for p in pairs:
        reached = [t for t in p.trials if t.reached]
        t_mean, t_std = mean_std(finite_times(reached))
        p_mean, p_std = mean_std([t.passes_to_accuracy for t in reached if finite(t.passes_to_accuracy)])
        spread: tuple[float | None, ...] = (None, None, None, None)
        if base_times is not None and p.reached:
            spread = bootstrap_ratio(base_times, finite_times(p.trials), n_boot, seed)
        rows.append(
            ConfirmRow(
                p.mechanism,
                p.step_size,
                p.global_batch_size,
                p.n_seeds,
                p.n_reached / p.n_seeds,
                t_mean,
                t_std,
                p_mean,
                p_std,
                *spread,
            )
        )
    ranked = sorted(
        enumerate(rows),
        key=lambda ir: (ir[1].mechanism != baseline, mech_best[ir[1].mechanism], ir[1].mechanism, ir[0]),
    )  # ir[0]: pair_stats order
    return [row for _, row in ranked]
