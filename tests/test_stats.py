"""Tests for tuning/stats.py: ranking, best pairs, speedups, spreads, loss ratios."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from raygd.stats import bootstrap_ratio
from tests.trials import loss_record as _loss
from tests.trials import rec, seeds
from tests.trials import sweep_records as _sweep
from tuning.confirm import confirm_summary
from tuning.loss_ratio import loss_ratios
from tuning.stats import BestRow, best_per_mechanism, pair_stats, rank_trials
from tuning.tables import summary_markdown, write_trials_csv

# --------------------------------------------------------------------------- ranking


@pytest.mark.parametrize(
    "fn",
    [
        rank_trials,
        best_per_mechanism,
        confirm_summary,
        lambda rs: loss_ratios(rs, 16, 512),
        lambda rs: write_trials_csv(rs, "/nonexistent/never-written.csv"),
    ],
)
def test_duplicate_trial_ids_raise(fn):
    records = [rec(time=1.0, trial_id="dup"), rec(time=2.0, trial_id="ok"), rec(time=3.0, trial_id="dup")]
    with pytest.raises(ValueError, match=r"duplicate trial ids.*dup"):
        fn(records)


def test_rank_orders_reached_by_time_then_max_passes_stopped_diverged_error():
    records = [
        rec(trial_id="err", status="error"),
        rec(trial_id="div", status="diverged", loss=math.nan),
        rec(trial_id="slow", time=9.0),
        rec(trial_id="max", status="max_passes"),
        rec(trial_id="asha", status="stopped_early", acc=0.3),
        rec(trial_id="fast", time=1.5),
        rec(trial_id="nan-time", status="reached_target", time=math.nan),
    ]
    assert [r.trial_id for r in rank_trials(records)] == ["fast", "slow", "max", "nan-time", "asha", "div", "err"]


def test_rank_ties_are_deterministic():
    records = [
        rec(trial_id="b", time=2.0, passes_to_accuracy=0.5),
        rec(trial_id="c", time=2.0, passes_to_accuracy=0.3),
        rec(trial_id="a", time=2.0, passes_to_accuracy=0.5),
        rec(trial_id="z", status="diverged"),
        rec(trial_id="y", status="diverged"),
    ]
    expected = ["c", "a", "b", "y", "z"]
    for perm in itertools.permutations(records):
        assert [r.trial_id for r in rank_trials(perm)] == expected


def test_empty_records():
    assert rank_trials([]) == [] and best_per_mechanism([]) == [] and confirm_summary([]) == []
    assert loss_ratios([], 16, 512) == []
    assert "no trials" in summary_markdown([])


# --------------------------------------------------------------------------- best pair and speedup


def test_best_pair_is_lowest_mean_time_and_speedup_is_ratio_of_best_times():
    rows = {r.mechanism: r for r in best_per_mechanism(_sweep())}
    base_t = statistics.mean([10.0, 12.0, 11.0])
    dc_t = statistics.mean([7.0, 8.0, 8.5])
    dc = rows["dc(p=0.4)"]
    assert (dc.step_size, dc.global_batch_size) == (0.2, 512)
    assert dc.time_to_accuracy_s == pytest.approx(dc_t)
    assert dc.time_std_s == pytest.approx(statistics.stdev([7.0, 8.0, 8.5]))
    assert dc.passes_to_accuracy == pytest.approx(statistics.mean([0.7, 0.8, 0.85]))
    assert dc.speedup == pytest.approx(base_t / dc_t)
    assert dc.speedup_pct == pytest.approx((base_t / dc_t - 1) * 100)
    assert dc.time_saved_frac == pytest.approx(1 - dc_t / base_t)
    assert (dc.n_seeds, dc.n_pairs_tried, dc.n_reached_pairs) == (3, 3, 2)
    assert rows["vanilla"].speedup == pytest.approx(1.0) and rows["vanilla"].time_saved_frac == pytest.approx(0.0)
    assert (rows["vanilla"].n_pairs_tried, rows["vanilla"].n_reached_pairs) == (3, 2)
    assert rows["sgld"].speedup == pytest.approx(base_t / statistics.mean([20.0, 21.0, 25.0]))


def test_rows_are_baseline_first_then_by_time():
    assert [r.mechanism for r in best_per_mechanism(_sweep())] == ["vanilla", "dc(p=0.4)", "sgld"]


@pytest.mark.parametrize("bad_seed", ["max_passes", "stopped_early", "diverged", "error"])
def test_pair_with_one_failed_seed_is_unreached(bad_seed):
    records = [*seeds("vanilla", 0.1, 256, [1.0, 1.0]), rec("vanilla", 0.1, 256, seed=2, status=bad_seed)]
    records += seeds("vanilla", 0.2, 256, [5.0, 6.0, 7.0])
    (pair_bad, _pair_ok) = sorted(pair_stats(records), key=lambda p: p.step_size)
    assert not pair_bad.reached and pair_bad.score == math.inf and pair_bad.n_reached == 2
    (row,) = best_per_mechanism(records)
    assert row.step_size == 0.2 and row.n_reached_pairs == 1
    assert row.time_to_accuracy_s == pytest.approx(statistics.mean([5.0, 6.0, 7.0]))


def test_brute_force_best_pair_on_random_sweeps():
    rng = np.random.default_rng(1)
    for _ in range(20):
        records = []
        for mech, step, batch in itertools.product(["vanilla", "m1", "m2"], [0.05, 0.1], [64, 128, 256]):
            times = [None if rng.random() < 0.2 else float(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 4)))]
            records += seeds(mech, step, batch, times)
        # Brute force: every pair's mean if all seeds reached, minimum with ties to smaller B then step size.
        scores = {}
        for r in records:
            scores.setdefault((r["mechanism"], r["global_batch_size"], r["step_size"]), []).append(
                r["time_to_accuracy_s"]
            )
        best = {}
        for (mech, batch, step), ts in sorted(scores.items()):
            score = statistics.mean(ts) if None not in ts else math.inf
            if score < best.get(mech, (math.inf,))[0]:
                best[mech] = (score, batch, step)
        rows = {r.mechanism: r for r in best_per_mechanism(records)}
        for mech, (score, batch, step) in best.items():
            assert (rows[mech].global_batch_size, rows[mech].step_size) == (batch, step)
            assert rows[mech].time_to_accuracy_s == pytest.approx(score)
            if "vanilla" in best:
                assert rows[mech].speedup == pytest.approx(best["vanilla"][0] / score)
            else:
                assert rows[mech].speedup is None


def test_ties_prefer_smaller_batch_then_smaller_step_regardless_of_order():
    pairs = [
        seeds("m", 0.2, 512, [4.0, 6.0]),
        seeds("m", 0.2, 256, [5.0, 5.0]),
        seeds("m", 0.1, 256, [6.0, 4.0]),
        seeds("m", 0.1, 1024, [5.0, 5.0]),
    ]
    for perm in itertools.permutations(pairs):
        (row,) = best_per_mechanism([r for pair in perm for r in reversed(pair)])
        assert (row.global_batch_size, row.step_size) == (256, 0.1)


def test_no_baseline_and_unreached_baseline_give_no_speedup():
    no_base = seeds("dc", 0.1, 256, [3.0, 4.0])
    (row,) = best_per_mechanism(no_base)
    assert row.speedup is None and row.time_saved_frac is None and row.speedup_pct is None
    rows = best_per_mechanism(no_base + seeds("vanilla", 0.1, 256, [None, 2.0]))
    assert [r.mechanism for r in rows] == ["vanilla", "dc"]
    assert rows[0].time_to_accuracy_s is None and all(r.speedup is None for r in rows)


def test_all_unreached_shows_closest_pair_as_not_reached():
    records = (
        seeds("vanilla", 0.1, 256, [None, None], acc=0.7)
        + seeds("vanilla", 0.2, 256, [None, None], acc=0.9)
        + [rec("vanilla", 0.4, 256, status="diverged", loss=math.nan, acc=math.nan)]
    )
    (row,) = best_per_mechanism(records)
    assert row.step_size == 0.2 and row.time_to_accuracy_s is None and row.n_reached_pairs == 0
    assert "not reached" in summary_markdown([row])


def test_single_seed_has_no_std():
    (row,) = best_per_mechanism([rec(time=3.0)])
    assert row.time_std_s is None and row.n_seeds == 1 and row.speedup == 1.0


def test_mixed_replications_need_a_choice():
    records = [rec(time=3.0, replication=1), rec(time=5.0, replication=4)]
    with pytest.raises(ValueError, match="replication"):
        best_per_mechanism(records)
    (row,) = best_per_mechanism(records, replication=4)
    assert row.time_to_accuracy_s == 5.0


def test_best_row_is_frozen():
    (row,) = best_per_mechanism([rec(time=1.0)])
    assert isinstance(row, BestRow)
    with pytest.raises(AttributeError):
        row.speedup = 2.0


# --------------------------------------------------------------------------- confirm phase


def test_confirm_summary_mean_std_reached_fraction_and_speedup():
    base, dc = [10.0, 12.0, 11.0, 13.0], [7.0, 9.0, 8.0]
    records = (
        seeds("vanilla", 0.1, 256, base)
        + seeds("dc", 0.2, 512, dc)
        + seeds("sgld", 0.1, 256, [5.0, None, 6.0], passes_to_accuracy=0.5)
    )
    rows = {r.mechanism: r for r in confirm_summary(records)}
    d = rows["dc"]
    assert d.time_mean_s == pytest.approx(statistics.mean(dc)) and d.time_std_s == pytest.approx(statistics.stdev(dc))
    assert d.passes_std == pytest.approx(statistics.stdev([t / 10 for t in dc]))
    assert d.speedup == pytest.approx(statistics.mean(base) / statistics.mean(dc))
    assert d.speedup_lo <= d.speedup <= d.speedup_hi and d.speedup_std > 0
    s = rows["sgld"]
    assert s.reached_frac == pytest.approx(2 / 3) and s.time_mean_s == pytest.approx(5.5) and s.speedup is None
    assert confirm_summary(records) == confirm_summary(records)  # fixed bootstrap seed


def test_bootstrap_spread_matches_exact_enumeration():
    num, den = [10.0, 12.0, 15.0], [6.0, 9.0, 7.0]
    # Exact bootstrap distribution: every resample (with replacement) of both sides, equally likely.
    exact = [
        statistics.mean(a) / statistics.mean(b)
        for a in itertools.product(num, repeat=3)
        for b in itertools.product(den, repeat=3)
    ]
    ratio, std, lo, hi = bootstrap_ratio(num, den, n_boot=20000, seed=3)
    assert ratio == pytest.approx(statistics.mean(num) / statistics.mean(den))
    assert std == pytest.approx(statistics.pstdev(exact), rel=0.05)
    assert lo == pytest.approx(np.percentile(exact, 2.5), rel=0.03)
    assert hi == pytest.approx(np.percentile(exact, 97.5), rel=0.03)


def test_bootstrap_of_constant_times_has_no_spread():
    assert bootstrap_ratio([4.0] * 3, [2.0] * 5)[1:] == (0.0, 2.0, 2.0)


def test_confirm_rows_baseline_first_then_best_pair_first_within_mechanism():
    rows = confirm_summary(_sweep())
    assert [(r.mechanism, r.step_size, r.global_batch_size) for r in rows] == [
        ("vanilla", 0.1, 256),
        ("vanilla", 0.2, 512),
        ("vanilla", 0.4, 1024),
        ("dc(p=0.4)", 0.2, 512),
        ("dc(p=0.4)", 0.1, 256),
        ("dc(p=0.4)", 0.4, 512),
        ("sgld", 0.1, 256),
    ]


# --------------------------------------------------------------------------- loss ratio


def test_loss_ratio_uses_each_batch_sizes_own_tuned_step_and_averages_seeds():
    small = {0.1: [0.30, 0.32, 0.31], 0.2: [0.35, 0.34, 0.36]}  # best step 0.1
    large = {0.1: [0.90, 0.95, 0.92], 0.4: [0.50, 0.60, 0.55], 0.8: [0.45, math.nan, 0.4]}  # best 0.4 (0.8 diverges)
    records = [_loss("vanilla", 16, g, s, x) for g, xs in small.items() for s, x in enumerate(xs)]
    records += [_loss("vanilla", 512, g, s, x) for g, xs in large.items() for s, x in enumerate(xs)]
    (row,) = loss_ratios(records, small_batch=16, large_batch=512)
    ratios = [lg / sm for lg, sm in zip(large[0.4], small[0.1], strict=True)]
    assert (row.small_step_size, row.large_step_size, row.n_seeds) == (0.1, 0.4, 3)
    assert row.ratio_mean == pytest.approx(statistics.mean(ratios))
    assert row.ratio_std == pytest.approx(statistics.stdev(ratios))
    assert row.passes == 5.0


def test_loss_ratio_per_replication_and_mechanism_pairs_seeds():
    records = []
    expected = {}
    for r, mech in itertools.product([1, 2, 4], ["vanilla", "dc"]):
        sm = {s: 0.2 + 0.01 * s for s in range(3)}
        lg = {s: 0.2 * r + 0.03 * s for s in range(1, 4)}  # seed 3 has no small partner, seed 0 no large one
        records += [_loss(mech, 16, 0.1, s, x, replication=r) for s, x in sm.items()]
        records += [_loss(mech, 512, 0.3, s, x, replication=r) for s, x in lg.items()]
        expected[(r, mech)] = [lg[s] / sm[s] for s in (1, 2)]
    rows = loss_ratios(records, 16, 512)
    assert [(r.mechanism, r.replication) for r in rows] == [
        ("vanilla", 1),
        ("vanilla", 2),
        ("vanilla", 4),
        ("dc", 1),
        ("dc", 2),
        ("dc", 4),
    ]
    for row in rows:
        assert row.n_seeds == 2
        assert row.ratio_mean == pytest.approx(statistics.mean(expected[(row.replication, row.mechanism)]))


def test_loss_ratio_side_without_finite_loss_is_none():
    records = [
        _loss("vanilla", 16, 0.1, 0, 0.3),
        _loss("vanilla", 512, 0.1, 0, math.nan),
        _loss("vanilla", 512, 0.2, 0, None),
    ]
    (row,) = loss_ratios(records, 16, 512)
    assert row.ratio_mean is None and row.large_step_size is None and row.n_seeds == 0


def test_loss_ratio_single_seed_has_no_std():
    (row,) = loss_ratios([_loss("vanilla", 16, 0.1, 0, 0.5), _loss("vanilla", 512, 0.1, 0, 1.0)], 16, 512)
    assert row.ratio_mean == pytest.approx(2.0) and row.ratio_std is None


def test_loss_ratio_passes_mismatch_raises_but_diverged_runs_may_stop_early():
    ok = [_loss("dc", 16, 0.1, 0, 0.5), _loss("dc", 512, 0.1, 0, 1.0), _loss("dc", 512, 0.9, 0, math.nan, passes=0.3)]
    assert loss_ratios(ok, 16, 512)[0].ratio_mean == pytest.approx(2.0)
    bad = [*ok, _loss("dc", 512, 0.2, 0, 1.1, passes=5.01)]
    with pytest.raises(ValueError, match=r"dc.*passes"):
        loss_ratios(bad, 16, 512)
    assert loss_ratios(bad, 16, 512, passes_tol=0.02)[0].n_seeds == 1
