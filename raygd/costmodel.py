"""The cost of one data-parallel SGD update, as pure functions (no torch, no Ray).

For a fixed (step size γ, batch B, mechanism, seed) the *updates* to a target accuracy do not depend
on the number of workers P or on the hardware; the *time per update* does. This module models the
second so that ``raygd.project`` can multiply it by the first (measured):

    t_update = t_fixed + t_compute + t_comm − overlap · min(t_comm, t_compute)
    t_compute = c · B / P                          (c: seconds per example of forward + backward)
    t_comm    = k_lat · buckets · α + bytes / β     (α: latency, β: bandwidth in bytes/s)

``overlap`` in [0, 1] is the fraction of the communication that hides behind the backward pass
(0: none, DDP on a slow link; 1: all of it up to the compute time). What one rank moves per update:

    topology            collective   latency terms k_lat   bytes over the busiest link
    ring                all_reduce   2 (P − 1)             2 (P − 1) / P · payload
    ring                all_gather   P − 1                 (P − 1) · payload
    parameter_server    either       2 (push, pull)        2 P · payload   (one server's link)

The payload is what one rank contributes: 4 bytes per float32 parameter, or for QSGD
(``quantize``) one int8 level per parameter plus one float32 norm per bucket of d entries,
n + 4 ⌈n/d⌉ bytes, sent with all_gather (levels cannot be summed in int8). ρ = t_comm / t_compute
says which regime a setting is in: ρ ≪ 1 compute-bound, ρ ≫ 1 communication-bound, where time to
accuracy becomes proportional to the updates (not the examples) to target.

Calibration: ``fit_line`` is least squares for y = a + b x with its residuals; ``fit_compute`` fits
(t_fixed, c) from step times at several B/P, ``fit_link`` (α, 1/β) from timed collectives.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

TOPOLOGIES = ("ring", "parameter_server")
COLLECTIVES = ("all_reduce", "all_gather")
FLOAT_BYTES = 4
DDP_FIRST_BUCKET_BYTES = 1024 * 1024
"""PyTorch DDP's first gradient bucket (``dist._DEFAULT_FIRST_BUCKET_BYTES``)."""
DDP_BUCKET_BYTES = 25 * 1024 * 1024
"""PyTorch DDP's ``bucket_cap_mb`` default, 25 MiB."""


@dataclass(frozen=True)
class Link:
    """A network link: one-way latency α (seconds) and bandwidth β (bytes per second)."""

    latency_s: float
    bandwidth_bytes_per_s: float

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"latency_s = {self.latency_s!r}: must be a finite number >= 0")
        if not (self.bandwidth_bytes_per_s > 0):
            raise ValueError(f"bandwidth_bytes_per_s = {self.bandwidth_bytes_per_s!r}: must be > 0")

    @classmethod
    def from_gbps_us(cls, bandwidth_gbps: float, latency_us: float) -> Link:
        """From gigabits per second (10^9 bit/s) and microseconds."""
        return cls(latency_us * 1e-6, bandwidth_gbps * 1e9 / 8)


@dataclass(frozen=True)
class Compute:
    """Per-update compute: t = fixed_s + per_example_s · (B / P)."""

    per_example_s: float
    fixed_s: float = 0.0

    def time(self, examples_per_worker: float) -> float:
        return self.fixed_s + self.per_example_s * examples_per_worker


def collective_of(mechanism: str) -> str:
    """The collective a mechanism's gradients travel by: QSGD's int8 levels are gathered, the rest all-reduced."""
    return "all_gather" if mechanism == "quantize" else "all_reduce"


def payload_bytes(num_params: int, mechanism: str = "vanilla", quant_bucket_size: int = 512) -> int:
    """Bytes one rank contributes per update: 4n (float32), or n + 4⌈n/d⌉ for QSGD (``quantize``)."""
    if num_params < 0:
        raise ValueError(f"num_params = {num_params}: must be >= 0")
    if mechanism == "quantize":
        return num_params + FLOAT_BYTES * max(1, math.ceil(num_params / quant_bucket_size))
    return FLOAT_BYTES * num_params


def _check(topology: str, collective: str, workers: int) -> None:
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology = {topology!r}: allowed values are {', '.join(TOPOLOGIES)}")
    if collective not in COLLECTIVES:
        raise ValueError(f"collective = {collective!r}: allowed values are {', '.join(COLLECTIVES)}")
    if workers < 1:
        raise ValueError(f"workers = {workers}: must be an integer >= 1")


