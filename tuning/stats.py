"""Sweep statistics: ranking, pairs over seeds, the best pair per mechanism, speedups, loss ratios.

Pure functions over trial records (``raygd.records.TrialRecord``, or the plain dicts a trial
reports); no Ray, no MLflow. ``tuning.tables`` and ``tuning.figures`` show what they compute.

Conventions (DESIGN.md, "The science, as conventions"):

- A *pair* is (mechanism, step_size γ, global_batch_size B); its trials differ only in seed.
  Its score is the mean time to accuracy over its seeds, T̄ = (1/k) Σ_s T_s, and it counts as
  reached only if every seed reached the target (one diverged or slow seed makes it inf):
  a pair that sometimes fails is not a setting one can recommend.
- Speedup of a mechanism M over the baseline V (vanilla SGD): S = T̄_V / T̄_M of the best
  pairs. The paper's "31% speedup" is ambiguous; every row carries the ratio S, the
  percentage (S − 1)·100 and the fraction of time saved 1 − T̄_M / T̄_V = 1 − 1/S.
- Loss ratio (the paper's Figure 3): L(B_large) / L(B_small) after the same number of
  passes, each batch size with its own tuned step size, per replication factor r.

Try it: ``python -c "import tuning.stats as s; help(s)"``; tests: ``pytest tests/test_stats.py``.

One module (over 400 lines once formatted): every function here is a pure statistic of the same
``TrialRecord`` list, and ranking, best pairs, speedups and their spread are defined in terms of each other.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

from raygd.records import STATUS_ORDER, Status, TrialRecord
from raygd.stats import bootstrap_ratio

BASELINE = "vanilla"
"""Display label of vanilla SGD, the mechanism speedups are measured against."""

# --------------------------------------------------------------------------- ranking


def finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def finite_times(trials: Iterable[TrialRecord]) -> list[float]:
    """The finite times to accuracy of ``trials``: all of them when every trial reached."""
    return [t.time_to_accuracy_s for t in trials if finite(t.time_to_accuracy_s)]


def as_records(records: Iterable[TrialRecord | Mapping[str, Any]]) -> list[TrialRecord]:
    """Records as ``TrialRecord`` s, checking trial ids are unique.

    Raises:
        ValueError: when a trial id occurs twice.
    """
    out = [r if isinstance(r, TrialRecord) else TrialRecord.from_dict(r) for r in records]
    dups = sorted(tid for tid, n in Counter(r.trial_id for r in out).items() if n > 1)
    if dups:
        raise ValueError(f"duplicate trial ids: {dups}")
    return out


def _status_rank(r: TrialRecord) -> int:
    """0 reached; a 'reached_target' without a finite time ranks with max_passes."""
    return 0 if r.reached else max(1, STATUS_ORDER.index(r.status))


def _key_or_inf(value: float | None) -> float:
    return value if finite(value) else math.inf


def rank_trials(records: Iterable[TrialRecord | Mapping[str, Any]]) -> list[TrialRecord]:
    """Trials fastest first.

    Order: reached trials by ascending time_to_accuracy_s, then max_passes, stopped_early, diverged, failed;
    ties (and everything within an unreached group) by passes_to_accuracy, then trial_id.

    Args:
        records: trial records (dicts or ``TrialRecord``).
    Returns:
        The records, sorted.
    """
    return sorted(
        as_records(records),
        key=lambda r: (
            _status_rank(r),
            _key_or_inf(r.time_to_accuracy_s) if r.reached else math.inf,
            _key_or_inf(r.passes_to_accuracy),
            r.trial_id,
        ),
    )


# --------------------------------------------------------------------------- pairs and the best pair


def _stdev(xs: Sequence[float]) -> float | None:
    """Sample standard deviation sqrt(Σ(x − x̄)² / (k − 1)); None for fewer than two values."""
    return statistics.stdev(xs) if len(xs) >= 2 else None


@dataclass(frozen=True)
class PairStats:
    """One (mechanism, step_size, global_batch_size) pair over its seeds."""

    mechanism: str
    step_size: float
    global_batch_size: int
    trials: tuple[TrialRecord, ...]
    """The pair's trials, sorted by seed then trial id."""

    @property
    def n_seeds(self) -> int:
        """Number of trials (one per seed)."""
        return len(self.trials)

    @property
    def n_reached(self) -> int:
        return sum(t.reached for t in self.trials)

    @property
    def reached(self) -> bool:
        """Every seed reached the target."""
        return self.n_reached == self.n_seeds > 0

    @property
    def score(self) -> float:
        """Mean time to accuracy T̄ = (1/k) Σ_s T_s if every seed reached, else inf."""
        return statistics.fmean(finite_times(self.trials)) if self.reached else math.inf

    @property
    def time_std_s(self) -> float | None:
        """Sample std of the times over seeds (None when unreached or a single seed)."""
        return _stdev(finite_times(self.trials)) if self.reached else None

    @property
    def passes_to_accuracy(self) -> float | None:
        """Mean passes to accuracy over seeds (None when unreached or a seed lacks it)."""
        passes = [t.passes_to_accuracy for t in self.trials if finite(t.passes_to_accuracy)]
        return statistics.fmean(passes) if self.reached and len(passes) == len(self.trials) else None

    def sort_key(self) -> tuple:
        """Best first: lowest T̄; ties → smaller B, then smaller γ (fewer workers, more stable step).

        Among unreached pairs (T̄ = inf): more seeds reached, then higher mean final training
        accuracy first, so an unreached mechanism still shows its closest setting.
        """
        accs = [t.final_train_accuracy for t in self.trials if finite(t.final_train_accuracy)]
        acc = statistics.fmean(accs) if accs and not self.reached else -math.inf
        return (self.score, -self.n_reached / max(1, self.n_seeds), -acc, self.global_batch_size, self.step_size)


