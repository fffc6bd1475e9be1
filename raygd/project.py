"""``raygd project``: a sweep measured here, projected onto a cluster before paying for it.

For a fixed (γ, B, mechanism, seed) the updates to target do not depend on P or on hardware (P = 1
and P = 2 reach the same weights); the time per update does. A projection multiplies each trial's
*measured* updates to target by the *modelled* time per update (``raygd.costmodel``) on a target
cluster (``raygd.profiles`` or explicit figures) at each P:

    projected TTA(trial, P) = updates_to_accuracy × t_update(B, P, model, mechanism, link, compute)

Compute is either ``measured`` (this machine: t = fixed + c·B/P fitted per model and mechanism from
the trials' own step times, train_time_s / steps, minus any emulated wait and, for runs over a shaped
link (``raygd.network = shaped``: real packets through ``tc tbf`` on one machine), minus the modelled
transfer over ``raygd.costmodel.shaped_link`` at the tagged rate) or an accelerator
(6 × the model's counted multiply-accumulates per example at peak × utilisation, plus a fixed cost).
A trial that did not reach its target has no projected time: it is reported as not reached, never
extrapolated. Every output says "projected": the table, the CSVs and figures logged under
``projected/`` in the sweep's parent run.

    raygd project my-sweep --profile p3-v100-25g --workers 2,8,32,128,256
    raygd project my-sweep --bandwidth-gbps 10 --latency-us 50 --topology parameter_server

Three modules, bottom-up: ``raygd.project_trials`` reads a sweep's trials from MLflow and fits this
machine's compute; this one projects them; ``raygd.project_report`` writes the table, CSVs and figures and
logs them to the parent run.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raygd import costmodel as cm
from raygd.critical import fastest_batch
from raygd.profiles import COMPUTES, LINKS, MEASURED, PROFILES, ComputeProfile
from raygd.project_trials import TrialInput, builtin_model_size, fit_measured_compute, read_trials
from raygd.records import TrialRecord

__all__ = [
    "DEFAULT_WORKERS", "PROJECTED", "Projection", "Target", "TrialInput", "builtin_model_size", "fastest_batches",
    "fit_measured_compute", "link_for_rho", "project", "read_trials", "resolve_target", "speedup_interval",
]  # fmt: skip

PROJECTED = "projected"
DEFAULT_WORKERS = (2, 8, 32, 128, 256)
RHO_GRID = tuple(10 ** (k / 4) for k in range(-8, 9))
"""ρ from 0.01 to 100, four points per decade."""


@dataclass(frozen=True)
class Target:
    """The cluster a sweep is projected onto."""

    name: str
    link: cm.Link
    topology: str = "ring"
    overlap: float = 0.0
    compute: ComputeProfile | None = None
    """None: ``measured`` (this machine's fitted compute)."""
    sources: str = ""

    def describe(self) -> str:
        bw = self.link.bandwidth_bytes_per_s * 8 / 1e9
        compute = (
            "compute as measured on this machine"
            if self.compute is None
            else f"{self.compute.peak_tflops:g} TFLOP/s × {self.compute.utilisation:g} + {self.compute.fixed_ms:g} ms"
        )
        return (
            f"{self.name}: {bw:g} Gbit/s, {self.link.latency_s * 1e6:g} µs, {self.topology}, "
            f"overlap {self.overlap:g}; {compute}"
        )


def resolve_target(
    profile: str | None = None,
    link: str | None = None,
    compute: str | None = None,
    bandwidth_gbps: float | None = None,
    latency_us: float | None = None,
    topology: str = "ring",
    overlap: float = 0.0,
) -> Target:
    """A named profile (or link/compute names), with explicit figures overriding; errors name the option."""
    from raygd.config import ConfigError

    def choose(kind: str, name: str, table: dict) -> Any:
        if name not in table:
            raise ConfigError(f"--{kind} {name!r} is invalid: allowed values are {', '.join(table)}.")
        return table[name]

    link_name, compute_name = choose("profile", profile, PROFILES) if profile else ("ec2-10g", MEASURED)
    link_name, compute_name = link or link_name, compute or compute_name
    lp = choose("link", link_name, LINKS)
    cp = None if compute_name == MEASURED else choose("compute", compute_name, {**COMPUTES, MEASURED: None})
    if topology not in cm.TOPOLOGIES:
        raise ConfigError(f"--topology {topology!r} is invalid: allowed values are {', '.join(cm.TOPOLOGIES)}.")
    if not 0 <= overlap <= 1:
        raise ConfigError(f"--overlap {overlap!r} is invalid: a number in [0, 1].")
    for flag, value in (("--bandwidth-gbps", bandwidth_gbps), ("--latency-us", latency_us)):
        if value is not None and not (math.isfinite(value) and value >= (0 if flag == "--latency-us" else 1e-12)):
            raise ConfigError(f"{flag} {value!r} is invalid: a finite number > 0 (latency: >= 0).")
    explicit = bandwidth_gbps is not None or latency_us is not None
    bw = bandwidth_gbps if bandwidth_gbps is not None else lp.bandwidth_gbps
    lat = latency_us if latency_us is not None else lp.latency_us
    name = (profile or f"{link_name}+{compute_name}") + (" (explicit figures)" if explicit else "")
    sources = f"link {link_name}: {lp.source}" + (f"; compute {compute_name}: {cp.source}" if cp else "")
    return Target(name, cm.Link.from_gbps_us(bw, lat), topology, overlap, cp, sources)


@dataclass
class Projection:
    """Projected figures: per trial and P, best per mechanism and P, Figure 1 at scale, the ρ map."""

    target: Target
    workers: tuple[int, ...]
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)
    figure1: list[dict[str, Any]] = field(default_factory=list)
    rho_map: list[dict[str, Any]] = field(default_factory=list)
    fits: list[dict[str, Any]] = field(default_factory=list)


