"""Tests for tuning/figures.py: every figure is written as a PNG, also for degenerate sweeps."""

from __future__ import annotations

import itertools
import math

import pytest

from tests.trials import loss_record as _loss
from tests.trials import rec, seeds
from tests.trials import sweep_records as _sweep
from tuning.figures import plot_loss_ratio, plot_speedup_bars, plot_time_vs_batch
from tuning.loss_ratio import loss_ratios
from tuning.stats import best_per_mechanism


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@pytest.mark.parametrize("case", ["sweep", "no_vanilla", "all_unreached", "empty", "single_seed"])
def test_figures_are_written_as_png(tmp_path, case):
    records = {
        "sweep": [*_sweep(), rec("dc(p=0.4)", 0.8, 2048, status="diverged", loss=math.nan)],
        "no_vanilla": seeds("dc", 0.1, 256, [3.0, 4.0]) + seeds("dc", 0.1, 512, [None, 2.0]),
        "all_unreached": [*seeds("vanilla", 0.1, 256, [None]), rec("dc", status="diverged", loss=math.nan)],
        "empty": [],
        "single_seed": [rec(time=3.0), rec("dc", 0.1, 512, time=2.0)],
    }[case]
    rows = best_per_mechanism(records)
    loss_rows = loss_ratios([{**r, "passes": 5.0} for r in records], 256, 512)
    for path in (
        plot_time_vs_batch(records, tmp_path / "time.png"),
        plot_speedup_bars(rows, tmp_path / "s.png"),
        plot_loss_ratio(loss_rows, tmp_path / "loss.png"),
    ):
        _assert_png(path)


def test_loss_ratio_figure_with_several_replications(tmp_path):
    records = [
        _loss(m, b, 0.1, s, (0.3 if b == 16 else 0.3 * r) + 0.01 * s, replication=r)
        for m, b, s, r in itertools.product(["vanilla", "dc"], [16, 512], range(3), [1, 2, 4])
    ]
    _assert_png(plot_loss_ratio(loss_ratios(records, 16, 512), tmp_path / "loss.png"))


def test_time_vs_batch_marks_the_bound_at_its_batch_size(tmp_path):
    """The B_D line is drawn in the mechanism's colour at x = B_D: the columns between the plotted batch sizes
    change only where a bound is drawn."""
    import numpy as np
    from matplotlib.image import imread

    recs = seeds("vanilla", 0.1, 64, [10.0, 11.0]) + seeds("vanilla", 0.1, 1024, [8.0, 9.0])
    plain = imread(plot_time_vs_batch(recs, tmp_path / "plain.png"))
    marked = imread(plot_time_vs_batch(recs, tmp_path / "marked.png", bounds={"vanilla": 256.0}))
    assert plain.shape == marked.shape
    changed = np.flatnonzero((np.abs(plain - marked).sum(axis=2) > 0.1).sum(axis=0) > plain.shape[0] // 3)
    # one vertical dashed line per panel (changed columns: two narrow groups), nowhere else in full height
    groups = np.split(changed, np.flatnonzero(np.diff(changed) > 3) + 1)
    assert len(groups) == 2 and all(len(g) <= 4 for g in groups), changed
