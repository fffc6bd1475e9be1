"""Sweep results as text: the markdown summary, confirm and critical-batch tables, and the CSVs.

Pure functions over ``tuning.stats`` rows and trial records; ``tuning.report`` writes and logs them.
Tests: ``pytest tests/test_tables.py``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from raygd.critical import CriticalFit
from raygd.records import TrialRecord
from tuning.confirm import ConfirmRow
from tuning.stats import BASELINE, EDGE_HIGH, EDGE_LOW, BatchRow, BestRow, PairRow, rank_trials

PLAIN_GRADIENT = "plain_gradient"
"""``raygd.records.BOUND_OF_TAG`` value: the B_D shown is the plain gradient's, not the mechanism's surrogate's."""


def _fmt(x: float | None, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


MARKS = {EDGE_LOW: "↓", EDGE_HIGH: "↑"}
"""How the tables mark a winner on the smallest (↓) or largest (↑) value searched on an axis."""


def _edge(value: str, edge: str | None) -> str:
    return value + MARKS.get(edge or "", "")


def _speedup_cell(r: BestRow) -> str:
    if r.speedup is None:
        return "–"
    cell = f"{r.speedup:.2f}× ({r.speedup_pct:+.0f}%)"
    if r.speedup_lo is not None and r.speedup_hi is not None:
        cell += f" [{r.speedup_lo:.2f}–{r.speedup_hi:.2f}]" + ("" if r.significant else " n.s.")
    return cell


def _bound_cells(r: BestRow) -> tuple[str, str, str]:
    """B_D at w0 (± its standard error when Monte Carlo; * when it is the plain gradient's), along training, B/B_D."""
    w0 = "–"
    if r.batch_bound_w0 is not None:
        w0 = f"{r.batch_bound_w0:.3g}"
        if r.batch_bound_w0_se:
            w0 += f" ± {r.batch_bound_w0_se:.2g}"
        if r.bound_of == PLAIN_GRADIENT:
            w0 += "*"
    ratio = r.batch_over_bound
    return w0, _fmt(r.batch_bound_median, ".3g"), "–" if ratio is None else f"{ratio:.2g}"


def summary_markdown(best_rows: Sequence[BestRow], target: str | None = None, extensions: str = "") -> str:
    """A markdown table of ``best_per_mechanism`` rows ('not reached' where there is no time), with the
    diversity bound B_D beside the best B, grid-edge marks and the notes that explain them.

    Args:
        best_rows: the rows.
        target: the sweep's target as ``TrainConfig.target_label`` gives it (``train loss <= 1.5``), in the title.
        extensions: ``tuning.edges.describe_extensions`` of the sweep ('' when nothing was extended).
    Returns:
        The markdown text, ending in a newline.
    """
    lines = [
        f"Fastest (step size, batch size) per mechanism: time to {target or 'the target'}, mean ± std over seeds.",
        "",
        "| mechanism | step size | B | time to target (s) | passes | speedup vs vanilla | B_D at w0 "
        "| B_D training | B / B_D | seeds | pairs reached/tried |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in best_rows:
        time = (
            "not reached"
            if r.time_to_accuracy_s is None
            else (f"{r.time_to_accuracy_s:.4g}" + (f" ± {r.time_std_s:.2g}" if r.time_std_s is not None else ""))
        )
        w0, median, ratio = _bound_cells(r)
        step, batch = _edge(f"{r.step_size:g}", r.step_edge), _batch_cell(r)
        lines.append(
            f"| {r.mechanism} | {step} | {batch} "
            f"| {time} | {_fmt(r.passes_to_accuracy, '.3g')} | {_speedup_cell(r)} | {w0} | {median} | {ratio} "
            f"| {r.n_seeds} | {r.n_reached_pairs}/{r.n_pairs_tried} |"
        )
    if not best_rows:
        lines.append("| (no trials) | | | | | | | | | | |")
    lines += _notes(best_rows, extensions)
    return "\n".join(lines) + "\n"


def _batch_cell(r: BestRow) -> str:
    """B, or for an adaptive batch policy its mean B over the run and where it started: ``B̄ 210 (from 32)``."""
    if r.batch_policy == "fixed":
        return _edge(str(r.global_batch_size), r.batch_edge)
    return f"B̄ {_fmt(r.mean_batch_size, '.0f')} (from {r.global_batch_size})"


def _notes(best_rows: Sequence[BestRow], extensions: str) -> list[str]:
    """The footnotes a row needs: the bound, edge marks, extensions, significance, plain-gradient bounds."""
    notes = [
        "B_D = nΔ_D: the batch size up to which SGD keeps serial SGD's progress per gradient (paper Thm 3), "
        "at the initial weights and median along training; B / B_D > 1: the winner is past it."
    ]
    if any(r.step_edge or r.batch_edge for r in best_rows):
        notes.append(
            "↑/↓: the winner is the largest/smallest value searched on that axis; the best may lie beyond "
            "(sweep.extend_edges)."
        )
    if extensions:
        notes.append("Grid edges extended: " + extensions.replace("\n", "; ") + ".")
    if any(r.significant is False for r in best_rows):
        notes.append("n.s.: the speedup's 95% bootstrap interval over seeds covers 1.0× (not significant).")
    if any(r.batch_policy != "fixed" for r in best_rows):
        notes.append(
            "mechanism: policy: B set along training by that batch policy (raygd.batch_schedule), its step size "
            "tuned, no B to tune; B̄: its mean B; the speedup is over the best fixed B."
        )
    if any(r.bound_of == PLAIN_GRADIENT for r in best_rows):
        notes.append("*: the plain gradient's B_D; the mechanism's surrogate diversity is not estimated.")
    return ["", *notes]


def batch_markdown(rows: Sequence[BatchRow]) -> str:
    """Per mechanism and B, the best step size there: time, passes, evaluation resolution and the
    generalization gap (train − test accuracy) at the target."""
    lines = [
        "Per batch size (best step size at each B; gap = train − test accuracy at the target):",
        "",
        "| mechanism | B | step size | time to target (s) | passes | resolution (passes) | gap at target | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        time = "not reached" if r.time_to_accuracy_s is None else f"{r.time_to_accuracy_s:.3g}"
        if r.time_std_s is not None:
            time += f" ± {r.time_std_s:.2g}"
        lines.append(
            f"| {r.mechanism} | {r.global_batch_size} | {_edge(f'{r.step_size:g}', r.step_edge)} | {time} "
            f"| {_fmt(r.passes_to_accuracy, '.3g')} | {_fmt(r.eval_resolution_passes, '.2g')} "
            f"| {_fmt(r.generalization_gap_at_target, '+.3f')} | {r.n_seeds} |"
        )
    return "\n".join(lines) + "\n"


def pairs_markdown(rows: Sequence[PairRow]) -> str:
    """Every (mechanism, γ, B) pair: seeds reached, time and passes to the target (mean ± std over the
    seeds that reached), training seconds per pass, B_D, the gap at the target, and how the others ended."""
    lines = [
        "Every pair (mean ± std over the seeds that reached the target; s/pass: median over all seeds):",
        "",
        "| mechanism | B | step size | reached | time to target (s) | passes | s/pass | B_D at w0 | B_D training "
        "| gap at target | not reached |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def pm(mean: float | None, std: float | None) -> str:
        return "–" if mean is None else f"{mean:.3g}" + ("" if std is None else f" ± {std:.2g}")

    for r in rows:
        lines.append(
            f"| {r.mechanism} | {r.global_batch_size} | {r.step_size:g} | {r.n_reached}/{r.n_seeds} "
            f"| {pm(r.time_mean_s, r.time_std_s)} | {pm(r.passes_mean, r.passes_std)} "
            f"| {_fmt(r.seconds_per_pass, '.3g')} "
            f"| {_fmt(r.batch_bound_w0, '.3g')} | {_fmt(r.batch_bound_median, '.3g')} | {_fmt(r.gap_mean, '+.3f')} "
            f"| {r.unreached} |"
        )
    return "\n".join(lines) + "\n"


def write_pairs_csv(rows: Sequence[PairRow], path: str | Path) -> Path:
    """Write ``every_pair`` rows (None as '') to a CSV file; returns its path."""
    return _write_csv([asdict(r) for r in rows], [f.name for f in fields(PairRow)], path)


def summary_text(best_rows: Sequence[BestRow], target: str | None = None, extensions: str = "") -> str:
    """The table for the terminal: the same markdown, which reads fine as plain text."""
    return summary_markdown(best_rows, target, extensions)


def confirm_markdown(rows: Sequence[ConfirmRow]) -> str:
    """The confirm phase as a table: mean ± std over fresh seeds, speedup with its bootstrap spread."""

    def pm(mean, std, fmt):
        return "–" if mean is None else f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")

    lines = [
        "Confirmed with fresh seeds (mean ± std over seeds; speedup = ratio of mean times, ± bootstrap std "
        "[95% interval]; n.s.: the interval covers 1.0×):",
        "",
        "| mechanism | step size | B | seeds | reached | time to target (s) | passes | speedup vs vanilla |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mechanism} | {r.step_size:g} | {r.global_batch_size} | {r.n_seeds} | "
            f"{r.reached_frac:.0%} | {pm(r.time_mean_s, r.time_std_s, '.3g')} | "
            f"{pm(r.passes_mean, r.passes_std, '.3g')} | {pm(r.speedup, r.speedup_std, '.2f')}{_interval(r)} |"
        )
    return "\n".join(lines)


def _interval(r: ConfirmRow) -> str:
    if r.speedup_lo is None or r.speedup_hi is None or r.mechanism == BASELINE:
        return ""
    covers = r.speedup_lo <= 1.0 <= r.speedup_hi
    return f" [{r.speedup_lo:.2f}–{r.speedup_hi:.2f}]" + (" n.s." if covers else "")


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
    columns = [f.name for f in fields(BestRow)] + ["speedup_pct", "batch_over_bound", "significant"]
    return _write_csv([r.as_dict() for r in best_rows], columns, path)


def write_trials_csv(records: Iterable[TrialRecord | Mapping[str, Any]], path: str | Path) -> Path:
    """Write every trial, ranked (``rank_trials``), to a CSV that ``TrialRecord.from_dict`` reads back."""
    columns = [f.name for f in fields(TrialRecord)]
    return _write_csv([asdict(r) for r in rank_trials(records)], columns, path)


# --------------------------------------------------------------------------- the critical batch size


def _g3(x: float | None) -> str:
    """Three significant digits without an exponent (1230, not 1.23e+03); ∞ for inf, – for None."""
    if x is None:
        return "–"
    if math.isinf(x):
        return "∞"
    v = float(f"{x:.3g}")
    return f"{v:.0f}" if abs(v) >= 1e5 else f"{v:g}"


def _ratio(x: float | None) -> str:
    """Two significant digits, as the ratio itself; ∞ for inf."""
    return "–" if x is None else "∞" if math.isinf(x) else f"{x:.2g}"


def _critical_name(fit: CriticalFit, several_r: bool) -> str:
    return fit.mechanism + (f" (r={fit.replication})" if several_r else "")


def _fitted_on(fit: CriticalFit) -> str:
    """Which B went into the fit (edge-won ones marked), seeds and the largest residual; or why not."""
    marked = [_edge(str(p.global_batch_size), p.step_edge) for p in fit.points]
    text = f"B {', '.join(marked) or '–'}; {fit.n_seeds} seed{'s' if fit.n_seeds != 1 else ''}"
    if fit.unreached_batches:
        text += f"; not reached at B {', '.join(map(str, fit.unreached_batches))}"
    if fit.refused:
        return f"**not fitted**: {fit.refused} ({text})"
    return text + f"; max residual {fit.max_abs_residual:.0%}"


def critical_markdown(fits: Sequence[CriticalFit]) -> str:
    """Per mechanism (and replication factor) the critical batch size B_crit with its 95% interval, the
    bound B_D at w0 and along training beside it, B_crit / B_D, S_min, E_min and Zhang et al.'s B_opt.

    Args:
        fits: ``raygd.critical.critical_batch`` rows.
    Returns:
        The markdown text with its notes, ending in a newline.
    """
    several_r = len({f.replication for f in fits}) > 1
    lines = [
        "Critical batch size (McCandlish et al.: updates to target S(B) = S_min(1 + B_crit/B), γ tuned at each B; "
        "95% bootstrap interval over seeds), beside the bound B_D = 1 + B_noise:",
        "",
        "| mechanism | B_crit | B_D at w0 | B_D training | B_crit / B_D | S_min (updates) | E_min (examples) "
        "| B_opt (20%) | fitted on |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for f in fits:
        b_crit = ratio = "–"
        if f.fitted:
            b_crit = f"{_g3(f.b_crit)} ({_g3(f.b_crit_low)}–{_g3(f.b_crit_high)})"
            r, low, high = f.over_bound(f.b_crit), f.over_bound(f.b_crit_low), f.over_bound(f.b_crit_high)
            ratio = "–" if r is None else f"{r:.2g} ({_ratio(low)}–{_ratio(high)})"
        lines.append(
            f"| {_critical_name(f, several_r)} | {b_crit} | {_g3(f.batch_bound_w0)} | {_g3(f.batch_bound_median)} "
            f"| {ratio} | {_g3(f.s_min)} | {_g3(f.e_min)} | {_fmt(f.b_opt, 'd')} | {_fitted_on(f)} |"
        )
    if not fits:
        lines.append("| (no trials) | | | | | | | | |")
    lines += [
        "",
        "B_crit: where doubling B stops halving the updates (below it, nearly perfect scaling; above it, the "
        "examples double instead); E_min = S_min·B_crit. B_noise = B_D − 1 is the noise scale McCandlish et al. "
        "predict it by; B_D is the paper's sufficient bound (Thm 3), not where speedup stops. "
        "B_opt: the largest B within 20% of perfect scaling from the smallest B (Zhang et al. 2024).",
    ]
    if any(f.edge_batches for f in fits):
        lines.append(
            "↑/↓ after a B: its tuned step size is the largest/smallest tried there, so its updates are an upper "
            "bound and the point untrustworthy (sweep.extend_edges_scope: every_batch brackets it)."
        )
    return "\n".join(lines) + "\n"


def write_critical_csv(fits: Sequence[CriticalFit], path: str | Path) -> Path:
    """Write ``CriticalFit.as_dict`` rows (None as '') to a CSV file; returns its path."""
    rows = [f.as_dict() for f in fits]
    return _write_csv(rows, list(rows[0]) if rows else ["mechanism"], path)
