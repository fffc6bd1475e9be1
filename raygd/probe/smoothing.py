"""The probe's smoothed bound and its standard error: ``MomentsEMA`` plus the second moments of its terms.

``MomentsEMA`` smooths B_D as the ratio R = A/C of exponential moving averages A = Σ_k w_k a_k of the
per-update estimates a_k of E‖g‖² and C = Σ_k w_k c_k of ‖μ‖², w_k = (1 − d) d^{t−k}. With the updates'
estimates independent (different batches at nearly the same weights), the delta method gives

    Var(R) ≈ Σ_k w_k² (a_k − R c_k)² / C²,

and Σ w_k² x_k y_k is an exponential moving average with decay d² and weight (1 − d)², kept here for
(a, a), (a, c) and (c, c). The bias correction 1 − d^t of ``MomentsEMA`` cancels in R and in the ratio
above, so both use its uncorrected sums. The effective number of updates behind R is about
(1 + d)/(1 − d): 19 at the default d = 0.9.
"""

from __future__ import annotations

import math
from typing import Any

from raygd.diversity.online import Moments, MomentsEMA


class SmoothedBound(MomentsEMA):
    """``MomentsEMA`` that also gives the delta-method standard error of its ``batch_bound``."""

    def __init__(self, decay: float = 0.9) -> None:
        super().__init__(decay)
        self._aa = self._ac = self._cc = 0.0

    def update(self, m: Moments) -> Moments:
        folded = self.steps
        value = super().update(m)
        if self.steps > folded:  # MomentsEMA skipped nothing: fold the squares in too
            d2, w2 = self.decay**2, (1 - self.decay) ** 2
            a, c = m.expected_sq_norm, m.sq_norm_of_mean
            self._aa = d2 * self._aa + w2 * a * a
            self._ac = d2 * self._ac + w2 * a * c
            self._cc = d2 * self._cc + w2 * c * c
        return value

    def standard_error(self) -> float:
        """SE of ``value.batch_bound``: nan before two updates, inf while the smoothed ‖μ‖² is <= 0."""
        if self.steps < 2:
            return math.nan
        if self._den <= 0:
            return math.inf
        r = self._num / self._den
        var = self._aa - 2 * r * self._ac + r * r * self._cc
        return math.sqrt(max(var, 0.0)) / self._den

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "squares": [self._aa, self._ac, self._cc]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._aa, self._ac, self._cc = state.get("squares", [0.0, 0.0, 0.0])
