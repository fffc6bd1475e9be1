"""Pure functions behind bench/paper/run.py: the paper's numbers from trial records and measurements.

No Ray, no MLflow: curves, records and bounds in, rows, markdown and PNG figures out.
Tests: ``pytest tests/test_paper.py``.

- Figure 3a, loss ratio averaged over iterations: for one seed,
  ρ̄ = (1/K) Σ_k L_large(p_k) / L_small(p_k) over the K evaluation points p_k > 0 (in passes)
  of the large batch; the small batch's curve, evaluated more often, is linearly interpolated in
  passes. Each B has its own tuned step size γ*_B = argmin_γ mean_seeds mean_k L(B, γ, p_k)
  (fastest convergence = lowest average loss along the run); diverged runs rank last.
  The replication control (r >= 2: the same n/r distinct examples without replication, at equal
  updates, its passes given as examples processed / n) is tuned and averaged the same way, as its
  own row; ``control_pairs`` sets each replicated row beside its control, paired by seed.
- Figures 1-2: per batch size, the best step size's passes and time to accuracy; per-pass
  speedup S_pass(B) = t_pass(B_min) / t_pass(B), t_pass = training seconds / passes.
- Bound vs observed: the best batch size a sweep found against B_D = nΔ_D.
- §4 at one common speed: a trial's time to accuracy at the sweep's common speed is
  T̃ = passes to accuracy × t̃_pass(mechanism, B), t̃_pass the median of training seconds / passes over
  *every* trial of that (mechanism, B) (all γ, seeds, reached or not). A long sweep on a VM whose speed
  drifts (1.6× over the first §4 re-run) gives each trial its hour's speed; with the trials in a shuffled
  order (``sweep.trial_order``) the median is every arm's typical speed, and T̃ compares arms and step
  sizes at one speed. At one (mechanism, B), T̃ ranks step sizes as passes to accuracy do.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "vanilla"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _pm(mean: float | None, std: float | None, fmt: str = ".3g") -> str:
    return "–" if mean is None else f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


# --------------------------------------------------------------------------- Figure 3a


@dataclass(frozen=True)
class Curve:
    """Training loss of one run at its evaluation points (passes over the data, ascending)."""

    passes: tuple[float, ...]
    loss: tuple[float, ...]

    @property
    def finite(self) -> bool:
        """Non-empty and every loss finite (a diverged run is not)."""
        return bool(self.loss) and all(math.isfinite(v) for v in self.loss)

    def mean_loss(self) -> float:
        """Mean loss over the evaluation points after the start (inf when not finite)."""
        vals = [v for p, v in zip(self.passes, self.loss, strict=True) if p > 0]
        return statistics.fmean(vals) if vals and self.finite else math.inf


def mean_loss_ratio(small: Curve, large: Curve) -> float | None:
    """ρ̄ = (1/K) Σ_k L_large(p_k) / L_small(p_k) over the large batch's points 0 < p_k ≤ max(small.passes).

    L_small is linearly interpolated in passes (``np.interp``). None when either curve is not finite,
    no point overlaps, or an interpolated small-batch loss is ≤ 0.
    """
    if not (small.finite and large.finite):
        return None
    pts = [(p, v) for p, v in zip(large.passes, large.loss, strict=True) if 0 < p <= max(small.passes) + 1e-9]
    if not pts:
        return None
    at = np.interp([p for p, _ in pts], small.passes, small.loss)
    if np.any(at <= 0):
        return None
    return float(np.mean([v / s for (_, v), s in zip(pts, at, strict=True)]))


def tuned_step(curves_by_step: Mapping[float, Sequence[Curve]]) -> float | None:
    """γ* = argmin_γ mean over seeds of ``Curve.mean_loss``; a γ with a non-finite seed ranks last,
    ties → the smaller γ; None when no γ has a finite curve."""
    scored = []
    for step, curves in curves_by_step.items():
        losses = [c.mean_loss() for c in curves]
        n_bad = sum(not math.isfinite(v) for v in losses)
        good = [v for v in losses if math.isfinite(v)]
        if good:
            scored.append((n_bad, statistics.fmean(good), step))
    return min(scored)[2] if scored else None


@dataclass(frozen=True)
class Fig3aRow:
    """Loss ratio of one (replication, mechanism): mean ± std over seeds."""

    replication: int
    mechanism: str
    small_step: float | None
    large_step: float | None
    ratio_mean: float | None
    ratio_std: float | None
    final_ratio_mean: float | None
    final_ratio_std: float | None
    n_seeds: int
    edge_steps: str
    """Which tuned step sizes lie at an end of the grid ('' when none)."""
    control: bool = False
    """The replication control's row (n/r distinct examples, no replication, equal updates)."""
    seed_ratios: tuple[tuple[int, float], ...] = ()
    """(seed, averaged ratio) of every seed in the mean."""

    @property
    def arm(self) -> str:
        return "control" if self.control else ("replicated" if self.replication > 1 else "full data")


