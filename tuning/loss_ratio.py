"""The paper's Figure 3 statistic: the loss ratio L(B_large) / L(B_small) after the same number of passes, each
batch size at its own tuned step size, per replication factor r and mechanism. Pure functions over trial records,
like ``tuning.stats``; ``tuning.figures.plot_loss_ratio`` draws them.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raygd.records import TrialRecord
from tuning.stats import BASELINE, as_records, finite, mean_std


@dataclass(frozen=True)
class LossRatioRow:
    """L(B_large) / L(B_small) for one (replication, mechanism), each B at its own tuned step size."""

    replication: int
    mechanism: str
    small_batch: int
    large_batch: int
    small_step_size: float | None
    large_step_size: float | None
    ratio_mean: float | None
    """Mean over paired seeds of L_large,s / L_small,s; None when a side has no finite loss."""
    ratio_std: float | None
    """Sample std over paired seeds; None for fewer than two."""
    n_seeds: int
    """Seeds with a finite loss on both sides."""
    passes: float | None


def _tuned_step(trials: list[TrialRecord]) -> tuple[float | None, dict[int, float]]:
    """The step size of lowest mean finite loss over seeds, and its per-seed losses.

    Step sizes where some seed diverged (nan/None loss) rank after all step sizes without;
    ties → smaller step size.
    """
    by_step: dict[float, list[TrialRecord]] = defaultdict(list)
    for t in trials:
        by_step[t.step_size].append(t)
    scored = []
    for step, ts in by_step.items():
        losses = [t.final_train_loss for t in ts if finite(t.final_train_loss)]
        if losses:
            scored.append(((len(ts) - len(losses), statistics.fmean(losses), step), step, ts))
    if not scored:
        return None, {}
    _, step, ts = min(scored, key=lambda s: s[0])
    return step, {t.seed: t.final_train_loss for t in ts if finite(t.final_train_loss)}


def _check_passes(trials: list[TrialRecord], what: str, tol: float) -> float | None:
    """The common ``passes`` of the trials with a finite loss; ValueError if they differ by more than tol."""
    passes = [t.passes for t in trials if finite(t.final_train_loss)]
    known = [p for p in passes if p is not None]
    if not known:
        return None
    if len(known) < len(passes) or max(known) - min(known) > tol:
        detail = sorted({(t.global_batch_size, t.step_size, t.passes) for t in trials}, key=str)
        raise ValueError(f"{what}: trials ran different numbers of passes (B, step size, passes): {detail}")
    return known[0]


def loss_ratios(
    records: Iterable[TrialRecord | Mapping[str, Any]], small_batch: int, large_batch: int, passes_tol: float = 1e-6
) -> list[LossRatioRow]:
    """The paper's Figure 3: loss ratio L(B_large) / L(B_small) per replication r and mechanism.

    For each side, the tuned step size γ*_B = argmin_γ mean_s L(B, γ, s) over finite losses
    (``_tuned_step``); then per seed s present on both sides ρ_s = L(B_large, γ*_large, s) /
    L(B_small, γ*_small, s), reported as mean ± sample std over those seeds. Diverged trials
    (nan/None loss) are excluded; a side with no finite loss gives ratio None.

    Args:
        records: trial records with final_train_loss and passes.
        small_batch, large_batch: the two global batch sizes compared.
        passes_tol: largest allowed spread of ``passes`` within a (r, mechanism) group. With
            max_steps = ⌈passes·n/B⌉ runs at different B differ by up to B/n passes; widen it then.
    Returns:
        One row per (replication, mechanism) with a trial at either batch size, sorted by mechanism then r.
    Raises:
        ValueError: when a group's non-diverged trials ran different numbers of passes.
    """
    groups: dict[tuple[int, str], list[TrialRecord]] = defaultdict(list)
    for r in as_records(records):
        if r.global_batch_size in (small_batch, large_batch):
            groups[(r.replication, r.mechanism)].append(r)
    rows = []
    for (rep, mech), trials in groups.items():
        passes = _check_passes(trials, f"replication {rep}, {mech}", passes_tol)
        step_s, loss_s = _tuned_step([t for t in trials if t.global_batch_size == small_batch])
        step_l, loss_l = _tuned_step([t for t in trials if t.global_batch_size == large_batch])
        ratios = [loss_l[s] / loss_s[s] for s in sorted(loss_s.keys() & loss_l.keys()) if loss_s[s] > 0]
        mean, std = mean_std(ratios)
        rows.append(LossRatioRow(rep, mech, small_batch, large_batch, step_s, step_l, mean, std, len(ratios), passes))
    return sorted(rows, key=lambda r: (r.mechanism != BASELINE, r.mechanism, r.replication))
