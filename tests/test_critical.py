"""Tests for raygd/critical.py (and its table and figure): the critical batch size fitted from synthetic sweeps
drawn from McCandlish et al.'s model with a known B_crit and noise, its bootstrap interval's coverage, the tuned
step size at each B, edge-won step sizes, refusals, Zhang et al.'s B_opt, and ``fastest_batch`` (raygd project).
Pure: records are built directly, no Ray, no MLflow."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from raygd.critical import (
    EDGE_HIGH,
    EDGE_LOW,
    MIN_BATCHES,
    BatchPoint,
    critical_batch,
    fastest_batch,
    fit_line,
    resampled_means,
    tuned_points,
    zhang_b_opt,
)
from raygd.records import TrialRecord
from tuning.figures import plot_critical_batch
from tuning.report import _critical_metrics
from tuning.tables import critical_markdown, write_critical_csv

BATCHES = (16, 32, 64, 128, 256, 512, 1024)
STEPS = (0.1, 0.2, 0.4)


def _record(i, mech, step, batch, seed, updates, status="reached_target", **kw) -> TrialRecord:
    reached = status == "reached_target"
    return TrialRecord(
        trial_id=f"t{i}",
        mechanism=mech,
        step_size=step,
        global_batch_size=batch,
        status=status,
        seed=seed,
        time_to_accuracy_s=float(updates) if reached else None,
        updates_to_accuracy=int(updates) if reached else None,
        **kw,
    )


def _sweep(
    rng,
    b_crit=100.0,
    s_min=100.0,
    cv=0.1,
    seeds=3,
    batches=BATCHES,
    best_step=None,
    mech="vanilla",
    worse=1.5,
    **kw,
) -> list[TrialRecord]:
    """A grid of γ × B × seeds drawn from S(B) = S_min(1 + B_crit/B): at each B the middle γ (or ``best_step[B]``)
    needs S(B) updates, the others ``worse`` × as many; each seed's updates are lognormal with that CV."""
    records = []
    for b in batches:
        s = s_min * (1 + b_crit / b)
        best = (best_step or {}).get(b, STEPS[1])
        for step in STEPS:
            for seed in range(seeds):
                u = max(1, round(s * (1.0 if step == best else worse) * rng.lognormal(0.0, cv)))
                records.append(_record(len(records), mech, step, b, seed, u, **kw))
    return records


# --------------------------------------------------------------------------- the estimate


def test_noiseless_sweep_gives_the_model_back_exactly():
    (fit,) = critical_batch(_sweep(np.random.default_rng(0), b_crit=80.0, s_min=1000.0, cv=0.0))
    assert fit.fitted and fit.b_crit == pytest.approx(80.0, rel=2e-3)  # updates are rounded to integers
    assert fit.s_min == pytest.approx(1000.0, rel=2e-3) and fit.e_min == pytest.approx(80_000.0, rel=2e-3)
    assert max(abs(r) for r in fit.residuals) < 1e-3 and fit.b_crit_low <= fit.b_crit <= fit.b_crit_high
    assert [p.step_size for p in fit.points] == [STEPS[1]] * len(BATCHES) and not fit.edge_batches


@pytest.mark.parametrize("b_crit", [40.0, 200.0])
def test_error_and_coverage_over_200_synthetic_sweeps(b_crit):
    """3 seeds, 10% noise per trial: the median relative error ≤ 10% and the 95% interval covers the true
    B_crit in 90–99% of 200 draws."""
    rng = np.random.default_rng(2024)
    errors, covered = [], 0
    for _ in range(200):
        (fit,) = critical_batch(_sweep(rng, b_crit=b_crit, cv=0.1), n_boot=1000)
        errors.append(abs(fit.b_crit / b_crit - 1.0))
        covered += fit.b_crit_low <= b_crit <= fit.b_crit_high
    assert statistics.median(errors) <= 0.10
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_fit_line_is_weighted_least_squares_in_one_over_b():
    """With weights k/S², the closed form matches numpy's weighted least squares of the same line."""
    x = 1.0 / np.array(BATCHES, float)
    y = 50.0 * (1 + 64.0 * x) * np.array([1.05, 0.97, 1.02, 0.99, 1.03, 0.96, 1.01])
    k = np.array([3, 3, 2, 3, 3, 3, 1], float)
    a, c = fit_line(x, y, k, rounds=1)
    w = np.sqrt(k) / y
    ref = np.linalg.lstsq(np.stack([w, w * x], axis=1), w * y, rcond=None)[0]
    assert (float(a), float(c)) == pytest.approx(tuple(ref))
    a_many, c_many = fit_line(x, np.stack([y, 2 * y]), k)  # resamples fitted at once
    assert a_many.shape == (2,) and c_many[1] == pytest.approx(2 * c_many[0])


