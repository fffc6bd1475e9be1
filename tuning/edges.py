"""Grid edges: is a mechanism's winner on the edge of what was searched, and which values come next.

A grid whose winner is its largest step size has not found the best step size, only a lower
bound on it; large batches, which tolerate larger steps, suffer most. ``tuning.stats`` marks,
per mechanism, whether its fastest pair (``BestRow.step_edge``, ``batch_edge``) sits on an edge:

- the **step-size axis** at the winner's B: γ* is the smallest or largest γ tried at that B;
- the **batch-size axis**: B* is the smallest or largest B tried for the mechanism.

An axis with a single value in the spec was fixed by the user, not searched, and is never an edge.
``next_trials`` plans one round of ``sweep.extend_edges``: the next geometric value (×2 or ÷2) on
the edge side, for γ at the winner's B and at its neighbouring batch sizes (B* is only interior
if its neighbours lost at their own best γ), and with every γ tried at B* for a new B (so the new
batch size gets a step-size grid of its own, which the next round brackets in turn). With
``scope = every_batch`` the step size is bracketed at every B, not only the winner's: what
a time-vs-B curve (the paper's batch-scaling figure) needs, both around the fastest γ and around the γ of
fewest updates to target (the critical batch size's fit, ``raygd.critical``: under a loaded machine the two
differ). A (mechanism, B) with no pair that
reached the target moves γ down when every pair diverged; otherwise it follows the final training
accuracy (a diverged seed counts as 0) to its peak over γ: up when the peak is the largest γ tried
(all too slow), down when it is the smallest and some of its seeds diverged, and nothing when the
peak is interior, so a γ whose seeds end at chance accuracy stops the climb as one that diverged
(at B = 1024 the batch-scaling re-run went on to 1.6 after 0.8 had sat at chance). ``tuning.sweep``
runs rounds until nothing is planned or ``sweep.extend_edges_rounds`` is reached.

Pure functions over ``TrialRecord`` s; tests: ``pytest tests/test_edges.py``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raygd.critical import tuned_points
from raygd.records import EXTEND_PHASE, Status, TrialRecord
from tuning.spec import EXTEND_SCOPES as SCOPES
from tuning.stats import EDGE_HIGH as HIGH
from tuning.stats import EDGE_LOW as LOW
from tuning.stats import PairStats, as_records, pair_stats
from tuning.stats import edge_side as _side

FACTOR = 2.0
"""The geometric step beyond an edge: ×2 above, ÷2 below."""


def _by_mechanism(records: Iterable[TrialRecord | Mapping[str, Any]], replication: int | None) -> dict[str, list]:
    by_mech: dict[str, list[PairStats]] = defaultdict(list)
    for p in pair_stats(records, replication):
        by_mech[p.mechanism].append(p)  # best first within each mechanism
    return by_mech


def _step_proposal(pairs: list[PairStats]) -> float | None:
    """The next γ at one (mechanism, B) whose pairs are ``pairs`` (best first), or None when bracketed."""
    steps = {p.step_size for p in pairs}
    if len(steps) < 2 and pairs[0].reached:
        return None  # one value here: the batch axis gave it, the next round's grid brackets it
    best = pairs[0]
    if best.reached:
        side = _side(best.step_size, steps)
    elif all(_diverged_seeds(p) == p.n_seeds for p in pairs):
        side = LOW
    else:  # nothing reached: follow the final training accuracy to its peak over γ
        closest = max(pairs, key=lambda p: (_mean_final_accuracy(p), p.step_size))
        side = _side(closest.step_size, steps)
        if side == LOW and not _diverged_seeds(closest):
            side = None  # the smallest γ is stable, only slow: a smaller one is slower still
    if side is None:
        return None
    return min(steps) / FACTOR if side == LOW else max(steps) * FACTOR


def _updates_step_proposal(pairs: list[PairStats]) -> float | None:
    """The next γ at one (mechanism, B) beyond the γ of fewest mean updates to target (``raygd.critical``'s γ*(B),
    which the critical batch size is fitted at), when that γ is on an edge of the γ tried there; else None."""
    points, _ = tuned_points(t for p in pairs for t in p.trials)
    if not points or points[0].step_edge is None:
        return None
    means = sorted(statistics.fmean(u) for u in points[0].candidates)
    if len(means) > 1 and means[0] == means[1]:
        return None  # tied with another γ: nothing says the optimum lies beyond the edge
    steps = {p.step_size for p in pairs}
    return min(steps) / FACTOR if points[0].step_edge == LOW else max(steps) * FACTOR


def _diverged_seeds(pair: PairStats) -> int:
    return sum(t.status == Status.DIVERGED for t in pair.trials)


def _mean_final_accuracy(pair: PairStats) -> float:
    """Mean final training accuracy over the pair's seeds, a diverged (or unrecorded) seed counting as 0."""
    return sum(_final_accuracy(t) for t in pair.trials) / max(1, pair.n_seeds)


def _final_accuracy(trial: TrialRecord) -> float:
    acc = trial.final_train_accuracy
    return acc if trial.status != Status.DIVERGED and acc is not None and math.isfinite(acc) else 0.0