def _one_replication(records: list[TrialRecord], replication: int | None) -> list[TrialRecord]:
    """Keep one replication factor: the given one, or the only one present (else ValueError)."""
    if replication is not None:
        return [r for r in records if r.replication == replication]
    present = sorted({r.replication for r in records})
    if len(present) > 1:
        raise ValueError(f"records mix replication factors {present}; pass replication=")
    return records


def pair_stats(records: Iterable[TrialRecord | Mapping[str, Any]], replication: int | None = None) -> list[PairStats]:
    """Group trials into (mechanism, step_size, global_batch_size) pairs.

    Args:
        records: trial records.
        replication: keep only this replication factor; None requires a single one in the records.
    Returns:
        One ``PairStats`` per pair, best first within each mechanism, mechanisms sorted by name.
    """
    groups: dict[tuple[str, float, int], list[TrialRecord]] = defaultdict(list)
    for r in _one_replication(as_records(records), replication):
        groups[r.pair].append(r)
    pairs = [PairStats(*key, tuple(sorted(ts, key=lambda t: (t.seed, t.trial_id)))) for key, ts in groups.items()]
    return sorted(pairs, key=lambda p: (p.mechanism, p.sort_key()))


@dataclass(frozen=True)
class BestRow:
    """The fastest pair of one mechanism and its speedup over the baseline."""

    mechanism: str
    step_size: float
    global_batch_size: int
    time_to_accuracy_s: float | None
    """Mean over seeds; None when the best pair did not reach the target."""
    time_std_s: float | None
    """Sample std over seeds; None with a single seed or unreached."""
    passes_to_accuracy: float | None
    n_seeds: int
    n_pairs_tried: int
    n_reached_pairs: int
    speedup: float | None
    """S = T̄_baseline / T̄_mechanism; None when either is unreached or there is no baseline."""
    time_saved_frac: float | None
    """1 − T̄_mechanism / T̄_baseline = 1 − 1/S."""
    trial_ids: tuple[str, ...]
    speedup_lo: float | None = None
    """2.5% bootstrap percentile of the speedup (``bootstrap_ratio`` over seeds); None with < 2 seeds a side."""
    speedup_hi: float | None = None
    """97.5% bootstrap percentile."""
    step_edge: str | None = None
    """``EDGE_LOW``/``EDGE_HIGH`` when γ* is the smallest/largest γ tried at B* (two or more tried), else None."""
    batch_edge: str | None = None
    """The same for B* among the mechanism's batch sizes."""
    batch_bound_w0: float | None = None
    """B_D = nΔ_D at the initial weights, mean over the best pair's seeds (``raygd.bound``)."""
    batch_bound_w0_se: float | None = None
    """Its standard error: √(Σ se²)/k over the k seeds (0: exact)."""
    batch_bound_median: float | None = None
    """Median of the online B_D along training, mean over the best pair's seeds."""
    bound_of: str | None = None
    """Whose diversity B_D is (``raygd.records.BOUND_OF_TAG``): gradient, surrogate or plain_gradient."""
    batch_policy: str = "fixed"
    """The row's batch policy (``raygd.records.BATCH_POLICY_TAG``); adaptive: ``global_batch_size`` is where B
    started, and the speedup is over the baseline's best fixed B."""
    mean_batch_size: float | None = None
    """Mean B of the best pair's runs (examples over updates), mean over its seeds."""

    @property
    def significant(self) -> bool | None:
        """Whether the speedup's bootstrap interval excludes 1.0×; None without an interval."""
        if self.speedup_lo is None or self.speedup_hi is None:
            return None
        return not self.speedup_lo <= 1.0 <= self.speedup_hi

    @property
    def batch_over_bound(self) -> float | None:
        """B* / B_D(w0): above 1 the winner is beyond the batch size the bound guarantees."""
        b = self.batch_bound_w0
        return self.global_batch_size / b if finite(b) and b > 0 else None

    @property
    def speedup_pct(self) -> float | None:
        """(S − 1)·100: '31% speedup' read as 1.31× as fast."""
        return None if self.speedup is None else (self.speedup - 1.0) * 100.0

    def as_dict(self) -> dict[str, Any]:
        """Flat dict with speedup_pct and trial ids joined by ';' (for CSV and MLflow)."""
        d = asdict(self)
        d["speedup_pct"] = self.speedup_pct
        d["batch_over_bound"] = self.batch_over_bound
        d["significant"] = None if self.significant is None else ("yes" if self.significant else "no")
        d["trial_ids"] = ";".join(self.trial_ids)
        return d