def test_resampled_means_have_the_variance_of_a_mean():
    """The k/(k−1) correction: the bootstrap variance of a mean of k seeds is s²/k, not (k−1)/k · s²/k."""
    values = [10.0, 12.0, 17.0]
    boot = resampled_means(values, 200_000, np.random.default_rng(0))
    assert boot.mean() == pytest.approx(13.0, abs=0.02)
    assert boot.var() == pytest.approx(statistics.variance(values) / 3, rel=0.02)
    assert set(resampled_means([4.0], 10, np.random.default_rng(0))) == {4.0}


# --------------------------------------------------------------------------- tuned step, edges, refusals


def test_tuned_step_is_the_fewest_mean_updates_with_every_seed_reaching():
    trials = [
        _record(0, "v", 0.1, 64, 0, 300),
        _record(1, "v", 0.1, 64, 1, 320),
        _record(2, "v", 0.2, 64, 0, 200),
        _record(3, "v", 0.2, 64, 1, 220),
        _record(4, "v", 0.4, 64, 0, 100),  # fewer updates, but its seed 1 did not reach
        _record(5, "v", 0.4, 64, 1, 0, status="diverged"),
        _record(6, "v", 0.1, 128, 0, 0, status="max_passes"),
    ]
    points, unreached = tuned_points(trials)
    assert [(p.global_batch_size, p.step_size, p.updates) for p in points] == [(64, 0.2, (200.0, 220.0))]
    assert points[0].step_edge is None and unreached == [128]
    assert points[0].candidates == ((200.0, 220.0), (300.0, 320.0))


def test_an_edge_won_step_at_one_batch_size_is_marked():
    rng = np.random.default_rng(1)
    records = _sweep(rng, best_step={512: STEPS[-1], 16: STEPS[0]})
    (fit,) = critical_batch(records)
    sides = {p.global_batch_size: p.step_edge for p in fit.points}
    assert sides[512] == EDGE_HIGH and sides[16] == EDGE_LOW and fit.edge_batches == (16, 512)
    assert all(sides[b] is None for b in BATCHES if b not in (16, 512))
    table = critical_markdown([fit])
    assert "B 16↓, 32, 64, 128, 256, 512↑, 1024" in table and "untrustworthy" in table
    assert fit.as_dict()["edge_batches"] == "16;512"


def test_one_step_size_at_a_batch_size_is_not_an_edge():
    points, _ = tuned_points([_record(0, "v", 0.1, 64, 0, 100)])
    assert points[0].step_edge is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("three_batches", "3 batch sizes reached the target at a tuned step: the fit needs 4 or more"),
        ("flat", "updates do not fall with B"),
        ("rising", "updates do not fall with B"),
        ("perfect_scaling", "B_crit is beyond the largest B tried"),
        ("unreached", "0 batch sizes reached"),
    ],
)
def test_refusals_say_why(case, reason):
    rng = np.random.default_rng(3)
    records = {
        "three_batches": _sweep(rng, batches=(16, 64, 256)),
        "flat": _sweep(rng, b_crit=0.0, cv=0.0),
        "rising": [_record(i, "v", 0.1, b, 0, 100 + b) for i, b in enumerate(BATCHES)],
        "perfect_scaling": [_record(i, "v", 0.1, b, 0, round(1e5 / b) - 5) for i, b in enumerate(BATCHES)],
        "unreached": [_record(i, "v", 0.1, b, 0, 0, status="max_passes") for i, b in enumerate(BATCHES)],
    }[case]
    (fit,) = critical_batch(records)
    assert not fit.fitted and reason in (fit.refused or "")
    assert fit.b_crit is None and fit.b_crit_low is None
    row = critical_markdown([fit]).splitlines()[4]
    assert row.startswith("| v | – |") or row.startswith("| vanilla | – |")
    assert f"**not fitted**: {fit.refused}" in row
    assert not any(k.startswith("critical_batch/") and not k.endswith("_b_opt") for k in _critical_metrics([fit]))


def test_min_batches_is_four():
    rng = np.random.default_rng(4)
    assert MIN_BATCHES == 4 and critical_batch(_sweep(rng, batches=(16, 64, 256, 1024)))[0].fitted


def test_b_opt_is_zhangs_twenty_percent_over_linear_scaling():
    """Under the model S(B)·B / (S(B_0)·B_0) = (B + B_crit)/(B_0 + B_crit): within 1.2 up to 1.2·B_0 + 0.2·B_crit."""
    batches = [16 * k for k in range(1, 40)]
    points = [BatchPoint(b, 0.1, (1000 * (1 + 200 / b),), None) for b in batches]
    assert zhang_b_opt(points) == max(b for b in batches if b <= 1.2 * 16 + 0.2 * 200)  # 48
    assert zhang_b_opt([]) is None


# --------------------------------------------------------------------------- several mechanisms, bound, outputs


