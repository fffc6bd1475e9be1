"""Sweep results as text: the markdown summary and confirm tables, and the summary and trials CSVs.

Pure functions over ``tuning.stats`` rows and trial records; ``tuning.report`` writes and logs them.
Tests: ``pytest tests/test_tables.py``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from raygd.records import TrialRecord
from tuning.stats import BestRow, ConfirmRow, rank_trials


def _fmt(x: float | None, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def summary_markdown(best_rows: Sequence[BestRow], target_accuracy: float | None = None) -> str:
    """A markdown table of ``best_per_mechanism`` rows ('not reached' where there is no time).

    Args:
        best_rows: the rows.
        target_accuracy: shown in the title when given (e.g. 0.95).
    Returns:
        The markdown text, ending in a newline.
    """
    target = f" {target_accuracy:.4g} training accuracy" if target_accuracy is not None else " the target accuracy"
    lines = [
        f"Fastest (step size, batch size) per mechanism: time to{target}, mean ± std over seeds.",
        "",
        "| mechanism | step size | B | time to acc (s) | passes | speedup vs vanilla | time saved | seeds "
        "| pairs reached/tried |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in best_rows:
        time = (
            "not reached"
            if r.time_to_accuracy_s is None
            else (f"{r.time_to_accuracy_s:.4g}" + (f" ± {r.time_std_s:.2g}" if r.time_std_s is not None else ""))
        )
        speed = "–" if r.speedup is None else f"{r.speedup:.2f}× ({r.speedup_pct:+.0f}%)"
        lines.append(
            f"| {r.mechanism} | {r.step_size:g} | {r.global_batch_size} | {time} "
            f"| {_fmt(r.passes_to_accuracy, '.3g')} | {speed} | {_fmt(r.time_saved_frac, '.1%')} "
            f"| {r.n_seeds} | {r.n_reached_pairs}/{r.n_pairs_tried} |"
        )
    if not best_rows:
        lines.append("| (no trials) | | | | | | | | |")
    return "\n".join(lines) + "\n"


def summary_text(best_rows: Sequence[BestRow], target_accuracy: float | None = None) -> str:
    """The table for the terminal: the same markdown, which reads fine as plain text."""
    return summary_markdown(best_rows, target_accuracy)


def confirm_markdown(rows: Sequence[ConfirmRow]) -> str:
    """The confirm phase as a table: mean ± std over fresh seeds, speedup with its bootstrap spread."""

    def pm(mean, std, fmt):
        return "–" if mean is None else f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")

    lines = [
        "Confirmed with fresh seeds (mean ± std over seeds; speedup = ratio of mean times, bootstrap std):",
        "",
        "| mechanism | step size | B | seeds | reached | time to acc (s) | passes | speedup vs vanilla |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mechanism} | {r.step_size:g} | {r.global_batch_size} | {r.n_seeds} | "
            f"{r.reached_frac:.0%} | {pm(r.time_mean_s, r.time_std_s, '.3g')} | "
            f"{pm(r.passes_mean, r.passes_std, '.3g')} | {pm(r.speedup, r.speedup_std, '.2f')} |"
        )
    return "\n".join(lines)


def _write_csv(rows: list[dict[str, Any]], columns: list[str], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def write_summary_csv(best_rows: Sequence[BestRow], path: str | Path) -> Path:
    """Write the rows (``BestRow.as_dict``; None as '') to a CSV file; returns its path."""
    columns = [f.name for f in fields(BestRow)] + ["speedup_pct"]
    return _write_csv([r.as_dict() for r in best_rows], columns, path)


def write_trials_csv(records: Iterable[TrialRecord | Mapping[str, Any]], path: str | Path) -> Path:
    """Write every trial, ranked (``rank_trials``), to a CSV that ``TrialRecord.from_dict`` reads back."""
    columns = [f.name for f in fields(TrialRecord)]
    return _write_csv([asdict(r) for r in rank_trials(records)], columns, path)
