"""The critical batch size B_crit, fitted from a sweep with its interval, beside the bound B_D = nΔ_D.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training") model the updates S and the examples
E = B·S that SGD needs to reach a target, each B at its own tuned step size, as

    S(B) = S_min (1 + B_crit / B),    E(B) = E_min (1 + B / B_crit),    B_crit = E_min / S_min,

so (S/S_min − 1)(E/E_min − 1) = 1: below B_crit doubling B nearly halves the updates (perfect scaling),
above it the updates barely fall and the examples double. They predict B_crit by the simple noise scale
B_noise = tr(Σ)/‖μ‖² = B_D − 1 (DESIGN.md); the paper's B_D is a *sufficient* bound (Theorem 3), not where
speedup stops. Zhang et al. (2024) define instead B_opt: the largest B whose updates exceed perfect scaling
from the smallest B by at most 20% (``zhang_b_opt``; under the model B_opt = 1.2·B_0 + 0.2·B_crit).

    fits = critical_batch(records)                # one CriticalFit per (mechanism, replication)
    b, low, high = fastest_batch({(0.1, 64): [3.1, 2.9], (0.1, 128): [2.2, 2.5]})   # raygd project

Pure functions over ``raygd.records.TrialRecord`` s and numbers (numpy), no Ray and no MLflow; shared by
``tuning`` (tables, figures, the sweep's answer) and ``raygd.project``, which must not import ``tuning``.
Tests: ``pytest tests/test_critical.py`` (synthetic sweeps drawn from the model: error and coverage).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raygd.records import FIXED_POLICY, TrialRecord
from raygd.stats import N_BOOTSTRAP  # resamples behind the 95% intervals

MIN_BATCHES = 4
"""Fewest batch sizes (each with a tuned step that every seed reached with) the fit accepts: two
parameters from three points leaves one degree of freedom, too few to see the curve's shape."""
ZHANG_OVERHEAD = 0.2
"""Zhang et al.'s B_opt: updates at most (1 + this) × perfect scaling from the smallest B."""
IRLS_ROUNDS = 3
"""Reweighting rounds of the weighted fit (weights 1/S_fit², from the previous round's fit)."""
EDGE_LOW, EDGE_HIGH = "low", "high"
"""A tuned step size that is the smallest/largest tried at its B (as ``tuning.stats``)."""
BASELINE = "vanilla"


@dataclass(frozen=True)
class BatchPoint:
    """One B at the step size tuned there: the updates to target of each seed."""

    global_batch_size: int
    step_size: float
    """γ*(B): the fewest mean updates to target over the γ tried at B whose every seed reached it."""
    updates: tuple[float, ...]
    """Updates to target per seed at γ*(B)."""
    step_edge: str | None
    """``EDGE_LOW``/``EDGE_HIGH`` when γ*(B) is the smallest/largest of two or more γ tried at B: the best
    γ may lie beyond, S(B) is then an upper bound and the point untrustworthy (``extend_edges_scope:
    every_batch`` brackets it)."""
    candidates: tuple[tuple[float, ...], ...] = ()
    """Updates per seed of every γ at B whose seeds all reached (γ*(B)'s included): the bootstrap tunes
    γ again in every resample."""

    @property
    def mean_updates(self) -> float:
        return statistics.fmean(self.updates)

    @property
    def std_updates(self) -> float:
        return statistics.stdev(self.updates) if len(self.updates) > 1 else 0.0

    @property
    def examples(self) -> float:
        """E(B) = B · S(B), mean over seeds."""
        return self.global_batch_size * self.mean_updates