def link_bytes(payload: float, workers: int, topology: str = "ring", collective: str = "all_reduce") -> float:
    """Bytes over the busiest link per update (table in the module docstring); 0 at P = 1."""
    _check(topology, collective, workers)
    if workers == 1:
        return 0.0
    if topology == "parameter_server":
        return 2.0 * workers * payload
    if collective == "all_gather":
        return (workers - 1) * payload
    return 2.0 * (workers - 1) / workers * payload


def latency_terms(workers: int, topology: str = "ring", collective: str = "all_reduce") -> int:
    """Sequential message latencies per collective: 2(P−1) ring all-reduce, P−1 ring all-gather, 2 PS; 0 at P = 1."""
    _check(topology, collective, workers)
    if workers == 1:
        return 0
    if topology == "parameter_server":
        return 2
    return workers - 1 if collective == "all_gather" else 2 * (workers - 1)


def comm_time(
    payload: float,
    workers: int,
    link: Link,
    topology: str = "ring",
    collective: str = "all_reduce",
    buckets: int = 1,
) -> float:
    """t_comm = latency_terms · buckets · α + link_bytes / β: ``payload`` bytes per rank in ``buckets`` collectives."""
    return latency_terms(workers, topology, collective) * buckets * link.latency_s + (
        link_bytes(payload, workers, topology, collective) / link.bandwidth_bytes_per_s
    )


def ddp_buckets(gradient_bytes: int) -> int:
    """Collectives DDP issues per update for ``gradient_bytes`` of float32 gradients: a 1 MiB first bucket,
    then 25 MiB buckets (an estimate: DDP never splits a parameter across buckets)."""
    if gradient_bytes <= DDP_FIRST_BUCKET_BYTES:
        return 1
    return 1 + math.ceil((gradient_bytes - DDP_FIRST_BUCKET_BYTES) / DDP_BUCKET_BYTES)


TCP_PAYLOAD_BYTES = 1448
"""TCP payload per full segment at MTU 1500 with timestamps: 1500 − 20 (IP) − 20 (TCP) − 12 (options)."""
FRAME_BYTES = 1514
"""What ``tc tbf`` counts for that segment on a veth: the IP packet and the 14-byte Ethernet header."""
SHAPED_LATENCY_S = 0.0
"""α of a shaped link on this machine (``bench.shaped_link``'s calibration)."""


def shaped_link(rate_mbit: float, latency_s: float = SHAPED_LATENCY_S) -> Link:
    """A link shaped by ``tc qdisc ... tbf rate <rate_mbit>mbit``, as gloo's TCP sees it:

        β = rate · 10⁶ / 8 · 1448 / 1514    (payload bytes per second)

    ``tbf`` meters frames, and each full TCP segment carries 1448 payload bytes in a 1514-byte frame.
    """
    if not rate_mbit > 0:
        raise ValueError(f"rate_mbit = {rate_mbit!r}: must be > 0")
    return Link(latency_s, rate_mbit * 1e6 / 8 * TCP_PAYLOAD_BYTES / FRAME_BYTES)


def exposed_comm(t_comm: float, t_compute: float, overlap: float) -> float:
    """Communication time not hidden behind compute: t_comm − overlap · min(t_comm, t_compute)."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap = {overlap!r}: must be in [0, 1]")
    return t_comm - overlap * min(t_comm, t_compute)


@dataclass(frozen=True)
class StepCost:
    """One update's modelled time and its parts (seconds)."""

    compute_s: float
    comm_s: float
    fixed_s: float
    overlap: float

    @property
    def total_s(self) -> float:
        return self.fixed_s + self.compute_s + exposed_comm(self.comm_s, self.compute_s, self.overlap)

    @property
    def rho(self) -> float:
        """ρ = t_comm / t_compute (inf when there is no compute)."""
        return self.comm_s / self.compute_s if self.compute_s > 0 else math.inf


def step_cost(
    global_batch_size: int,
    workers: int,
    compute: Compute,
    payload: float,
    link: Link,
    topology: str = "ring",
    collective: str = "all_reduce",
    overlap: float = 0.0,
    buckets: int = 1,
) -> StepCost:
    """The modelled cost of one update with B = ``global_batch_size`` over P = ``workers`` (module docstring)."""
    return StepCost(
        compute_s=compute.per_example_s * global_batch_size / workers,
        comm_s=comm_time(payload, workers, link, topology, collective, buckets),
        fixed_s=compute.fixed_s,
        overlap=overlap,
    )


def time_to_accuracy(updates: int | None, cost: StepCost) -> float | None:
    """Projected seconds to target = measured updates to target × modelled time per update; None if not reached."""
    return None if updates is None else updates * cost.total_s