EDGE_LOW, EDGE_HIGH = "low", "high"


def edge_side(value: float, tried: Iterable[float]) -> str | None:
    """``EDGE_LOW``/``EDGE_HIGH`` when ``value`` is the smallest/largest of two or more tried values, else None."""
    values = set(tried)
    if len(values) < 2:
        return None
    return EDGE_LOW if value == min(values) else EDGE_HIGH if value == max(values) else None


def _mean_finite(xs: Iterable[float | None]) -> float | None:
    kept = [x for x in xs if finite(x)]
    return statistics.fmean(kept) if kept else None


def _bound_fields(trials: Sequence[TrialRecord]) -> dict[str, Any]:
    """The best pair's B_D at w0 (mean, and √(Σ se²)/k), and its median along training (mean)."""
    w0 = [t for t in trials if finite(t.batch_bound_w0)]
    se = [t.batch_bound_w0_se for t in w0 if finite(t.batch_bound_w0_se)]
    return {
        "batch_bound_w0": _mean_finite(t.batch_bound_w0 for t in w0),
        "batch_bound_w0_se": math.sqrt(sum(x * x for x in se)) / len(se) if se and len(se) == len(w0) else None,
        "batch_bound_median": _mean_finite(t.batch_bound_median for t in trials),
        "bound_of": next((t.bound_of for t in trials if t.bound_of), None),
    }


