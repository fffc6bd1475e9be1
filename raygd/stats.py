"""Statistics that both ``raygd`` (``raygd.project``, ``raygd.critical``) and the sweep layer (``tuning.confirm``)
use: the bootstrap of a ratio of means. Written with numpy: scipy.stats.bootstrap resamples one statistic of
paired or one-sample data, not two independent arms' means in one ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_BOOTSTRAP = 2000
"""Bootstrap resamples behind the spread of a speedup (and of B_crit, ``raygd.critical``)."""


def bootstrap_ratio(
    num: Sequence[float], den: Sequence[float], n_boot: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float, float, float]:
    """Ratio of means mean(num) / mean(den) and its bootstrap spread.

    Each resample draws len(num) values of ``num`` and len(den) of ``den`` with replacement,
    independently (different mechanisms' seeds are not paired), from ``np.random.default_rng(seed)``.
    The ratio of means is used rather than the mean of per-seed ratios, which is biased upward
    (Jensen: E[1/T] > 1/E[T]).

    Returns:
        (ratio, std over resamples, 2.5th percentile, 97.5th percentile).
    """
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    rng = np.random.default_rng(seed)
    ra = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    rb = b[rng.integers(0, b.size, size=(n_boot, b.size))].mean(axis=1)
    ratios = ra / rb
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(a.mean() / b.mean()), float(ratios.std(ddof=1)), float(lo), float(hi)
