"""The batch controller: B, and the step size with it, set while the run trains (``train.batch_schedule``).

Both adaptive policies read the same inputs: the online estimate B̂_D = E‖g‖²/‖E g‖² of the run's own
estimator (``raygd.diversity.online``, free at P > 1), whose noise scale is φ = B̂_D − 1 = tr Σ/‖μ‖², and
the time per update T(B) of ``StepTimeModel``. They differ only in their rule:

- ``diversity``: B_{k+1} = δ·B̂_D(w_k), clipped to [B_min, B_max] and rounded to a multiple of P; B moves
  only when the proposal differs from B_k by a factor ≥ 1 + h (``hysteresis``, either way).
- ``goodput`` (Pollux, Qiao et al. 2021; AdaptDL's ``goodput.py``): B_{k+1} = argmax over B in
  [max(B_min, B0), B_max] of goodput(B) = B / T(B) · E(B), with statistical efficiency
  E(B) = (φ + B0)/(φ + B) (progress per example relative to B0), searched over 50 geometrically spaced B
  as AdaptDL does; B moves only for a predicted gain goodput(B*)/goodput(B_k) ≥ 1.05 (its
  ``speedup_threshold``), and never below B0.

T(B) = t_fixed + c·B/P + exposed t_comm: the link's t_comm is ``raygd.costmodel``'s (the emulated
``train.network`` link, or 0 on the machine's own, whose cost is in the fitted line), and (t_fixed, c) are
fitted to the run's own update times by B/P (``costmodel.fit_compute``); with one B seen, AdaptDL's prior
splits the time evenly between the fixed and the per-example part.

The step size follows B (``step_size_rule``): γ = γ0·r(S), S = B/B0, with AdaScale's gain
r = (σ² + ‖μ‖²)/(σ²/S + ‖μ‖²) where σ² = tr Σ/B0 is the variance of a B0-example gradient, i.e.
r = (φ + B0)/(φ/S + B0) (default); linear r = S; square root r = √S.

No torch here: ``raygd.loop`` hands the controller step times and estimates and applies what it decides.
Tests: ``pytest tests/test_batch_schedule.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raygd import costmodel
from raygd.records import FINAL_BATCH_METRIC as FINAL_BATCH_METRIC
from raygd.records import MEAN_BATCH_METRIC as MEAN_BATCH_METRIC

if TYPE_CHECKING:
    from raygd.config import BatchScheduleConfig, NetworkConfig

GOODPUT_CANDIDATES = 50
"""Batch sizes the goodput rule compares, spaced geometrically between its bounds (AdaptDL's ``np.geomspace``)."""
BATCH_METRIC = "train/global_batch_size"
STEP_SIZE_METRIC = "train/step_size"

# --------------------------------------------------------------------------- rules (pure)


def noise_scale(bound: float) -> float:
    """φ = B_D − 1 = tr Σ/‖μ‖² (McCandlish et al.'s simple noise scale), at least 0; nan stays nan."""
    return max(bound - 1.0, 0.0) if not math.isnan(bound) else math.nan


def round_to_workers(batch: float, workers: int) -> int:
    """The nearest multiple of P to ``batch``, at least P."""
    return max(workers, workers * round(batch / workers))


def clip_batch(batch: float, low: int, high: int, workers: int) -> int:
    """``batch`` rounded to a multiple of P and clipped to [low, high] (both multiples of P)."""
    return min(high, max(low, round_to_workers(batch, workers)))


def step_size_gain(rule: str, batch: int, base_batch: int, noise: float) -> float:
    """r with γ = γ0·r at B (``step_size_rule``), S = B/B0:

    adascale: r = (φ + B0)/(φ/S + B0) (AdaScale's (σ² + ‖μ‖²)/(σ²/S + ‖μ‖²), σ² = tr Σ/B0; 1 while φ is
    unknown); linear: r = S; sqrt: r = √S.
    """
    scale = batch / base_batch
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule != "adascale":
        raise ValueError(f"step_size_rule = {rule!r}: allowed values are adascale, linear, sqrt")
    if not math.isfinite(noise):
        return 1.0
    return (noise + base_batch) / (noise / scale + base_batch)


def efficiency(batch: float, base_batch: int, noise: float) -> float:
    """Pollux's statistical efficiency E(B) = (φ + B0)/(φ + B) = r(S)/S: progress per example at B over B0's."""
    return (noise + base_batch) / (noise + batch)


def diversity_batch(bound: float, delta: float, low: int, high: int, workers: int) -> int | None:
    """The diversity rule's proposal clip(δ·B̂_D) as a multiple of P; None while B̂_D is not a finite number."""
    if not math.isfinite(bound):
        return None
    return clip_batch(delta * bound, low, high, workers)


def moves(current: int, proposed: int, hysteresis: float) -> bool:
    """Whether B moves from ``current`` to ``proposed``: max(B'/B, B/B') ≥ 1 + h (and B' ≠ B)."""
    return proposed != current and max(proposed / current, current / proposed) >= 1.0 + hysteresis - 1e-12


def candidates(low: int, high: int, workers: int, count: int = GOODPUT_CANDIDATES) -> list[int]:
    """``count`` batch sizes spaced geometrically over [low, high], as multiples of P (duplicates removed)."""
    if high <= low:
        return [low]
    ratio = high / low
    return sorted({clip_batch(low * ratio ** (i / (count - 1)), low, high, workers) for i in range(count)})


def goodput(batch: int, base_batch: int, noise: float, step_time_s: float) -> float:
    """goodput(B) = B / T(B) · E(B): examples per second, each weighted by its progress relative to B0's."""
    return batch / step_time_s * efficiency(batch, base_batch, noise)


def best_goodput(
    base_batch: int, noise: float, low: int, high: int, workers: int, step_time: Callable[[int], float]
) -> tuple[int, float]:
    """(B*, goodput(B*)) over ``candidates(max(low, B0), high)``: Pollux's rule, never below B0."""
    pool = candidates(max(low, base_batch), high, workers)
    scored = [(goodput(b, base_batch, noise, step_time(b)), b) for b in pool]
    best_value, best_batch = max(scored, key=lambda s: (s[0], -s[1]))  # ties: the smaller B
    return best_batch, best_value


# --------------------------------------------------------------------------- the time per update


def compute_from_step(step_s: float, comm_s: float, overlap: float) -> float:
    """Invert t_step = t_compute + t_comm − overlap·min(t_comm, t_compute) for t_compute (>= 0)."""
    if comm_s <= 0:
        return max(step_s, 0.0)
    hidden_all = step_s - (1.0 - overlap) * comm_s  # the solution if t_compute >= t_comm
    if hidden_all >= comm_s:
        return hidden_all
    return max((step_s - comm_s) / (1.0 - overlap), 0.0) if overlap < 1.0 else max(step_s - comm_s, 0.0)


@dataclass
class StepTimeModel:
    """T(B) = t_fixed + c·B/P + exposed t_comm, fitted to the update times the run measured at each B.

    ``comm_s`` is the modelled transfer per update (``link_comm_s``; 0 on the machine's own link) and
    ``overlap`` the fraction of it the link hides behind compute (``train.network.overlap``).
    """

    workers: int
    comm_s: float = 0.0
    overlap: float = 0.0
    seconds: dict[int, float] = field(default_factory=dict)
    """Per global batch size: summed seconds of the updates observed at it."""
    counts: dict[int, int] = field(default_factory=dict)

    def observe(self, batch: int, seconds: float) -> None:
        """One update of ``batch`` examples took ``seconds`` (the loop's clock)."""
        self.seconds[batch] = self.seconds.get(batch, 0.0) + seconds
        self.counts[batch] = self.counts.get(batch, 0) + 1

    def compute(self) -> costmodel.Compute | None:
        """(t_fixed, c) from the mean update time at each B, less the modelled exposed transfer; None before any."""
        points = sorted(
            (b / self.workers, compute_from_step(self.seconds[b] / self.counts[b], self.comm_s, self.overlap))
            for b in self.counts
        )
        if not points:
            return None
        if len(points) == 1:  # AdaptDL's prior with one batch size: half fixed, half per example
            ((per_worker, t),) = points
            return costmodel.Compute(per_example_s=t / 2 / per_worker, fixed_s=t / 2)
        compute, _ = costmodel.fit_compute([p[0] for p in points], [p[1] for p in points])
        if compute.per_example_s <= 0:  # noise made the line flat or falling: keep a positive slope
            mean_t = sum(p[1] for p in points) / len(points)
            mean_b = sum(p[0] for p in points) / len(points)
            compute = costmodel.Compute(per_example_s=1e-3 * mean_t / mean_b, fixed_s=mean_t)
        return compute

    def predict(self, batch: int, compute: costmodel.Compute | None = None) -> float:
        """Modelled seconds per update at B (nan before any observation)."""
        compute = compute or self.compute()
        if compute is None:
            return math.nan
        t_compute = compute.time(batch / self.workers)
        return t_compute + costmodel.exposed_comm(self.comm_s, t_compute, self.overlap)

    def agree(self, mean_over_ranks: Callable[[list[float]], list[float]]) -> None:
        """Replace this rank's sums by their mean over the ranks (one collective), so that every rank fits the
        same line and takes the same decision: its own clock differs by microseconds, and a B that differs
        between ranks would pair different collectives."""
        keys = sorted(self.seconds)
        for key, value in zip(keys, mean_over_ranks([self.seconds[k] for k in keys]), strict=True):
            self.seconds[key] = value

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": dict(self.seconds), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds, self.counts = dict(state["seconds"]), dict(state["counts"])


def link_comm_s(network: NetworkConfig | None, workers: int, num_params: int, mechanism: str = "vanilla") -> float:
    """Modelled seconds per update on the emulated link (``raygd.network``'s waits summed over DDP's buckets);
    0 without one: the machine's own all-reduce is part of the fitted step time."""
    if network is None or workers == 1:
        return 0.0
    link = costmodel.Link.from_gbps_us(network.bandwidth_gbps, network.latency_us)
    payload = costmodel.payload_bytes(num_params, mechanism)
    buckets = costmodel.ddp_buckets(costmodel.FLOAT_BYTES * num_params)
    collective = costmodel.collective_of(mechanism)
    return costmodel.comm_time(payload, workers, link, network.topology, collective, buckets)


# --------------------------------------------------------------------------- the controller


@dataclass(frozen=True)
class Decision:
    """What one decision saw and set."""

    batch: int
    step_size: float
    changed: bool
    metrics: dict[str, float]


class BatchController:
    """The run's B and γ: fixed, or moved by the ``diversity`` or ``goodput`` rule at each decision.

    Args:
        settings: ``train.batch_schedule``.
        base_batch: B0 = ``train.global_batch_size``, where the run starts.
        base_step_size: γ0 = ``train.step_size``, tuned at B0.
        workers: P.
        n: training examples (B never exceeds n).
        comm_s, overlap: the link's modelled transfer per update and its overlap (``link_comm_s``).
    """

    def __init__(
        self,
        settings: BatchScheduleConfig,
        base_batch: int,
        base_step_size: float,
        workers: int,
        n: int,
        comm_s: float = 0.0,
        overlap: float = 0.0,
    ) -> None:
        self.settings, self.base_batch, self.base_step_size, self.workers = (
            settings,
            base_batch,
            base_step_size,
            workers,
        )
        self.low = settings.min_batch_size or workers
        self.high = min(settings.max_batch_size or n, workers * (n // workers))
        if base_batch > self.high:
            raise ValueError(f"B0 = {base_batch} is above the controller's largest batch {self.high} (n = {n})")
        self.batch, self.step_size = base_batch, base_step_size
        self.times = StepTimeModel(workers, comm_s, overlap)
        self.changes = 0
        self.last: dict[str, float] = {}
        """The latest decision's inputs and proposal (``Decision.metrics``), which evaluations log."""
        self._skip_next = True  # the first update at each B runs cold (AdaptDL does not profile it either)

    @property
    def adaptive(self) -> bool:
        return self.settings.policy != "fixed"

    def decision_due(self, step: int, evaluation: bool) -> bool:
        """Whether to decide after update ``step`` (1-based): at each evaluation, or every K updates."""
        if not self.adaptive:
            return False
        every = self.settings.decide_every_steps
        return step % every == 0 if every else evaluation

    def observe_step(self, seconds: float) -> None:
        """One update at the current B took ``seconds``."""
        if self._skip_next:
            self._skip_next = False
            return
        self.times.observe(self.batch, seconds)

    def decide(self, bound: float, measurements: int) -> Decision:
        """Apply the policy's rule to the online estimate ``bound`` = B̂_D (after ``measurements`` measured updates)."""
        s, noise = self.settings, noise_scale(bound)
        compute = self.times.compute()
        metrics = {"batch_schedule/bound": bound, "batch_schedule/noise_scale": noise}
        proposal, gain = None, math.nan
        if measurements >= s.warmup_measurements and math.isfinite(noise):
            if s.policy == "diversity":
                proposal = diversity_batch(bound, s.delta, self.low, self.high, self.workers)
            elif compute is not None:
                proposal, _ = best_goodput(
                    self.base_batch, noise, self.low, self.high, self.workers, lambda b: self.times.predict(b, compute)
                )
        if proposal is not None and compute is not None:
            now = goodput(self.batch, self.base_batch, noise, self.times.predict(self.batch, compute))
            gain = goodput(proposal, self.base_batch, noise, self.times.predict(proposal, compute)) / now
        move = proposal is not None and (
            moves(self.batch, proposal, s.hysteresis)
            if s.policy == "diversity"
            else proposal != self.batch and gain >= s.goodput_gain
        )
        if move and proposal is not None:
            self.batch, self.changes, self._skip_next = proposal, self.changes + 1, True
        r = step_size_gain(s.step_size_rule, self.batch, self.base_batch, noise)
        self.step_size = self.base_step_size * r
        metrics.update(
            {
                "batch_schedule/proposed_batch_size": float(proposal) if proposal is not None else math.nan,
                "batch_schedule/predicted_gain": gain,
                "batch_schedule/step_time_s": self.times.predict(self.batch, compute),
                "batch_schedule/step_size_gain": r,
            }
        )
        self.last = metrics
        return Decision(self.batch, self.step_size, move, metrics)

    def metrics(self) -> dict[str, float]:
        """What every evaluation logs: the B and γ of the updates just made."""
        return {BATCH_METRIC: float(self.batch), STEP_SIZE_METRIC: self.step_size}

    def summary(self, examples: int, updates: int) -> dict[str, float]:
        """The run's mean B (examples over updates) and final B, and how often B moved."""
        return {
            MEAN_BATCH_METRIC: examples / updates if updates else float(self.batch),
            FINAL_BATCH_METRIC: float(self.batch),
            "batch_schedule/changes": float(self.changes),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to decide as this one would."""
        return {
            "batch": self.batch,
            "step_size": self.step_size,
            "changes": self.changes,
            "skip_next": self._skip_next,
            "last": dict(self.last),
            "times": self.times.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch, self.step_size, self.changes = state["batch"], state["step_size"], state["changes"]
        self._skip_next, self.last = state["skip_next"], dict(state["last"])
        self.times.load_state_dict(state["times"])


def apply(decision: Decision, optimizer: Any, estimator: Any = None, mechanism: Any = None, workers: int = 1) -> None:
    """Set a decision's B and γ where the step reads them: the optimizer's step size, the online estimator's
    batch sizes (B and b = B/P enter its moments) and the mechanism's B (SGLD's noise is N(0, Bσ²) on the sum)."""
    for group in optimizer.param_groups:
        group["lr"] = decision.step_size
    if estimator is not None:
        estimator.B, estimator.b = decision.batch, decision.batch // workers
    if mechanism is not None:
        mechanism.global_batch_size = decision.batch


def schedule_label(entry: dict[str, Any]) -> str:
    """A sweep's display label of one ``space.batch_schedule`` entry: the policy, with the entry's other
    settings, e.g. ``diversity`` or ``diversity(delta=2)``."""
    policy = str(entry.get("policy", "fixed"))
    rest = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(entry.items()) if k != "policy"]
    return f"{policy}({', '.join(rest)})" if rest else policy