def pass_time(n: int, global_batch_size: int, cost: StepCost) -> float:
    """Seconds for one pass over n examples: (n / B) updates."""
    return n / global_batch_size * cost.total_s


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class LineFit:
    """Least-squares y = intercept + slope · x, with the residuals y − ŷ and their relative size."""

    intercept: float
    slope: float
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def predict(self, x: float) -> float:
        return self.intercept + self.slope * x

    @property
    def residuals(self) -> tuple[float, ...]:
        return tuple(y - self.predict(x) for x, y in zip(self.xs, self.ys, strict=True))

    @property
    def max_relative_residual(self) -> float:
        """max |y − ŷ| / y over the points."""
        return max(abs(r) / abs(y) for r, y in zip(self.residuals, self.ys, strict=True) if y)


def fit_line(xs: Sequence[float], ys: Sequence[float], relative: bool = False) -> LineFit:
    """Least squares y = a + b x (needs two distinct x values): ordinary, or with ``relative`` weighted by 1/y²,
    i.e. minimising Σ ((y − ŷ) / y)², so that points spanning decades (1 KB to 16 MB transfers) count alike."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_line needs >= 2 distinct x values and as many y values, got {list(xs)}, {list(ys)}")
    if relative and not all(y > 0 for y in ys):
        raise ValueError(f"a relative fit needs y > 0, got {list(ys)}")
    ws = [1.0 / y**2 if relative else 1.0 for y in ys]
    total = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / total
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True)) / sxx
    return LineFit(my - slope * mx, slope, tuple(map(float, xs)), tuple(map(float, ys)))


def fit_compute(examples_per_worker: Sequence[float], step_s: Sequence[float]) -> tuple[Compute, LineFit]:
    """Fit t_step = fixed + c · (B/P) to measured step times; the fixed part is clipped at 0."""
    fit = fit_line(examples_per_worker, step_s)
    return Compute(per_example_s=max(fit.slope, 0.0), fixed_s=max(fit.intercept, 0.0)), fit


def fit_link(
    link_bytes_moved: Sequence[float], seconds: Sequence[float], terms: int = 1, relative: bool = False
) -> tuple[Link, LineFit]:
    """Fit t = terms · α + bytes / β to timed collectives: ``link_bytes_moved`` are the bytes over the busiest
    link (``link_bytes``), ``terms`` the collective's ``latency_terms`` (2 for a ring all-reduce at P = 2);
    ``relative``: minimise relative residuals (``fit_line``), which fixes α from the small transfers where an
    ordinary fit lets the largest transfer's noise set it."""
    if terms < 1:
        raise ValueError(f"terms = {terms}: must be an integer >= 1")
    fit = fit_line(link_bytes_moved, seconds, relative)
    return Link(latency_s=max(fit.intercept, 0.0) / terms, bandwidth_bytes_per_s=1.0 / max(fit.slope, 1e-15)), fit


def fit_link_regimes(
    link_bytes_moved: Sequence[float],
    seconds: Sequence[float],
    terms: int = 1,
    small_max_bytes: float = 4096,
    large_min_bytes: float = 1 << 20,
) -> tuple[Link, LineFit]:
    """α and β each from the transfers that measure it, as ping and iperf would: 1/β the least-squares slope
    over the transfers of at least ``large_min_bytes`` (where latency is negligible; the two largest where
    fewer are that large, as on a slow link where 1 MB takes seconds), then

        α = median over the transfers of at most ``small_max_bytes`` of (t − bytes/β) / terms, clipped at 0.

    Where the small transfers' times are mostly scheduler noise (a busy 2-core machine) an ordinary fit sets α
    from the largest transfers' noise and a relative one lets the small ones bend β; this does neither. The
    ``LineFit`` returned is the line t = terms·α + bytes/β over all the points, for its residuals.

    Raises:
        ValueError: fewer than two distinct sizes larger than ``small_max_bytes``, or no small one.
    """
    points = sorted(zip(link_bytes_moved, seconds, strict=True))
    large = [(x, y) for x, y in points if x >= large_min_bytes]
    if len({x for x, _ in large}) < 2:
        large = points[-2:]
    small = [(x, y) for x, y in points if x <= small_max_bytes]
    if len({x for x, _ in large}) < 2 or min(x for x, _ in large) <= small_max_bytes or not small:
        raise ValueError(
            f"fit_link_regimes needs >= 2 sizes above {small_max_bytes:g} B and one at most that, "
            f"got {sorted(link_bytes_moved)}"
        )
    slope = max(fit_line([x for x, _ in large], [y for _, y in large]).slope, 1e-15)
    alpha = max(statistics.median((y - slope * x) / terms for x, y in small), 0.0)
    fit = LineFit(terms * alpha, slope, tuple(map(float, link_bytes_moved)), tuple(map(float, seconds)))
    return Link(latency_s=alpha, bandwidth_bytes_per_s=1.0 / slope), fit