def _compute_for(t: TrialInput, target: Target, measured: dict) -> cm.Compute:
    if target.compute is None:
        return measured[(t.model, t.record.mechanism)][0]
    c = target.compute
    return cm.Compute(6.0 * t.macs_per_example / (c.peak_tflops * 1e12 * c.utilisation), c.fixed_ms * 1e-3)


def _cost(t: TrialInput, workers: int, target: Target, measured: dict, link: cm.Link | None = None) -> cm.StepCost:
    return cm.step_cost(
        t.record.global_batch_size,
        workers,
        _compute_for(t, target, measured),
        t.payload,
        link or target.link,
        target.topology,
        t.collective,
        target.overlap,
        t.buckets,
    )


@dataclass(frozen=True)
class _Best:
    """A mechanism's projected-best (γ, B) at one P: the mean projected TTA over its seeds and each seed's."""

    tta: float
    trial: TrialInput
    ttas: tuple[float, ...]


def _pair_ttas(
    trials: Sequence[TrialInput], workers: int, target: Target, measured: dict, link: cm.Link | None = None
) -> dict[tuple[str, float, int], tuple[list[TrialInput], tuple[float, ...]]]:
    """Per (mechanism, γ, B) whose every seed reached and B ≥ P: its trials and each seed's projected TTA."""
    pairs: dict[tuple, list[TrialInput]] = defaultdict(list)
    for t in trials:
        pairs[t.record.pair].append(t)
    out = {}
    for key, group in pairs.items():
        if key[2] < workers or not all(t.record.reached and t.record.updates_to_accuracy for t in group):
            continue
        ttas = tuple(
            t.record.updates_to_accuracy * _cost(t, workers, target, measured, link).total_s  # type: ignore[operator]
            for t in group
        )
        out[key] = (group, ttas)
    return out


def _best(
    trials: Sequence[TrialInput], workers: int, target: Target, measured: dict, link: cm.Link | None = None
) -> dict[str, _Best]:
    """Per mechanism: the (γ, B) with the smallest mean projected TTA over its seeds (every seed reached), the
    sweep table's rule (``tuning.stats``: a pair's score is its mean time to accuracy)."""
    best: dict[str, _Best] = {}
    for (mech, _, _), (group, ttas) in _pair_ttas(trials, workers, target, measured, link).items():
        tta = statistics.fmean(ttas)
        if mech not in best or tta < best[mech].tta:
            best[mech] = _Best(tta, group[0], ttas)
    return best


