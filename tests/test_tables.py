"""Tests for tuning/tables.py: the summary markdown, the summary and trials CSVs."""

from __future__ import annotations

import csv
import math

from raygd.records import TrialRecord
from tests.trials import rec, seeds
from tests.trials import sweep_records as _sweep
from tuning.stats import best_per_mechanism, rank_trials
from tuning.tables import summary_markdown, summary_text, write_summary_csv, write_trials_csv


def test_summary_markdown_has_one_row_per_mechanism_and_formats():
    rows = best_per_mechanism(_sweep() + seeds("never", 0.1, 64, [None]))
    md = summary_markdown(rows, target_accuracy=0.95)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "mechanism" not in ln]
    assert [ln.split("|")[1].strip() for ln in lines] == [r.mechanism for r in rows]
    assert "0.95" in md and "not reached" in lines[-1]
    dc = next(r for r in rows if r.mechanism == "dc(p=0.4)")
    assert f"{dc.speedup:.2f}×" in md and f"{dc.time_saved_frac:.1%}" in md
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
