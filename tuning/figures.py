"""Sweep results as figures (matplotlib, PNG): time to accuracy vs batch size, speedups, loss ratios, and the
critical batch size (updates against examples to target with the fitted hyperbola).

Pure functions over trial records and ``tuning.stats`` rows; ``tuning.report`` writes and logs them.
Tests: ``pytest tests/test_figures.py``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raygd.critical import CriticalFit
from raygd.records import TrialRecord
from tuning.loss_ratio import LossRatioRow
from tuning.stats import BASELINE, BestRow, PairStats, pair_stats


def _figure(ncols: int = 1):
    """A matplotlib Figure without pyplot's global state (no backend switching needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(5.5 * ncols, 4.0), layout="constrained")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _log2_axis(ax, xs: Iterable[float]) -> None:
    """Log2 x axis with the plotted values themselves as tick labels (256, not 2⁸)."""
    ticks = sorted(set(xs))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def plot_time_vs_batch(
    records: Iterable[TrialRecord | Mapping[str, Any]],
    path: str | Path,
    replication: int | None = None,
    bounds: Mapping[str, float] | None = None,
) -> Path:
    """Time to accuracy and passes to accuracy vs global batch size, one line per mechanism.

    At each B the best step size (``PairStats.sort_key``) is plotted, with ± std over seeds;
    pairs that did not reach the target are left out. x axis: log2. ``bounds`` (mechanism → B_D at
    the initial weights) are drawn as dashed vertical lines in the mechanism's colour, labelled B_D.

    Returns:
        The written PNG path.
    """
    best: dict[tuple[str, int], PairStats] = {}
    for p in pair_stats(records, replication):
        best.setdefault((p.mechanism, p.global_batch_size), p)  # pair_stats lists best first
    fig = _figure(2)
    ax_t, ax_p = fig.subplots(1, 2)
    drawn = False
    for mech in sorted({m for m, _ in best}, key=lambda m: (m != BASELINE, m)):
        pts = sorted((b, p) for (m, b), p in best.items() if m == mech and p.reached)
        if pts:
            drawn, bs = True, [b for b, _ in pts]
            ax_t.errorbar(
                bs,
                [p.score for _, p in pts],
                yerr=[p.time_std_s or 0.0 for _, p in pts],
                marker="o",
                capsize=3,
                label=mech,
            )
            ax_p.plot(bs, [p.passes_to_accuracy or math.nan for _, p in pts], marker="o", label=mech)
            bound = (bounds or {}).get(mech)
            if bound is not None and math.isfinite(bound) and bound > 0:
                colour = ax_t.get_lines()[-1].get_color()
                for ax in (ax_t, ax_p):
                    ax.axvline(bound, color=colour, ls="--", lw=1.0, label=f"B_D {mech} = {bound:.3g}")
    for ax, ylabel in ((ax_t, "time to accuracy (s)"), (ax_p, "passes to accuracy")):
        ax.set_xlabel("global batch size B")
        ax.set_ylabel(ylabel)
        if drawn:
            _log2_axis(ax, [b for (_, b), p in best.items() if p.reached])
            ax.legend(fontsize="small")
        else:
            _note(ax, "no pair reached the target")
    return _save(fig, path)


def plot_speedup_bars(best_rows: Sequence[BestRow], path: str | Path) -> Path:
    """Bar per mechanism of its speedup over vanilla (best pair vs best pair); 'n/a' where undefined.

    Returns:
        The written PNG path.
    """
    fig = _figure()
    ax = fig.subplots()
    names = [r.mechanism for r in best_rows]
    values = [r.speedup if r.speedup is not None else 0.0 for r in best_rows]
    bars = ax.bar(range(len(names)), values, color=["0.6" if r.mechanism == BASELINE else "C0" for r in best_rows])
    for bar, r in zip(bars, best_rows, strict=True):
        label = "n/a" if r.speedup is None else f"{r.speedup:.2f}×\nB={r.global_batch_size}"
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize="small"
        )
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.margins(y=0.15)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("speedup vs vanilla (TTA ratio)")
    if all(r.speedup is None for r in best_rows):
        _note(ax, "no speedup defined (no reached baseline)")
    return _save(fig, path)