def fastest_batches(
    trials: Sequence[TrialInput], workers: int, target: Target, measured: dict
) -> dict[str, tuple[int, int | None, int | None]]:
    """Per mechanism at P: the largest B that still gets faster, i.e. the B of least mean projected TTA (γ tuned
    at each B), with its 95% interval over seeds (``raygd.critical.fastest_batch``; None without two seeds)."""
    times: dict[str, dict[tuple[float, int], tuple[float, ...]]] = defaultdict(dict)
    for (mech, step, batch), (_, ttas) in _pair_ttas(trials, workers, target, measured).items():
        times[mech][(step, batch)] = ttas
    return {mech: fastest_batch(pairs) for mech, pairs in times.items()}


def speedup_interval(base: _Best, other: _Best) -> tuple[float, float | None, float | None]:
    """Projected speedup of ``other`` over ``base`` (ratio of mean TTAs) and its 95% bootstrap interval over
    seeds (``raygd.stats.bootstrap_ratio``, each arm's seeds resampled); no interval when either arm has a
    single seed or for the baseline itself. The interval is the seeds' spread in updates to target only: the
    modelled time per update is taken as exact."""
    from raygd.stats import bootstrap_ratio

    if other is base or min(len(base.ttas), len(other.ttas)) < 2:  # no resampling where no interval is given
        return base.tta / other.tta, None, None
    ratio, _, low, high = bootstrap_ratio(base.ttas, other.ttas)
    return ratio, low, high


def project(trials: Sequence[TrialInput], target: Target, workers: Sequence[int] = DEFAULT_WORKERS) -> Projection:
    """Project every trial onto ``target`` at each P in ``workers`` (module docstring)."""
    from raygd.config import ConfigError

    if not trials:
        raise ConfigError("nothing to project: the run has no finished trial with a step count.")
    measured = fit_measured_compute(trials)
    out = Projection(target, tuple(workers))
    for (model, mech), (compute, fit) in measured.items():
        out.fits.append(
            {
                "model": model,
                "mechanism": mech,
                "per_example_s": compute.per_example_s,
                "fixed_s": compute.fixed_s,
                "points": 1 if fit is None else len(fit.xs),
                "max_relative_residual": "" if fit is None else fit.max_relative_residual,
            }
        )
    for t in trials:
        r = t.record
        for p in workers:
            cost = _cost(t, p, target, measured)
            if r.global_batch_size < p:
                status, tta = f"B={r.global_batch_size} < P", None
            elif not r.reached or not r.updates_to_accuracy:
                status, tta = f"not reached ({r.status})", None
            else:
                status, tta = "reached", cm.time_to_accuracy(r.updates_to_accuracy, cost)
            out.trials.append(
                {
                    "trial_id": r.trial_id,
                    "mechanism": r.mechanism,
                    "step_size": r.step_size,
                    "global_batch_size": r.global_batch_size,
                    "seed": r.seed,
                    "workers": p,
                    "updates_to_accuracy": r.updates_to_accuracy if tta is not None else "",
                    "projected_step_s": cost.total_s,
                    "projected_rho": cost.rho,
                    "projected_time_to_accuracy_s": "" if tta is None else tta,
                    "status": status,
                    "measured_time_to_accuracy_s": "" if r.time_to_accuracy_s is None else r.time_to_accuracy_s,
                    "measured_workers": t.workers,
                    "target": t.target,
                }
            )
    for p in workers:
        best = _best(trials, p, target, measured)
        fastest = fastest_batches(trials, p, target, measured)
        vanilla = best.get("vanilla")
        for mech, b in sorted(best.items()):
            ratio, low, high = speedup_interval(vanilla, b) if vanilla else ("", None, None)
            _, b_low, b_high = fastest[mech]
            out.best.append(
                {
                    "workers": p,
                    "mechanism": mech,
                    "step_size": b.trial.record.step_size,
                    "global_batch_size": b.trial.record.global_batch_size,
                    "seeds": len(b.ttas),
                    "projected_time_to_accuracy_s": b.tta,
                    "projected_speedup_vs_vanilla": ratio,
                    "projected_speedup_low": "" if low is None else low,
                    "projected_speedup_high": "" if high is None else high,
                    "projected_rho": _cost(b.trial, p, target, measured).rho,
                    "fastest_batch_low": "" if b_low is None else b_low,
                    "fastest_batch_high": "" if b_high is None else b_high,
                }
            )
    out.figure1 = _figure1(trials, target, measured, workers)
    out.rho_map = _rho_map(trials, target, measured, workers)
    return out


