"""Tests for tuning/tables.py: the summary markdown, the summary and trials CSVs."""

from __future__ import annotations

import csv
import math

import pytest

from raygd.records import TrialRecord
from tests.trials import rec, seeds
from tests.trials import sweep_records as _sweep
from tuning.stats import best_per_mechanism, every_pair, rank_trials
from tuning.tables import (
    pairs_markdown,
    summary_markdown,
    summary_text,
    write_pairs_csv,
    write_summary_csv,
    write_trials_csv,
)


def test_summary_markdown_has_one_row_per_mechanism_and_formats():
    rows = best_per_mechanism(_sweep() + seeds("never", 0.1, 64, [None]))
    md = summary_markdown(rows, target="train accuracy >= 0.95")
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "mechanism" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == [r.mechanism for r in rows]
    assert "0.95" in md and "not reached" in lines[-1]
    dc = next(r for r in rows if r.mechanism == "dc(p=0.4)")
    assert f"{dc.speedup:.2f}× ({dc.speedup_pct:+.0f}%)" in md
    assert summary_text(rows) == summary_markdown(rows)


def test_summary_csv_round_trip(tmp_path):
    rows = best_per_mechanism(_sweep() + seeds("never", 0.1, 64, [None]))
    path = write_summary_csv(rows, tmp_path / "out" / "summary.csv")
    with path.open() as f:
        back = list(csv.DictReader(f))
    assert len(back) == len(rows)
    for row, got in zip(rows, back, strict=True):
        for name, value in row.as_dict().items():
            if value is None:
                assert got[name] == ""
            elif isinstance(value, (int, float)):
                assert float(got[name]) == value, name
            else:
                assert got[name] == value, name
        assert tuple(got["trial_ids"].split(";")) == row.trial_ids


def test_trials_csv_round_trip(tmp_path):
    records = [*_sweep(), rec("dc", status="diverged", loss=math.nan), rec("dc", status="error", loss=None)]
    path = write_trials_csv(records, tmp_path / "trials.csv")
    with path.open() as f:
        back = [TrialRecord.from_dict(d) for d in csv.DictReader(f)]

    def same(a, b):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    for want, got in zip(rank_trials(records), back, strict=True):
        assert all(same(getattr(want, k), getattr(got, k)) for k in want.__dataclass_fields__), (want, got)


def test_trials_csv_names_a_failure_failed_also_for_a_legacy_error_record(tmp_path):
    path = write_trials_csv(
        [rec(trial_id="old", status="error"), rec(trial_id="new", status="failed")], tmp_path / "trials.csv"
    )
    with path.open() as f:
        assert {d["trial_id"]: d["status"] for d in csv.DictReader(f)} == {"old": "failed", "new": "failed"}


def test_bound_columns_and_the_batch_table():
    from tuning.stats import per_batch
    from tuning.tables import batch_markdown

    bound = {"batch_bound_w0": 800.0, "batch_bound_w0_se": 30.0, "batch_bound_median": 400.0}
    records = [
        *seeds("vanilla", 0.1, 64, [10.0, 12.0], generalization_gap_at_target=0.02, eval_resolution_passes=0.05),
        *seeds("vanilla", 0.2, 64, [14.0, 13.0], generalization_gap_at_target=0.01),
        *seeds("dc", 0.1, 256, [6.0, 8.0], bound_of="surrogate", generalization_gap_at_target=0.04, **bound),
        *seeds("sgld", 0.1, 256, [9.0, 8.0], bound_of="plain_gradient", batch_bound_w0=100.0),
    ]
    rows = best_per_mechanism(records)
    dc = next(r for r in rows if r.mechanism == "dc")
    # two seeds with se 30 each: √(30² + 30²) / 2
    assert dc.batch_bound_w0 == 800.0 and dc.batch_bound_w0_se == pytest.approx(30 / 2**0.5)
    assert dc.batch_over_bound == 256 / 800
    md = summary_markdown(rows)
    assert "| 800 ± 21 | 400 | 0.32 |" in md and "| 100* | – | 2.6 |" in md and "*: the plain gradient" in md
    by_b = per_batch(records)
    assert [(r.mechanism, r.global_batch_size, r.step_size) for r in by_b] == [
        ("vanilla", 64, 0.1),
        ("dc", 256, 0.1),
        ("sgld", 256, 0.1),
    ]
    assert by_b[0].step_edge == "low" and by_b[0].generalization_gap_at_target == pytest.approx(0.02)
    text = batch_markdown(by_b)
    assert "| vanilla | 64 | 0.1↓ | 11 ± 1.4 | 1.1 | 0.05 | +0.020 | 2 |" in text


def test_every_pair_against_the_records_by_hand(tmp_path):
    records = _sweep()
    records += [rec("vanilla", 0.4, 1024, seed=3, status="diverged", loss=math.nan, acc=math.nan)]
    records += [rec("dc(p=0.4)", 0.4, 512, seed=5, time=4.0, generalization_gap_at_target=0.03, passes=2.0)]
    rows = every_pair(records)
    by_pair: dict[tuple, list[dict]] = {}
    for r in records:
        by_pair.setdefault((r["mechanism"], r["step_size"], r["global_batch_size"]), []).append(r)
    assert [(r.mechanism, r.step_size, r.global_batch_size) for r in rows] == sorted(
        by_pair, key=lambda k: (k[0] != "vanilla", k[0], k[2], k[1])
    )
    for row in rows:
        mine = by_pair[(row.mechanism, row.step_size, row.global_batch_size)]
        times = [r["time_to_accuracy_s"] for r in mine if r["status"] == "reached_target"]
        assert (row.n_seeds, row.n_reached) == (len(mine), len(times))
        if times:
            mean = sum(times) / len(times)
            assert row.time_mean_s == pytest.approx(mean)
            if len(times) > 1:
                assert row.time_std_s == pytest.approx(
                    math.sqrt(sum((t - mean) ** 2 for t in times) / (len(times) - 1))
                )
        else:
            assert row.time_mean_s is None and row.passes_mean is None and row.gap_mean is None
        per_pass = sorted(r["train_time_s"] / r["passes"] for r in mine)
        k = len(per_pass)
        median = per_pass[k // 2] if k % 2 else (per_pass[k // 2 - 1] + per_pass[k // 2]) / 2
        assert row.seconds_per_pass == pytest.approx(median)
    dc = next(r for r in rows if (r.mechanism, r.step_size, r.global_batch_size) == ("dc(p=0.4)", 0.4, 512))
    assert (dc.n_reached, dc.n_seeds, dc.gap_mean) == (3, 4, pytest.approx(0.03))
    assert dc.unreached == "1 max_passes; acc 0.80"
    never = next(r for r in rows if r.global_batch_size == 1024)
    assert never.unreached == "1 diverged, 3 max_passes; acc 0.80"  # a diverged seed has no accuracy to show
    close = every_pair([rec("m", 0.1, 64, seed=s, acc=a) for s, a in enumerate((0.781, 0.784))])
    assert close[0].unreached == "2 max_passes; acc 0.78"  # no "0.78–0.78"
    md = pairs_markdown(rows)
    assert len([ln for ln in md.splitlines() if ln.startswith("| ") and "mechanism" not in ln]) == len(rows)
    assert "| vanilla | 1024 | 0.4 | 0/4 | – | – |" in md
    with write_pairs_csv(rows, tmp_path / "pairs.csv").open() as f:
        back = list(csv.DictReader(f))
    assert [b["time_mean_s"] for b in back] == ["" if r.time_mean_s is None else str(r.time_mean_s) for r in rows]