def plot_loss_ratio(loss_rows: Sequence[LossRatioRow], path: str | Path) -> Path:
    """Loss ratio L(B_large)/L(B_small) vs replication factor r, one line per mechanism, ± std error bars.

    Returns:
        The written PNG path.
    """
    fig = _figure()
    ax = fig.subplots()
    drawn = False
    for mech in sorted({r.mechanism for r in loss_rows}, key=lambda m: (m != BASELINE, m)):
        pts = sorted(
            (r.replication, r.ratio_mean, r.ratio_std or 0.0)
            for r in loss_rows
            if r.mechanism == mech and r.ratio_mean is not None
        )
        if pts:
            drawn = True
            ax.errorbar(
                [x for x, _, _ in pts],
                [mean for _, mean, _ in pts],
                yerr=[std for _, _, std in pts],
                marker="o",
                capsize=3,
                label=mech,
            )
    ax.set_xlabel("replication factor r")
    if loss_rows:
        ax.set_ylabel(f"loss ratio L(B={loss_rows[0].large_batch}) / L(B={loss_rows[0].small_batch})")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    if drawn:
        _log2_axis(ax, [r.replication for r in loss_rows if r.ratio_mean is not None])
        ax.legend(fontsize="small")
    else:
        _note(ax, "no finite loss ratio")
    return _save(fig, path)


def _g3(x: float | None) -> str:
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{float(f'{x:.3g}'):g}"


def _critical_panel(ax, fit: CriticalFit) -> None:
    """One (mechanism, r): a point per B (E, S) ± std over seeds, open where its γ won on an edge; the fitted
    hyperbola with its asymptotes S_min and E_min, B_crit (at 2·E_min, 2·S_min) and B_D on the curve."""
    pts = fit.points
    for p in pts:
        open_marker = p.step_edge is not None
        ax.errorbar(
            p.examples,
            p.mean_updates,
            xerr=p.global_batch_size * p.std_updates,
            yerr=p.std_updates,
            fmt="o",
            color="C0",
            mfc="white" if open_marker else "C0",
            capsize=2,
            zorder=3,
        )
        ax.annotate(
            f"{p.global_batch_size}",
            (p.examples, p.mean_updates),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
        )
    title = fit.mechanism + (f" (r={fit.replication})" if fit.replication != 1 else "")
    if fit.fitted and fit.s_min is not None and fit.e_min is not None and fit.b_crit is not None:
        b_lo, b_hi = min(p.global_batch_size for p in pts), max(p.global_batch_size for p in pts)
        batches = np.geomspace(min(b_lo, fit.b_crit) / 2, max(b_hi, fit.b_crit) * 2, 200)
        e, s = fit.curve(batches)
        ax.plot(e, s, color="C1", lw=1.5, label="S = S_min(1 + B_crit/B)")
        ax.axhline(fit.s_min, color="0.4", ls="--", lw=1.0, label=f"S_min = {_g3(fit.s_min)} updates")
        ax.axvline(fit.e_min, color="0.4", ls=":", lw=1.0, label=f"E_min = {_g3(fit.e_min)} examples")
        ax.plot(2 * fit.e_min, 2 * fit.s_min, "*", color="C1", ms=11, label=f"B_crit = {_g3(fit.b_crit)}", zorder=4)
        bound = fit.batch_bound_w0
        if bound is not None and bound > 0:
            (e_d,), (s_d,) = fit.curve([bound])
            ax.plot(e_d, s_d, "D", color="C3", ms=6, label=f"B_D(w0) = {_g3(bound)} on the curve", zorder=4)
        title += f": B_crit = {_g3(fit.b_crit)} ({_g3(fit.b_crit_low)}–{_g3(fit.b_crit_high)})"
        if fit.edge_batches:
            ax.plot([], [], "o", color="C0", mfc="white", label="γ on the edge tried at that B")
        ax.legend(fontsize="x-small", loc="upper right")
    else:
        text = "not fitted:\n" + textwrap.fill(fit.refused or "no points", 40)
        ax.text(0.5, 0.85, text, transform=ax.transAxes, ha="center", va="top", color="0.4", fontsize="small")
    if pts:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # 1, 2, 5 × 10^k written out: the reader reads off S_min and E_min
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize="small")
    ax.set_xlabel("examples to target E = B·S")
    ax.set_ylabel("updates to target S")


def plot_critical_batch(fits: Sequence[CriticalFit], path: str | Path) -> Path:
    """Updates to target against examples to target, one point per B (its tuned γ), the fitted hyperbola
    (S/S_min − 1)(E/E_min − 1) = 1 with its asymptotes S_min and E_min, one panel per mechanism (and
    replication factor) on shared axes. Points up the vertical asymptote scale perfectly (more B, fewer updates, the
    same examples); points along the horizontal one waste examples.

    Returns:
        The written PNG path.
    """
    from matplotlib.figure import Figure

    n = max(1, len(fits))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.0 * cols, 4.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)).ravel()
    for ax, fit in zip(axes, fits, strict=False):
        _critical_panel(ax, fit)
        ax.tick_params(labelbottom=True, labelleft=True)  # shared axes, but every panel read on its own
    for ax in axes[len(fits) :]:
        ax.set_axis_off()
    if not fits:
        axes[0].set_axis_on()
        _note(axes[0], "no trials")
    return _save(fig, path)