def _speedup(t_base: float | None, t_mech: float | None) -> tuple[float | None, float | None]:
    """(S, time saved) = (T_b / T_m, 1 − T_m / T_b), or (None, None) unless both are finite and positive."""
    if not (finite(t_base) and finite(t_mech)) or t_base <= 0 or t_mech <= 0:
        return None, None
    return t_base / t_mech, 1.0 - t_mech / t_base


def best_per_mechanism(
    records: Iterable[TrialRecord | Mapping[str, Any]], baseline: str = BASELINE, replication: int | None = None
) -> list[BestRow]:
    """The fastest pair per mechanism (``PairStats.sort_key``) and its speedup over the baseline's.

    Args:
        records: trial records of a sweep.
        baseline: the mechanism label speedups are measured against.
        replication: as in ``pair_stats``.
    Returns:
        One row per mechanism: the baseline first, then by mean time to accuracy (unreached last).
    """
    by_mech: dict[str, list[PairStats]] = defaultdict(list)
    for p in pair_stats(records, replication):
        by_mech[p.mechanism].append(p)
    base_pair = by_mech[baseline][0] if baseline in by_mech else None
    base_time = base_pair.score if base_pair is not None else None
    rows = []
    for mech, pairs in by_mech.items():
        best = pairs[0]
        t = best.score if best.reached else None
        speedup, saved = _speedup(base_time, t)
        lo = hi = None
        if (
            speedup is not None
            and base_pair is not None
            and mech != baseline
            and min(base_pair.n_seeds, best.n_seeds) >= 2
        ):
            _, _, lo, hi = bootstrap_ratio(finite_times(base_pair.trials), finite_times(best.trials))
        same_batch = [p.step_size for p in pairs if p.global_batch_size == best.global_batch_size]
        rows.append(
            BestRow(
                mechanism=mech,
                step_size=best.step_size,
                global_batch_size=best.global_batch_size,
                time_to_accuracy_s=t,
                time_std_s=best.time_std_s,
                passes_to_accuracy=best.passes_to_accuracy,
                n_seeds=best.n_seeds,
                n_pairs_tried=len(pairs),
                n_reached_pairs=sum(p.reached for p in pairs),
                speedup=speedup,
                time_saved_frac=saved,
                trial_ids=tuple(tr.trial_id for tr in best.trials),
                speedup_lo=lo,
                speedup_hi=hi,
                step_edge=edge_side(best.step_size, same_batch) if best.reached else None,
                batch_edge=edge_side(best.global_batch_size, [p.global_batch_size for p in pairs])
                if best.reached
                else None,
                **_bound_fields(best.trials),
                batch_policy=best.trials[0].batch_policy,
                mean_batch_size=_mean_finite(t.mean_batch_size for t in best.trials),
            )
        )
    return sorted(rows, key=lambda r: (r.mechanism != baseline, _key_or_inf(r.time_to_accuracy_s), r.mechanism))


@dataclass(frozen=True)
class BatchRow:
    """One mechanism at one batch size, at its best step size there: the time-vs-B curve with the gap."""

    mechanism: str
    global_batch_size: int
    step_size: float
    step_edge: str | None
    """``EDGE_LOW``/``EDGE_HIGH`` when this γ is the smallest/largest tried at this B."""
    time_to_accuracy_s: float | None
    time_std_s: float | None
    passes_to_accuracy: float | None
    n_seeds: int
    generalization_gap_at_target: float | None
    """Train − test accuracy at the target, mean over seeds."""
    eval_resolution_passes: float | None
    """Passes between evaluations (the resolution of ``passes_to_accuracy``)."""


