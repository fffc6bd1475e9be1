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

One module (about 500 lines) because it is one pipeline: reading the trials, the compute fit, the
projection and its four outputs share the same rows and are changed together.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raygd import costmodel as cm
from raygd.critical import fastest_batch
from raygd.profiles import COMPUTES, LINKS, MEASURED, PROFILES, ComputeProfile
from raygd.records import KIND_TAG, SWEEP_KIND, TrialRecord, child_runs, mlflow_client, params_target

PROJECTED = "projected"
DEFAULT_WORKERS = (2, 8, 32, 128, 256)
RHO_GRID = tuple(10 ** (k / 4) for k in range(-8, 9))
"""ρ from 0.01 to 100, four points per decade."""
INPUT_SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


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


@dataclass(frozen=True)
class TrialInput:
    """A trial's record and what the cost model needs from its run."""

    record: TrialRecord
    model: str
    mechanism_name: str
    quant_bucket_size: int
    n: int
    workers: int
    steps: int
    train_time_s: float
    num_params: int
    macs_per_example: float
    emulated: dict[str, Any] | None = None
    """The run's ``train.network.*`` when its time was emulated."""
    shaped_rate_mbit: float | None = None
    """The ``tbf`` rate of the shaped link its collectives crossed (tag ``raygd.network_rate_mbit``), if any."""
    target: str = "the target"
    """The run's target as ``TrainConfig.target_label`` words it (``train loss <= 1.8``)."""

    @property
    def step_s(self) -> float:
        return self.train_time_s / self.steps if self.steps else math.nan

    @property
    def payload(self) -> int:
        return cm.payload_bytes(self.num_params, self.mechanism_name, self.quant_bucket_size)

    @property
    def collective(self) -> str:
        return cm.collective_of(self.mechanism_name)

    @property
    def buckets(self) -> int:
        return cm.ddp_buckets(4 * self.num_params)


def builtin_model_size(model: str, data_name: str, features: int, num_classes: int) -> tuple[int, float]:
    """(parameters, forward multiply-accumulates per example) of raygd's built-in ``model``, for runs recorded
    before every run logged ``model.num_params`` and ``model.macs_per_example`` (``raygd.models.model_size``)."""
    import torch

    from raygd.models import build_model, model_size

    shape = INPUT_SHAPES.get(data_name, (features,))
    params, _, macs = model_size(build_model(model, shape, num_classes), torch.zeros(1, *shape))
    return params, macs


def _trial_input(run, sizes: dict) -> TrialInput:
    p, m = run.data.params, run.data.metrics
    key = (p.get("train.model", "logreg"), p.get("data.name", "synthetic"), p.get("data.synthetic_features", "32"))
    classes = int(p.get("data.num_classes", 10))
    if "model.num_params" in p and "model.macs_per_example" in p:  # any model: what the run measured of it
        params, macs = int(p["model.num_params"]), float(p["model.macs_per_example"])
    else:  # a run from before those params: a built-in model, rebuilt by name
        if (*key, classes) not in sizes:
            sizes[(*key, classes)] = builtin_model_size(key[0], key[1], int(key[2]), classes)
        params, macs = sizes[(*key, classes)]
    emulated = None
    if run.data.tags.get("raygd.network") == "emulated":
        emulated = {k.split(".")[-1]: v for k, v in p.items() if k.startswith("train.network.")}
    rate = run.data.tags.get("raygd.network_rate_mbit")
    target = params_target(p) or "the target"
    return TrialInput(
        target=target,
        record=TrialRecord.from_run(run),
        model=key[0],
        mechanism_name=p.get("mechanism.name", "vanilla"),
        quant_bucket_size=int(p.get("mechanism.quant_bucket_size", 512)),
        n=int(float(p.get("data.n", 0))),
        workers=int(p.get("train.num_workers", 1)),
        steps=int(m.get("steps", 0)),
        train_time_s=float(m.get("train_time_s", math.nan)),
        num_params=params,
        macs_per_example=macs,
        emulated=emulated,
        shaped_rate_mbit=None if rate is None else float(rate),
    )