def link_for_rho(
    trials: Sequence[TrialInput],
    rho: float,
    batch: int,
    workers: int = 2,
    latency_us: float = 0.0,
    topology: str = "ring",
    mechanism: str = "vanilla",
) -> cm.Link:
    """The link on which ``mechanism``'s update at B = ``batch`` over P = ``workers`` has ρ = t_comm / t_compute
    = ``rho``, t_compute from this machine's fit (``fit_measured_compute``): with α = ``latency_us``,

        β = link_bytes / (ρ · t_compute − latency_terms · buckets · α)

    How a paper-regime experiment picks the emulated link it runs under (``bench/paper/run.py dropconnect-link``).

    Raises:
        ValueError: no trial of ``mechanism``, or the latency alone exceeds ρ · t_compute.
    """
    ref = next((t for t in trials if t.record.mechanism == mechanism), None)
    if ref is None:
        raise ValueError(f"no trial of {mechanism!r} to take the model and its compute from")
    t_compute = fit_measured_compute(trials)[(ref.model, mechanism)][0].per_example_s * batch / workers
    latency = cm.latency_terms(workers, topology, ref.collective) * ref.buckets * latency_us * 1e-6
    budget = rho * t_compute - latency
    if budget <= 0:
        raise ValueError(f"ρ = {rho:g} at B = {batch}: the latency alone ({latency:.3g} s) exceeds ρ·t_compute")
    return cm.Link(latency_us * 1e-6, cm.link_bytes(ref.payload, workers, topology, ref.collective) / budget)


def _figure1(trials: Sequence[TrialInput], target: Target, measured: dict, workers: Sequence[int]) -> list[dict]:
    """Per-pass speedup at B and P over one worker at the smallest B (vanilla's cost; the paper's Figure 1)."""
    ref = next((t for t in trials if t.record.mechanism == "vanilla"), trials[0])
    batches = sorted({t.record.global_batch_size for t in trials})
    grid = sorted({2**k for k in range(int(math.log2(batches[0])), int(math.log2(max(batches[-1], 8192))) + 1)})

    def pass_s(batch: int, p: int) -> float:
        t = TrialInput(**{**ref.__dict__, "record": _with_batch(ref.record, batch)})
        return cm.pass_time(ref.n or 60000, batch, _cost(t, p, target, measured))

    base = pass_s(grid[0], 1)
    return [
        {"workers": p, "global_batch_size": b, "projected_pass_speedup": base / pass_s(b, p)}
        for p in workers
        for b in grid
        if b >= p
    ]


def _with_batch(record: TrialRecord, batch: int) -> TrialRecord:
    return TrialRecord.from_dict({**record.__dict__, "status": str(record.status), "global_batch_size": batch})


def _rho_map(trials: Sequence[TrialInput], target: Target, measured: dict, workers: Sequence[int]) -> list[dict]:
    """Each mechanism's speedup over vanilla against ρ = t_comm / t_compute of vanilla's best (γ, B) at that P,
    varying the bandwidth (no latency) so that ρ runs over ``RHO_GRID``."""
    rows = []
    for p in workers:
        best = _best(trials, p, target, measured)
        if "vanilla" not in best or len(best) < 2:
            continue
        ref = best["vanilla"].trial
        ref_cost = _cost(ref, p, target, measured)
        moved = cm.link_bytes(ref.payload, p, target.topology, ref.collective)
        for rho in RHO_GRID:
            link = cm.Link(0.0, moved / (rho * ref_cost.compute_s)) if moved > 0 else target.link
            at_rho = _best(trials, p, target, measured, link)
            for mech, b in sorted(at_rho.items()):
                if mech != "vanilla" and "vanilla" in at_rho:
                    ratio, low, high = speedup_interval(at_rho["vanilla"], b)
                    rows.append(
                        {
                            "workers": p,
                            "rho": rho,
                            "mechanism": mech,
                            "global_batch_size": b.trial.record.global_batch_size,
                            "projected_speedup_vs_vanilla": ratio,
                            "projected_speedup_low": "" if low is None else low,
                            "projected_speedup_high": "" if high is None else high,
                        }
                    )
    return rows