@dataclass(frozen=True)
class Proposal:
    """One (mechanism, γ, B) to run beyond an edge, and which axis it extends."""

    mechanism: str
    step_size: float
    global_batch_size: int
    axis: str
    """``step_size`` or ``global_batch_size``."""


def next_trials(
    records: Iterable[TrialRecord | Mapping[str, Any]],
    *,
    searched: Mapping[str, int],
    scope: str = "winner",
    valid_batch: Callable[[int], bool] = lambda b: b >= 1,
    replication: int | None = None,
    extend_round: int | None = None,
) -> list[Proposal]:
    """One round of edge extension: the (mechanism, γ, B) not yet tried that bracket each winner.

    Args:
        records: the sweep's search and extension trials (not its confirm phase).
        searched: how many values the spec lists per axis (``step_size``, ``global_batch_size``): an
            axis with one value is not searched and never extended.
        scope: ``winner`` (γ at the winner's B and its neighbours) or ``every_batch`` (γ at every B tried).
        valid_batch: whether a new B is allowed (divisible by the workers, at most n): the stated limit.
        replication: as in ``tuning.stats.pair_stats``.
        extend_round: plan this round (1, 2, ...) from the trials before it only: a resumed sweep, whose
            records already hold some or all of the round's own trials, gets the round's proposals again.
            None: from every record.
    Returns:
        Proposals in a stable order (mechanism, axis, B, γ), none already tried.
    """
    if scope not in SCOPES:
        raise ValueError(f"sweep.extend_edges_scope = {scope!r} is invalid: allowed values are {', '.join(SCOPES)}.")
    if extend_round is not None:
        records = [r for r in as_records(records) if _before_round(r, extend_round)]
    out: list[Proposal] = []
    for mech, pairs in _by_mechanism(records, replication).items():
        tried = {(p.step_size, p.global_batch_size) for p in pairs}
        at_batch: dict[int, list[PairStats]] = defaultdict(list)
        for p in pairs:
            at_batch[p.global_batch_size].append(p)
        best = pairs[0]
        batches = sorted(at_batch)
        if scope == "winner":  # B* and its neighbours, so that B* is compared with their own best γ
            i = batches.index(best.global_batch_size)
            batches = batches[max(0, i - 1) : i + 2]
        if searched.get("step_size", 0) > 1:
            for b in batches:
                steps = {_step_proposal(at_batch[b])}
                if scope == "every_batch":  # also beyond the γ of fewest updates, the one B_crit is fitted at
                    steps.add(_updates_step_proposal(at_batch[b]))
                for step in sorted(s for s in steps if s is not None):
                    if (_round(step), b) not in tried:
                        out.append(Proposal(mech, _round(step), b, "step_size"))
        if searched.get("global_batch_size", 0) > 1 and best.reached:
            side = _side(best.global_batch_size, set(at_batch))
            if side is not None:
                b_new = round(best.global_batch_size * FACTOR if side == HIGH else best.global_batch_size / FACTOR)
                if b_new not in at_batch and valid_batch(b_new):
                    steps = sorted({p.step_size for p in at_batch[best.global_batch_size]})
                    out.extend(Proposal(mech, s, b_new, "global_batch_size") for s in steps)
    return sorted(out, key=lambda p: (p.mechanism, p.axis, p.global_batch_size, p.step_size))


def _before_round(record: TrialRecord, k: int) -> bool:
    """A search trial, or one of extension rounds 1..k-1. An extension trial without a round (recorded
    before ``EXTEND_ROUND_TAG`` existed) counts as before every round."""
    return record.phase != EXTEND_PHASE or record.extend_round is None or record.extend_round < k


def _round(x: float) -> float:
    """Keep doubled/halved step sizes readable (0.1 / 2 = 0.05, not 0.05000000000000001)."""
    return float(f"{x:.12g}")


def extended_values(records: Iterable[TrialRecord | Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per mechanism, the values the extension phase added per axis (not in its search-phase trials)."""
    recs = as_records(records)
    out: dict[str, dict[str, list[float]]] = {}
    for mech in sorted({r.mechanism for r in recs}):
        search = [r for r in recs if r.mechanism == mech and r.phase != EXTEND_PHASE]
        extend = [r for r in recs if r.mechanism == mech and r.phase == EXTEND_PHASE]
        axes = {
            "step_size": sorted({r.step_size for r in extend} - {r.step_size for r in search}),
            "global_batch_size": sorted(
                {float(r.global_batch_size) for r in extend} - {float(r.global_batch_size) for r in search}
            ),
        }
        axes = {k: v for k, v in axes.items() if v}
        if axes:
            out[mech] = axes
    return out


def describe_extensions(records: Iterable[TrialRecord | Mapping[str, Any]]) -> str:
    """One line per extended mechanism, e.g. ``dropconnect(p=0.4): γ + 0.8, 1.6; B + 512``; '' when none."""
    parts = []
    for mech, axes in extended_values(records).items():
        text = []
        if "step_size" in axes:
            text.append("γ + " + ", ".join(f"{v:g}" for v in axes["step_size"]))
        if "global_batch_size" in axes:
            text.append("B + " + ", ".join(f"{v:g}" for v in axes["global_batch_size"]))
        parts.append(f"{mech}: {'; '.join(text)}")
    return "\n".join(parts)