@dataclass(frozen=True)
class CriticalFit:
    """B_crit of one (mechanism, replication), or why it was not fitted, with B_D beside it."""

    mechanism: str
    replication: int
    points: tuple[BatchPoint, ...]
    """Every B with a tuned step that every seed reached, by B: what was fitted."""
    unreached_batches: tuple[int, ...] = ()
    """Batch sizes tried where no γ had every seed reach the target (left out of the fit)."""
    refused: str | None = None
    """Why there is no fit (too few B, a curve that does not fall); None when fitted."""
    b_crit: float | None = None
    b_crit_low: float | None = None
    """2.5% bootstrap percentile over seeds (inf: some resamples scale perfectly over every B tried)."""
    b_crit_high: float | None = None
    s_min: float | None = None
    """Updates to target as B → ∞."""
    s_min_low: float | None = None
    s_min_high: float | None = None
    e_min: float | None = None
    """Examples to target as B → 0: S_min · B_crit."""
    e_min_low: float | None = None
    e_min_high: float | None = None
    residuals: tuple[float, ...] = ()
    """S_measured / S_fit − 1 per point."""
    b_opt: int | None = None
    """Zhang et al.'s B_opt (``zhang_b_opt``)."""
    batch_bound_w0: float | None = None
    """B_D = nΔ_D at the initial weights, mean over the fitted points' trials."""
    batch_bound_median: float | None = None
    """Median online B_D along training, mean over the fitted points' trials."""
    n_seeds: int = 0
    """Most seeds at a fitted point."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fitted(self) -> bool:
        return self.refused is None and self.b_crit is not None

    @property
    def edge_batches(self) -> tuple[int, ...]:
        """Batch sizes whose tuned γ is on the edge of the γ tried there (untrustworthy points)."""
        return tuple(p.global_batch_size for p in self.points if p.step_edge)

    @property
    def noise_scale(self) -> float | None:
        """B_noise = B_D − 1 at w0 (McCandlish et al.'s simple noise scale)."""
        return None if self.batch_bound_w0 is None else self.batch_bound_w0 - 1.0

    def over_bound(self, value: float | None) -> float | None:
        """``value`` / B_D(w0), e.g. B_crit / B_D."""
        b = self.batch_bound_w0
        return None if value is None or b is None or not b > 0 else value / b

    @property
    def max_abs_residual(self) -> float | None:
        return max((abs(r) for r in self.residuals), default=None)

    def curve(self, batches: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fitted (E(B), S(B)) at ``batches``."""
        if not self.fitted or self.s_min is None or self.b_crit is None:
            raise ValueError(f"{self.mechanism}: no fit ({self.refused})")
        b = np.asarray(batches, dtype=float)
        s = self.s_min * (1.0 + self.b_crit / b)
        return b * s, s

    def as_dict(self) -> dict[str, Any]:
        """A flat row for CSV: the numbers, the points and residuals as ``B:value`` lists joined by ';'."""
        keys = ("b_crit", "b_crit_low", "b_crit_high", "s_min", "s_min_low", "s_min_high", "e_min")
        keys += ("e_min_low", "e_min_high", "b_opt", "batch_bound_w0", "batch_bound_median")
        out: dict[str, Any] = {"mechanism": self.mechanism, "replication": self.replication}
        out.update({k: getattr(self, k) for k in keys})
        out["noise_scale"] = self.noise_scale
        out["b_crit_over_bound"] = self.over_bound(self.b_crit)
        out["n_seeds"] = self.n_seeds
        out["batches"] = ";".join(str(p.global_batch_size) for p in self.points)
        out["step_sizes"] = ";".join(f"{p.step_size:g}" for p in self.points)
        out["updates_mean"] = ";".join(f"{p.mean_updates:.6g}" for p in self.points)
        out["residuals"] = ";".join(f"{r:+.4f}" for r in self.residuals)
        out["edge_batches"] = ";".join(map(str, self.edge_batches))
        out["unreached_batches"] = ";".join(map(str, self.unreached_batches))
        out["refused"] = self.refused or ""
        return out


# --------------------------------------------------------------------------- the fit


def fit_line(
    inv_batch: np.ndarray, updates: np.ndarray, counts: np.ndarray, rounds: int = IRLS_ROUNDS
) -> tuple[np.ndarray, np.ndarray]:
    """S = a + c·x with x = 1/B by weighted linear least squares: a = S_min, c = S_min·B_crit.

    S is linear in 1/B, so the fit is closed form: a unique minimiser, no starting guess, nothing to fail
    to converge on a resample, and thousands of bootstrap resamples fitted at once (chosen over
    ``scipy.optimize.curve_fit`` for those reasons). The spread of updates to target grows with S (a
    roughly constant coefficient of variation), so point B has weight k_B / S_fit(B)² (k_B seeds),
    S_fit from the previous round (the first from the measured S), ``rounds`` times; each round solves

        c = (Σw·Σwxy − Σwx·Σwy) / (Σw·Σwx² − (Σwx)²),    a = (Σwy − c·Σwx) / Σw.

    Args:
        inv_batch: x = 1/B per point, shape (K,).
        updates: mean updates to target per point, shape (K,) or (R, K) for R resamples at once.
        counts: seeds per point, shape (K,).
    Returns:
        (a, c), each of shape () or (R,).
    """
    x, y = np.asarray(inv_batch, float), np.asarray(updates, float)
    k = np.asarray(counts, float)
    fitted = y
    a = c = np.zeros(y.shape[:-1])
    for _ in range(max(1, rounds)):
        w = k / np.maximum(fitted, 1e-3 * y) ** 2  # a fit that goes negative somewhere must not blow up
        sw, swx, swy = w.sum(-1), (w * x).sum(-1), (w * y).sum(-1)
        swxx, swxy = (w * x * x).sum(-1), (w * x * y).sum(-1)
        c = (sw * swxy - swx * swy) / (sw * swxx - swx**2)
        a = (swy - c * swx) / sw
        fitted = a[..., None] + c[..., None] * x
    return a, c


def _b_crit(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """B_crit = c / a: inf where a ≤ 0 (perfect scaling over every B), 0 where the curve does not fall."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c <= 0, 0.0, np.where(a <= 0, np.inf, c / np.where(a == 0, 1.0, a)))


def resampled_means(values: Sequence[float], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap means of ``values`` (k seeds drawn with replacement), shape (n_boot,).

    A plain bootstrap of a mean of k values has variance (k − 1)/k · s²/k, too small for the few seeds
    a sweep has (2/3 at k = 3: 95% intervals that cover ~88%); each resampled mean's deviation from the
    mean is scaled by √(k/(k − 1)) so its variance is s²/k. One value: no spread (the mean itself).
    """
    v = np.asarray(values, dtype=float)
    mean = v.mean()
    if v.size < 2:
        return np.full(n_boot, mean)
    boot = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    return mean + math.sqrt(v.size / (v.size - 1)) * (boot - mean)


def pooled_deviations(groups: Iterable[Sequence[float]]) -> np.ndarray:
    """Each seed's relative deviation from its group's mean, u_s/ū − 1, scaled by √(k/(k − 1)) so that each
    has the variance σ² of one seed (a deviation from a mean of k has (k − 1)/k · σ²); groups of one seed
    add nothing. Pooled over the groups: the constant coefficient of variation that ``fit_line`` weights by."""
    out = []
    for g in groups:
        v = np.asarray(g, dtype=float)
        if v.size >= 2 and v.mean() > 0:
            out.append((v / v.mean() - 1.0) * math.sqrt(v.size / (v.size - 1)))
    return np.concatenate(out) if out else np.zeros(0)


def resampled_pooled(mean: float, k: int, pool: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap means of k seeds around ``mean``: ū·(1 + mean of k deviations drawn from ``pool``)."""
    return mean * (1.0 + pool[rng.integers(0, pool.size, size=(n_boot, k))].mean(axis=1))


def _interval(x: np.ndarray) -> tuple[float, float]:
    """2.5% and 97.5% percentiles, taken as order statistics (inf stays inf, no inf − inf)."""
    low, high = np.quantile(x, [0.025, 0.975], method="inverted_cdf")
    return float(low), float(high)


def zhang_b_opt(points: Sequence[BatchPoint], overhead: float = ZHANG_OVERHEAD) -> int | None:
    """The largest B whose mean updates are at most (1 + overhead) × perfect scaling from the smallest B:
    S(B) ≤ (1 + overhead) · S(B_0) · B_0 / B (Zhang et al. 2024); None without points."""
    if not points:
        return None
    first = min(points, key=lambda p: p.global_batch_size)
    perfect = first.mean_updates * first.global_batch_size
    ok = [p.global_batch_size for p in points if p.mean_updates * p.global_batch_size <= (1 + overhead) * perfect]
    return max(ok)


def bootstrap_fits(
    points: Sequence[BatchPoint], n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """``n_boot`` resampled fits (S_min, S_min·B_crit) of ``points`` as ``fit_points`` describes, each of shape
    (n_boot,); B_crit = c/a (``b_crit_samples``). None when no point has two seeds. Two mechanisms' samples,
    drawn independently, give the interval of a ratio such as B_crit(DropConnect) / B_crit(vanilla)."""
    pts = sorted(points, key=lambda p: p.global_batch_size)
    pool = pooled_deviations(u for p in pts for u in (p.candidates or (p.updates,)))
    if pool.size == 0:
        return None
    rng = np.random.default_rng(seed)
    groups = [p.candidates or (p.updates,) for p in pts]
    boot = np.stack(
        [np.min([resampled_pooled(statistics.fmean(u), len(u), pool, n_boot, rng) for u in g], axis=0) for g in groups],
        axis=1,
    )
    x = np.array([1.0 / p.global_batch_size for p in pts])
    return fit_line(x, boot, np.array([len(p.updates) for p in pts]))


def b_crit_samples(points: Sequence[BatchPoint], n_boot: int = N_BOOTSTRAP, seed: int = 0) -> np.ndarray | None:
    """B_crit of each resampled fit (``bootstrap_fits``): inf where S_min ≤ 0, 0 where the curve does not fall."""
    boot = bootstrap_fits(points, n_boot, seed)
    return None if boot is None else _b_crit(*boot)


def fit_points(
    points: Sequence[BatchPoint], n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[str | None, dict[str, Any]]:
    """Fit S(B) = S_min(1 + B_crit/B) to tuned points (``fit_line``), with 95% intervals from a bootstrap
    over seeds.

    Each resample redraws, at every B and for every γ whose seeds all reached, that γ's k seeds: k relative
    deviations drawn from those of every seed of the sweep (``pooled_deviations``), independently per B
    (seeds at different B share only w0); γ is tuned again (the fewest resampled mean updates) and the
    resample fitted. Pooling over B is the constant coefficient of variation the weights assume; resampling
    each B's own 2–3 seeds instead estimates each point's spread from 1–2 degrees of freedom, and its 95%
    intervals covered the true B_crit in 88–91% of synthetic sweeps (3 seeds, 7 B) where pooled ones cover
    95–97% (``tests/test_critical.py``). Percentile intervals (2.5%, 97.5%).

    Returns:
        (refusal, fields of ``CriticalFit``): a refusal with fewer than ``MIN_BATCHES`` points, with updates
        that do not fall from the smallest to the largest B, with a fitted slope ≤ 0, or with S_min ≤ 0
        (updates fall as fast as 1/B over every B tried: B_crit beyond them). No interval with one seed
        everywhere.
    """
    pts = sorted(points, key=lambda p: p.global_batch_size)
    if len(pts) < MIN_BATCHES:
        return (
            f"{len(pts)} batch size{'s' if len(pts) != 1 else ''} reached the target at a tuned step: "
            f"the fit needs {MIN_BATCHES} or more",
            {},
        )
    first, last = pts[0], pts[-1]
    if first.mean_updates <= last.mean_updates:
        return (
            f"updates do not fall with B: {first.mean_updates:.3g} at B = {first.global_batch_size}, "
            f"{last.mean_updates:.3g} at B = {last.global_batch_size}",
            {},
        )
    x = np.array([1.0 / p.global_batch_size for p in pts])
    y = np.array([p.mean_updates for p in pts])
    k = np.array([len(p.updates) for p in pts])
    a, c = (float(v) for v in fit_line(x, y, k))
    if c <= 0:
        return f"the fitted curve does not fall (S_min·B_crit = {c:.3g} ≤ 0)", {}
    if a <= 0:
        return (
            f"updates fall as fast as 1/B over B = {first.global_batch_size}…{last.global_batch_size} "
            f"(S_min = {a:.3g} ≤ 0): B_crit is beyond the largest B tried",
            {},
        )
    fields: dict[str, Any] = {"b_crit": c / a, "s_min": a, "e_min": c}
    fields["residuals"] = tuple(float(v) for v in y / (a + c * x) - 1.0)
    boot = bootstrap_fits(pts, n_boot, seed)
    if boot is None:  # one seed everywhere: no spread to resample
        return None, fields
    a_b, c_b = boot
    for name, values in (("b_crit", _b_crit(a_b, c_b)), ("s_min", a_b), ("e_min", c_b)):
        fields[f"{name}_low"], fields[f"{name}_high"] = _interval(values)
    return None, fields


# --------------------------------------------------------------------------- records → tuned points


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _side(value: float, tried: Iterable[float]) -> str | None:
    values = set(tried)
    if len(values) < 2:
        return None
    return EDGE_LOW if value == min(values) else EDGE_HIGH if value == max(values) else None


def tuned_points(trials: Iterable[TrialRecord]) -> tuple[list[BatchPoint], list[int]]:
    """Per B of one (mechanism, replication): γ*(B), the fewest mean updates to target over the γ whose
    every seed reached it with a recorded updates count, and whether it is on an edge of the γ tried at B.
    Ties (equal means: updates are counted at evaluations, every few updates at small B) go to a γ inside
    the range tried, then to the smaller: a tie with an inner neighbour puts the optimum between them, not
    beyond the edge. Returns (points by B, batch sizes where no γ qualified)."""
    by_pair: dict[tuple[int, float], list[TrialRecord]] = defaultdict(list)
    for t in trials:
        by_pair[(t.global_batch_size, t.step_size)].append(t)
    steps: dict[int, list[float]] = defaultdict(list)
    reached: dict[int, list[tuple[float, float, tuple[float, ...]]]] = defaultdict(list)
    for (b, gamma), ts in by_pair.items():
        steps[b].append(gamma)
        if all(t.reached and _finite(t.updates_to_accuracy) for t in ts):
            ups = tuple(float(t.updates_to_accuracy or 0) for t in sorted(ts, key=lambda t: (t.seed, t.trial_id)))
            reached[b].append((statistics.fmean(ups), gamma, ups))
    points, unreached = [], []
    for b in sorted(steps):
        if not reached[b]:
            unreached.append(b)
            continue
        _, _, gamma, ups = min((m, _side(g, steps[b]) is not None, g, u) for m, g, u in reached[b])
        cands = tuple(u for _, _, u in sorted(reached[b]))
        points.append(BatchPoint(b, gamma, ups, _side(gamma, steps[b]), cands))
    return points, unreached


def _mean(xs: Iterable[float | None]) -> float | None:
    finite = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.fmean(finite) if finite else None


def critical_batch(
    records: Iterable[TrialRecord], replication: int | None = None, n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> list[CriticalFit]:
    """B_crit per (mechanism, replication) of a sweep's search and extension trials (not its confirm phase).

    Args:
        records: trial records.
        replication: only this replication factor; None: every one in the records.
        n_boot, seed: bootstrap resamples and the seed of their generator.
    Returns:
        One ``CriticalFit`` per (mechanism, replication): vanilla first, then by mechanism and r.
    """
    groups: dict[tuple[str, int], list[TrialRecord]] = defaultdict(list)
    for r in records:  # a trial whose batch policy moved B has no one B to fit: not here (raygd.batch_schedule)
        if (replication is None or r.replication == replication) and r.batch_policy == FIXED_POLICY:
            groups[(r.mechanism, r.replication)].append(r)
    fits = []
    for (mech, rep), trials in sorted(groups.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0])):
        points, unreached = tuned_points(trials)
        refused, fields = fit_points(points, n_boot, seed)
        at_points = {(p.global_batch_size, p.step_size) for p in points}
        fitted_trials = [t for t in trials if (t.global_batch_size, t.step_size) in at_points]
        fits.append(
            CriticalFit(
                mechanism=mech,
                replication=rep,
                points=tuple(points),
                unreached_batches=tuple(unreached),
                refused=refused,
                b_opt=zhang_b_opt(points),
                batch_bound_w0=_mean(t.batch_bound_w0 for t in fitted_trials or trials),
                batch_bound_median=_mean(t.batch_bound_median for t in fitted_trials),
                n_seeds=max((len(p.updates) for p in points), default=0),
                **fields,
            )
        )
    return fits


# --------------------------------------------------------------------------- raygd project


def fastest_batch(
    times: Mapping[tuple[float, int], Sequence[float]], n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[int, int | None, int | None]:
    """The B of least mean time over its tuned γ, with its 95% interval over seeds.

    Args:
        times: per (γ, B), the time to target of each seed (every seed reached).
    Returns:
        (B*, low, high): B* = argmin_B min_γ mean time; low/high the 2.5%/97.5% order statistics of B* over
        bootstrap resamples (each pair's seeds resampled as in ``resampled_means``, γ tuned again at every
        B); None when no pair has two seeds.
    """
    if not times:
        raise ValueError("no (step size, B) with a time to target")
    keys = sorted(times, key=lambda k: (k[1], k[0]))
    means = [statistics.fmean(times[k]) for k in keys]
    best = keys[int(np.argmin(means))][1]
    if all(len(times[k]) < 2 for k in keys):
        return best, None, None
    rng = np.random.default_rng(seed)
    boot = np.stack([resampled_means(times[k], n_boot, rng) for k in keys], axis=1)
    winners = np.array([k[1] for k in keys])[np.argmin(boot, axis=1)]
    low, high = np.quantile(winners, [0.025, 0.975], method="inverted_cdf")
    return best, int(low), int(high)