def read_trials(tracking_uri: str, run_id: str) -> list[TrialInput]:
    """The trials of a sweep's parent run (its child runs), or the one run ``run_id`` itself."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    runs = child_runs(tracking_uri, run_id) if run.data.tags.get(KIND_TAG) == SWEEP_KIND else [run]
    sizes: dict = {}
    return [_trial_input(r, sizes) for r in runs if int(r.data.metrics.get("steps", 0)) > 0]


def _local_step_s(t: TrialInput) -> float:
    """The trial's step time without any emulated wait (the cost model's exposed wait for its link) and without
    the modelled transfer over a shaped link it crossed (``cm.shaped_link`` at its rate, no overlap: DDP's
    all-reduce of one bucket waits for the whole backward, and gloo's transfer is measured as such)."""
    step_s = t.step_s
    if t.shaped_rate_mbit is not None:
        link = cm.shaped_link(t.shaped_rate_mbit)
        step_s -= cm.comm_time(t.payload, t.workers, link, "ring", t.collective, t.buckets)
    if not t.emulated:
        return step_s
    link = cm.Link.from_gbps_us(float(t.emulated["bandwidth_gbps"]), float(t.emulated["latency_us"]))
    comm = cm.comm_time(t.payload, t.workers, link, t.emulated.get("topology", "ring"), t.collective, t.buckets)
    overlap = float(t.emulated.get("overlap", 0.0))
    return step_s - cm.exposed_comm(comm, max(step_s - comm, 0.0), overlap)


def fit_measured_compute(trials: Sequence[TrialInput]) -> dict[tuple[str, str], tuple[cm.Compute, cm.LineFit | None]]:
    """Per (model, mechanism label): t = fixed + c·(B/P) over the trials' local step times (one B/P: c = t/(B/P))."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for t in trials:
        if math.isfinite(t.step_s):
            groups[(t.model, t.record.mechanism)].append((t.record.global_batch_size / t.workers, _local_step_s(t)))
    fits: dict[tuple[str, str], tuple[cm.Compute, cm.LineFit | None]] = {}
    for key, points in groups.items():
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        if len(set(xs)) >= 2:
            fits[key] = cm.fit_compute(xs, ys)
        else:
            fits[key] = (cm.Compute(per_example_s=statistics.median(ys) / xs[0]), None)
    return fits


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


# --------------------------------------------------------------------------- outputs


def _speedup_cell(row: dict) -> str:
    """``0.66 (0.58–0.75)``, ``n.s.`` appended when the interval covers 1.0; the point alone with one seed."""
    ratio, low, high = row["projected_speedup_vs_vanilla"], row["projected_speedup_low"], row["projected_speedup_high"]
    if ratio == "":
        return ""
    if low == "" or high == "":
        return f"{ratio:.2f}"
    return f"{ratio:.2f} ({low:.2f}–{high:.2f})" + (" n.s." if low <= 1.0 <= high else "")


def table(proj: Projection) -> str:
    """The markdown table of the best (γ, B) per mechanism and P, headed by what was projected onto what."""

    targets = sorted({r["target"] for r in proj.trials}) or ["the target"]
    lines = [
        f"PROJECTED onto {proj.target.describe()}",
        f"(time to {' / '.join(targets)}: measured updates to target × modelled time per update; trials that did "
        "not reach the target are not extrapolated; TTA: mean over the pair's seeds; speedup: ratio of means "
        "with its 95% bootstrap interval over seeds; B: the largest B that still gets faster, the B of least "
        "projected TTA, with its 95% interval over seeds)",
        "",
        "| P | mechanism | γ | B | seeds | projected TTA (s) | projected speedup vs vanilla | ρ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in proj.best:
        batch = str(row["global_batch_size"])
        if row["fastest_batch_low"] != "":
            batch += f" ({row['fastest_batch_low']}–{row['fastest_batch_high']})"
        lines.append(
            f"| {row['workers']} | {row['mechanism']} | {row['step_size']:g} | {batch} | "
            f"{row['seeds']} | {row['projected_time_to_accuracy_s']:.3g} | {_speedup_cell(row)} | "
            f"{row['projected_rho']:.2g} |"
        )
    if any(_speedup_cell(r).endswith("n.s.") for r in proj.best):
        lines.append("\nn.s.: the speedup's 95% bootstrap interval over seeds covers 1.0× (not significant).")
    unreached = {r["trial_id"] for r in proj.trials if r["status"].startswith("not reached")}
    if unreached:
        lines.append(f"\n{len(unreached)} trial(s) did not reach the target: no projected time (not extrapolated).")
    if not proj.best:
        lines.append("\nno (γ, B) reached the target with every seed: nothing to rank.")
    return "\n".join(lines)


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figures(proj: Projection, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if proj.figure1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in proj.workers:
            rows = [r for r in proj.figure1 if r["workers"] == p]
            ax.plot(
                [r["global_batch_size"] for r in rows],
                [r["projected_pass_speedup"] for r in rows],
                "o-",
                label=f"P={p}",
            )
        ax.set(xscale="log", yscale="log", xlabel="B", ylabel="projected speedup per pass")
        ax.set_title(f"PROJECTED: {proj.target.name}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "projected_figure1.png")
        fig.savefig(written[-1])
        plt.close(fig)
    if proj.rho_map:  # one panel per P, a colour per mechanism, its 95% interval over seeds as a band
        ps = sorted({r["workers"] for r in proj.rho_map})
        mechs = sorted({r["mechanism"] for r in proj.rho_map})
        colours = {m: f"C{i % 10}" for i, m in enumerate(mechs)}
        fig, axes = plt.subplots(1, len(ps), figsize=(3.2 * len(ps) + 1, 3.6), sharey=True, squeeze=False)
        for ax, p in zip(axes[0], ps, strict=True):
            for mech in mechs:
                rows = [r for r in proj.rho_map if r["mechanism"] == mech and r["workers"] == p]
                if not rows:
                    continue
                rhos = [r["rho"] for r in rows]
                ax.plot(rhos, [r["projected_speedup_vs_vanilla"] for r in rows], color=colours[mech], label=mech)
                band = [r for r in rows if r["projected_speedup_low"] != ""]
                if band:
                    ax.fill_between(
                        [r["rho"] for r in band],
                        [r["projected_speedup_low"] for r in band],
                        [r["projected_speedup_high"] for r in band],
                        color=colours[mech],
                        alpha=0.15,
                        lw=0,
                    )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(xscale="log", xlabel="ρ = t_comm / t_compute", title=f"P = {p}")
        axes[0][0].set_ylabel("projected speedup vs vanilla")
        axes[0][-1].legend(fontsize=6)
        fig.suptitle("PROJECTED speedup against ρ of vanilla's best (γ, B) (band: 95% interval over seeds)", fontsize=9)
        fig.tight_layout()
        written.append(folder / "projected_rho_map.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def write_outputs(proj: Projection, folder: Path) -> list[Path]:
    """projected.md, the four CSVs and the two PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "projected.md").write_text(table(proj) + f"\n\nSources: {proj.target.sources}\n")
    for name, rows in (
        ("projected_trials.csv", proj.trials),
        ("projected_best.csv", proj.best),
        ("projected_figure1.csv", proj.figure1),
        ("projected_rho_map.csv", proj.rho_map),
        ("projected_compute_fits.csv", proj.fits),
    ):
        _csv(folder / name, rows)
    _figures(proj, folder)
    return sorted(folder.iterdir())


def log_to_run(tracking_uri: str, run_id: str, folder: Path) -> None:
    """Log the outputs under ``projected/`` in ``run_id`` (the sweep's parent run), whether it is running or not."""
    client = mlflow_client(tracking_uri)
    client.log_artifacts(run_id, str(folder), PROJECTED)