def per_batch(records: Iterable[TrialRecord | Mapping[str, Any]], replication: int | None = None) -> list[BatchRow]:
    """Per (mechanism, B): the best pair at that B (``PairStats.sort_key``), baseline first, then by B."""
    best: dict[tuple[str, int], PairStats] = {}
    steps: dict[tuple[str, int], list[float]] = defaultdict(list)
    for p in pair_stats(records, replication):
        best.setdefault((p.mechanism, p.global_batch_size), p)
        steps[(p.mechanism, p.global_batch_size)].append(p.step_size)
    rows = []
    for (mech, b), p in best.items():
        rows.append(
            BatchRow(
                mech,
                b,
                p.step_size,
                edge_side(p.step_size, steps[(mech, b)]),
                p.score if p.reached else None,
                p.time_std_s,
                p.passes_to_accuracy,
                p.n_seeds,
                _mean_finite(t.generalization_gap_at_target for t in p.trials) if p.reached else None,
                _mean_finite(t.eval_resolution_passes for t in p.trials),
            )
        )
    return sorted(rows, key=lambda r: (r.mechanism != BASELINE, r.mechanism, r.global_batch_size))


@dataclass(frozen=True)
class PairRow:
    """Every (mechanism, γ, B) pair of a sweep over its seeds: what a time-vs-B or step-size study reads."""

    mechanism: str
    step_size: float
    global_batch_size: int
    n_seeds: int
    n_reached: int
    time_mean_s: float | None
    """Mean time to accuracy over the seeds that reached (None: none did)."""
    time_std_s: float | None
    passes_mean: float | None
    """Mean passes to accuracy over the seeds that reached."""
    passes_std: float | None
    seconds_per_pass: float | None
    """Median over every seed of training seconds per pass (``train_time_s / passes``)."""
    batch_bound_w0: float | None
    """B_D at w0, mean over seeds."""
    batch_bound_median: float | None
    """Median online B_D along training, mean over seeds."""
    gap_mean: float | None
    """Train − test accuracy at the target, mean over the seeds that reached."""
    unreached: str
    """The seeds that did not reach: their statuses and final training accuracy range ('' when all reached)."""


def every_pair(records: Iterable[TrialRecord | Mapping[str, Any]], replication: int | None = None) -> list[PairRow]:
    """One ``PairRow`` per (mechanism, γ, B): baseline first, then by mechanism, B and γ."""
    rows = []
    for p in pair_stats(records, replication):
        reached = [t for t in p.trials if t.reached]
        times = finite_times(reached)
        passes = [t.passes_to_accuracy for t in reached if finite(t.passes_to_accuracy)]
        per_pass = [t.train_time_s / t.passes for t in p.trials if finite(t.train_time_s) and _positive(t.passes)]
        rows.append(
            PairRow(
                p.mechanism,
                p.step_size,
                p.global_batch_size,
                p.n_seeds,
                len(reached),
                *mean_std(times),
                *mean_std(passes),
                statistics.median(per_pass) if per_pass else None,
                _mean_finite(t.batch_bound_w0 for t in p.trials),
                _mean_finite(t.batch_bound_median for t in p.trials),
                _mean_finite(t.generalization_gap_at_target for t in reached),
                _unreached(t for t in p.trials if not t.reached),
            )
        )
    return sorted(rows, key=lambda r: (r.mechanism != BASELINE, r.mechanism, r.global_batch_size, r.step_size))


def _positive(x: float | None) -> TypeGuard[float]:
    return finite(x) and x > 0


def _unreached(trials: Iterable[TrialRecord]) -> str:
    """E.g. ``2 max_passes, 1 diverged; acc 0.74–0.78`` (the final training accuracy of those not diverged)."""
    trials = list(trials)
    if not trials:
        return ""
    counts = Counter(t.status.value for t in trials)
    text = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    accs = [t.final_train_accuracy for t in trials if t.status != Status.DIVERGED and finite(t.final_train_accuracy)]
    if accs:
        low, high = f"{min(accs):.2f}", f"{max(accs):.2f}"
        text += f"; acc {low}" + (f"–{high}" if high != low else "")
    return text


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    return (statistics.fmean(xs), _stdev(xs)) if xs else (None, None)