def fig3a_rows(runs: Iterable[Mapping[str, Any]], small_batch: int, large_batch: int) -> list[Fig3aRow]:
    """Figure 3a rows from runs {replication, mechanism, global_batch_size, step_size, seed, curve: Curve}
    and optionally control (bool, default False).

    Per (r, mechanism, control): γ* per batch size (``tuned_step``), then per seed present at both γ*
    the averaged ratio ``mean_loss_ratio`` and the final-point ratio L_large(end) / L_small(end).
    """
    groups: dict[tuple[int, str, bool], dict[int, dict[float, dict[int, Curve]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    runs = list(runs)
    grid = sorted({float(r["step_size"]) for r in runs})
    for r in runs:
        if r["global_batch_size"] in (small_batch, large_batch):
            group = groups[(int(r["replication"]), r["mechanism"], bool(r.get("control", False)))]
            group[r["global_batch_size"]][float(r["step_size"])][int(r["seed"])] = r["curve"]
    rows = []
    for (rep, mech, ctrl), by_b in groups.items():
        steps = {b: tuned_step({g: list(s.values()) for g, s in by_b[b].items()}) for b in (small_batch, large_batch)}
        ratios, finals, seeds = [], [], []
        if steps[small_batch] is not None and steps[large_batch] is not None:
            small, large = by_b[small_batch][steps[small_batch]], by_b[large_batch][steps[large_batch]]
            for seed in sorted(small.keys() & large.keys()):
                rho = mean_loss_ratio(small[seed], large[seed])
                if rho is not None:
                    ratios.append(rho)
                    seeds.append(seed)
                    finals.append(large[seed].loss[-1] / small[seed].loss[-1])
        edges = [f"B={b}: γ={s:g}" for b, s in steps.items() if s is not None and grid and s in (grid[0], grid[-1])]
        rows.append(
            Fig3aRow(
                rep,
                mech,
                steps[small_batch],
                steps[large_batch],
                *_mean_std(ratios),
                *_mean_std(finals),
                len(ratios),
                "; ".join(edges),
                ctrl,
                tuple(zip(seeds, ratios, strict=True)),
            )
        )
    return sorted(rows, key=lambda r: (r.mechanism != BASELINE, r.mechanism, r.replication, r.control))


@dataclass(frozen=True)
class ControlPair:
    """A replicated row beside its control: the difference replicated − control of the averaged ratio,
    per seed present in both (the same seed draws the same n/r examples for both arms)."""

    replication: int
    mechanism: str
    replicated: Fig3aRow
    control: Fig3aRow
    diff_mean: float | None
    diff_std: float | None
    n_paired: int


def control_pairs(rows: Sequence[Fig3aRow]) -> list[ControlPair]:
    """Each (r, mechanism) that has both a replicated and a control row, with the paired difference."""
    by_key = {(r.replication, r.mechanism, r.control): r for r in rows}
    out = []
    for (rep, mech, ctrl), row in by_key.items():
        ctl = by_key.get((rep, mech, True))
        if ctrl or ctl is None:
            continue
        theirs = dict(ctl.seed_ratios)
        diffs = [rho - theirs[seed] for seed, rho in row.seed_ratios if seed in theirs]
        out.append(ControlPair(rep, mech, row, ctl, *_mean_std(diffs), len(diffs)))
    return sorted(out, key=lambda p: (p.mechanism != BASELINE, p.mechanism, p.replication))


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def _table(header: Sequence[str], align: str, rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; ``align`` has one letter per column, l (left) or r (right)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fig3a_markdown(rows: Sequence[Fig3aRow], small_batch: int, large_batch: int) -> str:
    intro = (
        f"Loss ratio L(B={large_batch}) / L(B={small_batch}), averaged over the evaluation points of training "
        f"(and at the end), each B at its tuned step size; mean ± std over seeds. Arm: replicated = the "
        f"r-replicated set (n examples, n/r distinct); control = the same n/r distinct examples without "
        f"replication, trained for the same number of updates.\n\n"
    )
    return intro + _table(
        [
            "mechanism",
            "r",
            "arm",
            "γ*(B small)",
            "γ*(B large)",
            "avg loss ratio",
            "final loss ratio",
            "seeds",
            "tuned γ at grid edge",
        ],
        "lrlrrrrrl",
        [
            [
                r.mechanism,
                r.replication,
                r.arm,
                _g(r.small_step),
                _g(r.large_step),
                _pm(r.ratio_mean, r.ratio_std),
                _pm(r.final_ratio_mean, r.final_ratio_std),
                r.n_seeds,
                r.edge_steps or "–",
            ]
            for r in rows
        ],
    )


def fig3a_control_markdown(rows: Sequence[Fig3aRow]) -> str:
    """The replicated arm beside its control per (mechanism, r), with the paired difference over seeds."""
    pairs = control_pairs(rows)
    if not pairs:
        return ""
    intro = (
        "Replicated vs control (same seed = same n/r distinct examples, same evaluation sample, equal updates): "
        "avg loss ratio mean ± std over seeds; difference replicated − control per seed, mean ± std.\n\n"
    )
    return intro + _table(
        ["mechanism", "r", "replicated", "control", "replicated − control", "paired seeds"],
        "lrrrrr",
        [
            [
                p.mechanism,
                p.replication,
                _pm(p.replicated.ratio_mean, p.replicated.ratio_std),
                _pm(p.control.ratio_mean, p.control.ratio_std),
                _pm(p.diff_mean, p.diff_std).replace(f"{p.diff_mean:.3g}", f"{p.diff_mean:+.3g}", 1)
                if p.diff_mean is not None
                else "–",
                p.n_paired,
            ]
            for p in pairs
        ],
    )


# --------------------------------------------------------------------------- Figures 1-2


@dataclass(frozen=True)
class ScalingRow:
    """Batch size B at its best step size: passes and time to accuracy, time per pass, per-pass speedup."""

    global_batch_size: int
    step_size: float
    n_seeds: int
    passes_mean: float | None
    passes_std: float | None
    time_mean_s: float | None
    time_std_s: float | None
    pass_time_s: float | None
    pass_speedup: float | None


def scaling_rows(pairs: Iterable[Any]) -> list[ScalingRow]:
    """Rows from ``tuning.stats.pair_stats`` output of one mechanism (best pair first per B).

    t_pass = mean over the pair's trials of train_time_s / passes; the per-pass speedup is
    t_pass(smallest B) / t_pass(B). Time and passes to accuracy: over the seeds that reached.
    """
    best: dict[int, Any] = {}
    for p in pairs:
        best.setdefault(p.global_batch_size, p)
    rows = []
    for b in sorted(best):
        p = best[b]
        reached = [t for t in p.trials if t.reached]
        per_pass = [
            t.train_time_s / t.passes
            for t in p.trials
            if _finite(t.train_time_s) and _finite(t.passes) and t.passes > 0
        ]
        rows.append(
            ScalingRow(
                b,
                p.step_size,
                p.n_seeds,
                *_mean_std([t.passes_to_accuracy for t in reached if _finite(t.passes_to_accuracy)]),
                *_mean_std([t.time_to_accuracy_s for t in reached]),
                statistics.fmean(per_pass) if per_pass else None,
                None,
            )
        )
    base = rows[0].pass_time_s if rows else None
    return [
        ScalingRow(**{**r.__dict__, "pass_speedup": base / r.pass_time_s if base and r.pass_time_s else None})
        for r in rows
    ]


def scaling_markdown(rows: Sequence[ScalingRow], target: float | None, label: str = "Vanilla SGD") -> str:
    intro = (
        f"{label} per batch size at its best step size (target train accuracy {target}); "
        "mean ± std over seeds that reached.\n\n"
    )
    return intro + _table(
        ["B", "step size", "seeds", "passes to acc", "time to acc (s)", "s per pass", "per-pass speedup"],
        "rrrrrrr",
        [
            [
                r.global_batch_size,
                f"{r.step_size:g}",
                r.n_seeds,
                _pm(r.passes_mean, r.passes_std),
                _pm(r.time_mean_s, r.time_std_s),
                _pm(r.pass_time_s, None),
                _pm(r.pass_speedup, None, ".2f"),
            ]
            for r in rows
        ],
    )


# --------------------------------------------------------------------------- §4 at one common speed


@dataclass(frozen=True)
class CommonSpeedRow:
    """One (mechanism, B) at its best step size, timed at the sweep's common speed (module docstring)."""

    mechanism: str
    global_batch_size: int
    step_size: float
    step_edge: bool
    """γ* is the smallest or largest step size tried at this (mechanism, B)."""
    n_seeds: int
    passes: tuple[float, ...]
    """Passes to accuracy of the seeds that reached, by seed."""
    raw_times_s: tuple[float, ...]
    """Their measured (wall-clock training) times to accuracy."""
    pass_time_s: float
    """t̃_pass: median training seconds per pass over every trial of the (mechanism, B)."""
    n_timed: int
    """Trials t̃_pass is the median of."""

    @property
    def times_s(self) -> tuple[float, ...]:
        """T̃ per seed that reached: passes × t̃_pass."""
        return tuple(p * self.pass_time_s for p in self.passes)

    @property
    def all_reached(self) -> bool:
        return len(self.passes) == self.n_seeds > 0


def common_speed_rows(records: Iterable[Any]) -> list[CommonSpeedRow]:
    """Per (mechanism, B): the step size with the fewest mean passes to accuracy among those whose every seed
    reached (else the one with most seeds reached, then fewest passes), timed at the common speed."""
    from tuning import stats

    records = stats.as_records(records)  # read once: pair_stats reads them again
    per_pass: dict[tuple[str, int], list[float]] = defaultdict(list)
    for t in records:
        if _finite(t.train_time_s) and _finite(t.passes) and t.passes > 0:
            per_pass[(t.mechanism, t.global_batch_size)].append(t.train_time_s / t.passes)
    pairs: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for pair in stats.pair_stats(records):
        pairs[(pair.mechanism, pair.global_batch_size)].append(pair)
    rows = []
    for (mechanism, batch), candidates in pairs.items():
        if not per_pass.get((mechanism, batch)):
            continue

        def reached_passes(pair) -> list[float]:
            return [t.passes_to_accuracy for t in pair.trials if t.reached and _finite(t.passes_to_accuracy)]

        def key(pair) -> tuple:
            done = reached_passes(pair)
            mean = statistics.fmean(done) if done else math.inf
            # every seed reached: fewest passes (however many seeds); else most seeds reached, then fewest passes
            return (0, 0, mean, pair.step_size) if pair.reached else (1, -len(done), mean, pair.step_size)

        best = min(candidates, key=key)
        reached = [t for t in best.trials if t.reached and _finite(t.passes_to_accuracy)]
        steps = [p.step_size for p in candidates]
        rows.append(
            CommonSpeedRow(
                mechanism,
                batch,
                best.step_size,
                len(steps) > 1 and best.step_size in (min(steps), max(steps)),
                best.n_seeds,
                tuple(t.passes_to_accuracy for t in reached),
                tuple(t.time_to_accuracy_s for t in reached),
                statistics.median(per_pass[(mechanism, batch)]),
                len(per_pass[(mechanism, batch)]),
            )
        )
    return sorted(rows, key=lambda r: (r.mechanism != BASELINE, r.mechanism, r.global_batch_size))


@dataclass(frozen=True)
class CommonSpeedBest:
    """A mechanism's fastest B at the common speed and its speedup over vanilla's fastest, with a 95% interval."""

    row: CommonSpeedRow
    speedup: float | None
    low: float | None
    high: float | None
    raw_speedup: float | None
    """The same ratio from the measured (drifting) times of the same seeds."""

    @property
    def significant(self) -> bool | None:
        return None if self.low is None or self.high is None else not (self.low <= 1.0 <= self.high)


def common_speed_best(rows: Sequence[CommonSpeedRow]) -> list[CommonSpeedBest]:
    """Per mechanism, the (B, γ*) whose every seed reached with the lowest mean T̃; speedup = mean T̃ of
    vanilla's best over the mechanism's best (``raygd.stats.bootstrap_ratio``: seeds resampled per arm)."""
    from raygd.stats import bootstrap_ratio

    best: dict[str, CommonSpeedRow] = {}
    for r in rows:
        if r.all_reached and (
            r.mechanism not in best or statistics.fmean(r.times_s) < statistics.fmean(best[r.mechanism].times_s)
        ):
            best[r.mechanism] = r
    base = best.get(BASELINE)
    out = []
    for r in best.values():
        if base is None:
            out.append(CommonSpeedBest(r, None, None, None, None))
            continue
        ratio, _, low, high = bootstrap_ratio(base.times_s, r.times_s)
        raw = statistics.fmean(base.raw_times_s) / statistics.fmean(r.raw_times_s)
        spread = r is not base and min(len(base.times_s), len(r.times_s)) >= 2  # one seed has no interval
        out.append(CommonSpeedBest(r, ratio, low if spread else None, high if spread else None, raw))
    return sorted(out, key=lambda b: (b.row.mechanism != BASELINE, b.row.mechanism))


def _speedup_text(b: CommonSpeedBest) -> str:
    if b.speedup is None:
        return "–"
    if b.row.mechanism == BASELINE:
        return "1 (baseline)"
    if b.low is None or b.high is None:
        return f"{b.speedup:.2f}× (one seed: no interval)"
    return f"{b.speedup:.2f}× ({b.low:.2f}–{b.high:.2f})" + ("" if b.significant else ", not significant")


def common_speed_markdown(rows: Sequence[CommonSpeedRow], target: float | None) -> str:
    def sd(xs: Sequence[float]) -> float | None:
        return statistics.stdev(xs) if len(xs) >= 2 else None

    def mean(xs: Sequence[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    best = common_speed_best(rows)
    intro = (
        f"Time to the target train accuracy ({target}) at the sweep's common speed: passes to accuracy × the median "
        "training seconds per pass of every trial at that (mechanism, B); measured times beside (mean ± std over "
        "the seeds that reached). ◂ marks a step size on the edge of those tried at that B. The 95% interval "
        "resamples each arm's seeds (their passes); it takes each median pass time as exact.\n\n"
    )
    summary = _table(
        [
            "mechanism",
            "B",
            "step size",
            "time at common speed (s)",
            "passes",
            "speedup vs vanilla (95% interval)",
            "measured time (s)",
            "measured speedup",
        ],
        "lrrrrrrr",
        [
            [
                b.row.mechanism,
                b.row.global_batch_size,
                f"{b.row.step_size:g}" + (" ◂" if b.row.step_edge else ""),
                _pm(mean(b.row.times_s), sd(b.row.times_s)),
                _pm(mean(b.row.passes), sd(b.row.passes)),
                _speedup_text(b),
                _pm(mean(b.row.raw_times_s), sd(b.row.raw_times_s)),
                "–" if b.raw_speedup is None else f"{b.raw_speedup:.2f}×",
            ]
            for b in best
        ],
    )
    detail = _table(
        [
            "mechanism",
            "B",
            "step size",
            "reached",
            "passes",
            "s per pass (median of n)",
            "time at common speed (s)",
            "measured time (s)",
        ],
        "lrrrrrrr",
        [
            [
                r.mechanism,
                r.global_batch_size,
                f"{r.step_size:g}" + (" ◂" if r.step_edge else ""),
                f"{len(r.passes)}/{r.n_seeds}",
                _pm(mean(r.passes), sd(r.passes)),
                f"{r.pass_time_s:.3g} ({r.n_timed})",
                _pm(mean(r.times_s), sd(r.times_s)),
                _pm(mean(r.raw_times_s), sd(r.raw_times_s)),
            ]
            for r in rows
        ],
    )
    return intro + summary + "\nEvery (mechanism, B) at its best step size:\n\n" + detail


# --------------------------------------------------------------------------- bound vs observed


@dataclass(frozen=True)
class BoundRow:
    """One setting: B_D at the initial weights, the smallest B_D along training, the best B a sweep found."""

    setting: str
    bound_init: float | None
    bound_min_along: float | None
    best_batch: int | None
    best_source: str
    ratio_best_to_bound: float | None
    """best_batch / bound_init."""


def bound_vs_best(
    bounds: Mapping[str, float | None],
    along_min: Mapping[str, float | None],
    best: Mapping[str, tuple[int | None, str]],
) -> list[BoundRow]:
    """Join B_D per setting with the best batch size found per setting (None: that sweep was not run)."""
    rows = []
    for setting in dict.fromkeys([*bounds, *best]):
        b_d, (b_best, source) = bounds.get(setting), best.get(setting, (None, "not run"))
        ratio = b_best / b_d if b_best is not None and _finite(b_d) and b_d > 0 else None
        rows.append(BoundRow(setting, b_d, along_min.get(setting), b_best, source, ratio))
    return rows


def bound_markdown(rows: Sequence[BoundRow]) -> str:
    return _table(
        ["setting", "B_D at w0", "min B_D along training", "best B found", "found by", "best B / B_D(w0)"],
        "lrrrlr",
        [
            [
                r.setting,
                _pm(r.bound_init, None, ".4g"),
                _pm(r.bound_min_along, None, ".4g"),
                "not run yet" if r.best_batch is None else r.best_batch,
                r.best_source,
                _pm(r.ratio_best_to_bound, None, ".3g"),
            ]
            for r in rows
        ],
    )


# --------------------------------------------------------------------------- §4 on an emulated link (#15)


@dataclass(frozen=True)
class LinkCheckRow:
    """One (mechanism, γ, B) measured under the emulated link, against its projection from the no-link sweep."""

    mechanism: str
    step_size: float
    global_batch_size: int
    seeds: int
    """Seeds measured under the link that have a projection (the same seed reached without the link)."""
    same_updates: int
    """Of those, how many took exactly the no-link trial's updates to target (the link changes time only)."""
    projected_mean_s: float | None
    measured_mean_s: float | None
    measured_std_s: float | None
    errors: tuple[float, ...]
    """Per seed: measured / projected − 1."""


def link_check_rows(projected: Iterable[Mapping[str, Any]], measured: Iterable[Any]) -> list[LinkCheckRow]:
    """Pair each measured trial (a ``TrialRecord`` run under the link) with the projected row of the no-link
    trial of the same (mechanism, γ, B, seed) on P = 2 (``raygd.project.Projection.trials``)."""
    proj = {
        (r["mechanism"], r["step_size"], r["global_batch_size"], r["seed"]): r
        for r in projected
        if r["workers"] == 2 and r["projected_time_to_accuracy_s"] != ""
    }
    groups: dict[tuple[str, float, int], list[tuple[Any, Mapping[str, Any]]]] = defaultdict(list)
    for t in measured:
        key = (t.mechanism, t.step_size, t.global_batch_size)
        if (*key, t.seed) in proj:
            groups[key].append((t, proj[(*key, t.seed)]))
    rows = []
    for (mech, step, batch), pairs in sorted(groups.items(), key=lambda kv: (kv[0][0] != BASELINE, kv[0])):
        reached = [(t, p) for t, p in pairs if t.reached]
        rows.append(
            LinkCheckRow(
                mech,
                step,
                batch,
                len(pairs),
                sum(t.updates_to_accuracy == p["updates_to_accuracy"] for t, p in pairs),
                statistics.fmean(p["projected_time_to_accuracy_s"] for _, p in pairs),
                *_mean_std([t.time_to_accuracy_s for t, _ in reached]),
                tuple(t.time_to_accuracy_s / p["projected_time_to_accuracy_s"] - 1.0 for t, p in reached),
            )
        )
    return rows


def link_check_markdown(rows: Sequence[LinkCheckRow], link_text: str) -> str:
    """The check as a table, with the median and worst |error| over every seed and each mechanism's speedup."""
    errors = [abs(e) for r in rows for e in r.errors]
    head = (
        f"§4's settings on 2 workers under an EMULATED link ({link_text}; raygd.network, time only): measured "
        "time to accuracy against the PROJECTION from the same (γ, B, seed) without the link (its updates × "
        "the modelled step on this link). Mean ± std over seeds.\n\n"
    )
    table = _table(
        ["mechanism", "γ", "B", "seeds", "same updates", "projected (s)", "measured (s)", "error (median)"],
        "lrrrrrrr",
        [
            [
                r.mechanism,
                f"{r.step_size:g}",
                r.global_batch_size,
                r.seeds,
                f"{r.same_updates}/{r.seeds}",
                _pm(r.projected_mean_s, None),
                _pm(r.measured_mean_s, r.measured_std_s),
                "–" if not r.errors else f"{statistics.median(r.errors):+.1%}",
            ]
            for r in rows
        ],
    )
    summary = (
        f"\nError over {len(errors)} measured seeds: median {statistics.median(errors):.1%}, "
        f"worst {max(errors):.1%} (goal of bench/projection.py: median ≤ 10%).\n"
        if errors
        else "\nNothing measured yet.\n"
    )
    return head + table + summary + _link_speedups(rows)


def _link_speedups(rows: Sequence[LinkCheckRow]) -> str:
    """Each mechanism's fastest measured setting against vanilla's, measured and projected."""
    best: dict[str, LinkCheckRow] = {}
    for r in rows:
        if r.measured_mean_s is not None and (
            r.mechanism not in best or r.measured_mean_s < best[r.mechanism].measured_mean_s  # type: ignore[operator]
        ):
            best[r.mechanism] = r
    base = best.get(BASELINE)
    if base is None or len(best) < 2:
        return ""
    lines = [
        "",
        "| mechanism | fastest measured (γ, B) | measured speedup vs vanilla | projected speedup |",
        "|---|---|---:|---:|",
    ]
    for mech, r in best.items():
        lines.append(
            f"| {mech} | {r.step_size:g}, {r.global_batch_size} | "
            f"{base.measured_mean_s / r.measured_mean_s:.2f}× | {base.projected_mean_s / r.projected_mean_s:.2f}× |"  # type: ignore[operator]
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def _figure(ncols: int = 1):
    from matplotlib.figure import Figure

    return Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")


def plot_fig3a(rows: Sequence[Fig3aRow], path: Path, small_batch: int, large_batch: int) -> Path:
    fig = _figure()
    ax = fig.subplots()
    for i, mech in enumerate(dict.fromkeys(r.mechanism for r in rows)):
        for ctrl in (False, True):
            pts = [r for r in rows if r.mechanism == mech and r.control == ctrl and r.ratio_mean is not None]
            if not pts:
                continue
            shift = 1.04 if ctrl else 1.0  # side by side on the log axis
            n = min(r.n_seeds for r in pts)
            ax.errorbar(
                [r.replication * shift for r in pts],
                [r.ratio_mean for r in pts],
                yerr=[r.ratio_std or 0.0 for r in pts],
                marker="s" if ctrl else "o",
                mfc="none" if ctrl else None,
                ls="--" if ctrl else "-",
                color=f"C{i}",
                capsize=3,
                label=f"{mech}, control: n/r distinct, no replication (≥{n} seeds)" if ctrl else f"{mech} (≥{n} seeds)",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(
        xlabel="replication factor r",
        ylabel=f"avg loss ratio L(B={large_batch}) / L(B={small_batch})",
        title="Figure 3a: logistic regression, Fashion-MNIST 0 vs 6",
    )
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_scaling(rows: Sequence[ScalingRow], path: Path) -> Path:
    fig = _figure(2)
    ax_s, ax_p = fig.subplots(1, 2)
    bs = [r.global_batch_size for r in rows]
    ax_s.plot(bs, [r.pass_speedup or math.nan for r in rows], marker="o")
    ax_s.set(xlabel="global batch size B", ylabel="per-pass speedup vs smallest B", title="Figure 1: speedup per pass")
    ax_p.errorbar(
        bs, [r.passes_mean or math.nan for r in rows], yerr=[r.passes_std or 0.0 for r in rows], marker="o", capsize=3
    )
    ax_p.set(
        xlabel="global batch size B",
        ylabel="passes to target accuracy (reached runs)",
        title="Figure 2: passes to accuracy",
    )
    for ax in (ax_s, ax_p):  # every B of the grid labelled, no log-scale minor labels
        ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_bound(along: Sequence[tuple[float, float]], rows: Sequence[BoundRow], path: Path) -> Path:
    """B_D along training (vanilla) with the best batch sizes found as horizontal lines."""
    fig = _figure()
    ax = fig.subplots()
    if along:
        ax.plot([p for p, _ in along], [b for _, b in along], marker="o", label="B_D (vanilla) along training")
    for i, r in enumerate(rows):
        if r.bound_init is not None and r.setting != BASELINE:
            ax.axhline(r.bound_init, color=f"C{i + 1}", ls=":", label=f"B_D at w0, {r.setting}")
        if r.best_batch is not None:
            ax.axhline(r.best_batch, color=f"C{i + 1}", ls="--", label=f"best B found, {r.setting}")
    ax.set(
        yscale="log",
        xlabel="passes over the data",
        ylabel="batch size",
        title="bound B_D = nΔ_D vs best batch size found",
    )
    ax.legend(fontsize="x-small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