def test_several_mechanisms_with_the_bound_beside(tmp_path):
    rng = np.random.default_rng(5)
    records = _sweep(rng, b_crit=60.0, batch_bound_w0=25.0, batch_bound_median=18.0)
    records += _sweep(rng, b_crit=240.0, mech="dropconnect(p=0.4)", batch_bound_w0=80.0)
    records = [TrialRecord(**{**r.__dict__, "trial_id": f"x{i}"}) for i, r in enumerate(records)]
    fits = critical_batch(records)
    assert [f.mechanism for f in fits] == ["vanilla", "dropconnect(p=0.4)"]
    vanilla, dc = fits
    assert vanilla.batch_bound_w0 == 25.0 and vanilla.noise_scale == 24.0 and vanilla.batch_bound_median == 18.0
    assert vanilla.over_bound(vanilla.b_crit) == pytest.approx(vanilla.b_crit / 25.0)
    assert dc.b_crit > 2 * vanilla.b_crit
    table = critical_markdown(fits)
    header = table.splitlines()[2]
    assert "| B_crit |" in header and "B_D at w0" in header and "B_crit / B_D" in header
    cell = f"| vanilla | {float(f'{vanilla.b_crit:.3g}'):g} ({float(f'{vanilla.b_crit_low:.3g}'):g}–"
    assert cell in table
    metrics = _critical_metrics(fits)
    assert metrics["critical_batch/vanilla"] == vanilla.b_crit
    assert metrics["critical_batch/vanilla_low"] == vanilla.b_crit_low
    assert metrics["critical_batch/dropconnect_p0.4_high"] == dc.b_crit_high
    assert metrics["critical_batch/vanilla_over_bound"] == pytest.approx(vanilla.b_crit / 25.0)
    csv = write_critical_csv(fits, tmp_path / "critical.csv").read_text()
    assert csv.splitlines()[0].startswith("mechanism,replication,b_crit,b_crit_low,b_crit_high")
    png = plot_critical_batch([*fits, critical_batch(records[:3])[0]], tmp_path / "critical_batch.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replication_factors_are_fitted_apart():
    rng = np.random.default_rng(6)
    records = _sweep(rng, b_crit=50.0) + _sweep(rng, b_crit=300.0, replication=4)
    records = [TrialRecord(**{**r.__dict__, "trial_id": f"x{i}"}) for i, r in enumerate(records)]
    fits = critical_batch(records)
    assert [(f.mechanism, f.replication) for f in fits] == [("vanilla", 1), ("vanilla", 4)]
    assert fits[0].b_crit < fits[1].b_crit and critical_batch(records, replication=4)[0].replication == 4
    assert "vanilla (r=4)" in critical_markdown(fits)
    assert "critical_batch/vanilla_r4" in _critical_metrics(fits)


def test_an_infinite_upper_end_is_written_as_infinity():
    """Noisy points near perfect scaling: some resamples have S_min ≤ 0, so the interval's top is ∞ (in the table;
    the metric is left out, MLflow keeps finite values)."""
    seeds = [(b, s) for b in (16, 32, 64, 128) for s in (0, 1)]
    records = [_record(i, "v", 0.1, b, s, round(1e4 / b * (1.3 if s else 0.75)) + 40) for i, (b, s) in enumerate(seeds)]
    (fit,) = critical_batch(records)
    assert fit.fitted and math.isfinite(fit.b_crit or math.nan) and math.isinf(fit.b_crit_high or 0)
    assert f"({float(f'{fit.b_crit_low:.3g}'):g}–∞)" in critical_markdown([fit])
    metrics = _critical_metrics([fit])
    assert "critical_batch/v" in metrics and "critical_batch/v_high" not in metrics


# --------------------------------------------------------------------------- raygd project: the fastest B


def test_fastest_batch_is_the_argmin_with_its_interval_over_seeds():
    times = {(0.1, 64): [10.0, 11.0], (0.2, 64): [9.0, 9.5], (0.1, 128): [5.0, 5.2], (0.1, 256): [8.0, 8.4]}
    assert fastest_batch(times) == (128, 128, 128)  # clear winner: every resample agrees
    close = {(0.1, 64): [5.2, 6.2, 5.7], (0.1, 128): [5.4, 5.6, 5.5], (0.1, 256): [9.0, 9.0, 9.0]}
    best, low, high = fastest_batch(close)
    assert best == 128 and (low, high) == (64, 128)
    assert fastest_batch({(0.1, 64): [3.0], (0.1, 128): [2.0]}) == (128, None, None)
    with pytest.raises(ValueError):
        fastest_batch({})


def test_a_tie_in_updates_goes_to_the_inner_step_size():
    """Updates are counted at evaluations, so ties happen: a tie with an inner γ is not an edge-won point."""
    trials = [
        _record(i, "v", g, 32, s, u)
        for i, (g, s, u) in enumerate(
            [(0.025, 0, 170), (0.025, 1, 100), (0.05, 0, 170), (0.05, 1, 100), (0.1, 0, 310), (0.1, 1, 255)]
        )
    ]
    (point,), _ = tuned_points(trials)
    assert (point.step_size, point.step_edge) == (0.05, None)
