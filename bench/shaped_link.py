"""The projection checked against real packets: two Ray nodes on one machine over a ``tc tbf``-shaped link.

``tests/netlink.py`` makes the link (a veth pair from the root namespace into a namespace of its own,
``tbf`` on both ends) and the cluster (head here with 1 CPU, a worker node with 1 CPU in the namespace),
so a sweep's P = 2 Ray Train workers sit one per node and DDP's gloo all-reduce crosses the link over
TCP. Then, one model after the other:

1. calibration, as on a cluster: timed gloo all-reduces of 1 KB–16 MB across the link (P = 2, capped at
   ~2 s a transfer at the slow rates) at every rate, fitted as t = 2α + bytes/β (``raygd.costmodel.fit_link``),
   the fitted β against the ``tbf`` rate and against ``raygd.costmodel.shaped_link``'s goodput, residuals;
2. per model, the same grid swept by ``raygd sweep`` unshaped (the veth's own speed) and at each rate
   (``set_rate`` reshapes the running cluster), every run tagged ``raygd.network = shaped`` at its rate;
3. per trial: its measured time to accuracy over the shaped link against ``raygd project`` of the
   *unshaped* sweep onto ``shaped_link(rate)`` (the unshaped trials' updates × their fitted compute + the
   modelled transfer); the median |error|, the worst, and whether the winning (γ, B) per mechanism agrees.

Runs only as root with ``ip`` and ``tc``. Outputs: ``bench/out/shaped_link.md`` (+ ``shaped_link.csv`` and
``shaped_link.png``), the MLflow store in ``bench/out/shaped_link/mlflow.db``; the load average beside every figure.

    .venv/bin/python -m bench.shaped_link --quick        # ≤ 20 minutes: fewer trials, fewer sizes
    .venv/bin/python -m bench.shaped_link                # both grids in full
    .venv/bin/python -m bench.shaped_link --calibrate-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.pairing import SAY, LoadAverage, provenance
from raygd import costmodel as cm

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
STORE = OUT / "shaped_link"
SIZES = tuple(1 << k for k in range(10, 25, 2))
"""1 KB … 16 MB, a factor of 4 apart."""
MAX_TRANSFER_S = 2.0
"""Calibration sizes above ~this many seconds at a rate are left out (16 MB at 1 Mbit/s would take 2 min)."""


# --------------------------------------------------------------------------- calibration


def _collective_worker(spec: dict) -> None:
    """One rank of the calibration (run in each namespace): median-free raw times of each size, rank 0 writes."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR=spec["master"], MASTER_PORT=str(spec["port"]), GLOO_SOCKET_IFNAME=spec["ifname"])
    dist.init_process_group("gloo", rank=spec["rank"], world_size=2)
    try:
        times: dict[int, list[float]] = {}
        for size in spec["sizes"]:
            t = torch.ones(size // 4)
            dist.all_reduce(t)  # warm-up: connection buffers, TCP windows
            runs = []
            for _ in range(spec["reps"]):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                runs.append(time.perf_counter() - t0)
            times[size] = runs
        if spec["rank"] == 0:
            Path(spec["out"]).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def time_collectives(link, sizes: list[int], reps: int) -> dict[int, list[float]]:
    """All-reduce times of each size across ``link`` (rank 0 in the root namespace, rank 1 in the link's)."""
    from tests.localray import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        base = {"master": link.host_ip, "port": free_port(), "sizes": sizes, "reps": reps, "out": str(out)}
        procs = []
        for rank, ifname, prefix in (
            (0, link.host_dev, []),
            (1, link.node_dev, ["ip", "netns", "exec", link.namespace]),
        ):
            spec = json.dumps({**base, "rank": rank, "ifname": ifname})
            cmd = [*prefix, sys.executable, "-m", "bench.shaped_link", "--collective-worker", spec]
            procs.append(subprocess.Popen(cmd, cwd=REPO))
        codes = [p.wait(timeout=900) for p in procs]
        if any(codes):
            raise RuntimeError(f"calibration ranks exited with {codes}")
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


@dataclass
class Calibration:
    """One rate's timed collectives and their fit t = 2α + bytes/β."""

    rate_mbit: float | None
    sizes: list[int]
    medians: list[float]
    spread: list[tuple[float, float]]
    link: cm.Link
    fit: cm.LineFit

    @property
    def fitted_mbit(self) -> float:
        return self.link.bandwidth_bytes_per_s * 8 / 1e6

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"tbf {self.rate_mbit:g} Mbit/s"
        model = ""
        if self.rate_mbit is not None:
            goodput = cm.shaped_link(self.rate_mbit).bandwidth_bytes_per_s * 8 / 1e6
            model = (
                f" = {self.fitted_mbit / self.rate_mbit:.3f} × rate (costmodel.shaped_link: {goodput:.1f} Mbit/s, "
                f"{goodput / self.rate_mbit:.3f} × rate)"
            )
        residuals = ", ".join(
            f"{_size(s)} {r / m:+.0%}" for s, r, m in zip(self.sizes, self.fit.residuals, self.medians, strict=True)
        )
        return (
            f"- {rate}: β = {self.fitted_mbit:.1f} Mbit/s{model}, α = {self.link.latency_s * 1e6:.0f} µs; "
            f"relative residuals {residuals}"
        )


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def calibrate(link, rates: list[float | None], sizes: tuple[int, ...], reps: int) -> list[Calibration]:
    """Time and fit every rate (``None``: unshaped), each on the same link reshaped."""
    out = []
    for rate in rates:
        link.set_rate(rate)
        cap = [s for s in sizes if rate is None or s * 8 / (rate * 1e6) <= MAX_TRANSFER_S]
        times = time_collectives(link, cap, reps)
        medians = [statistics.median(times[s]) for s in cap]
        moved = [cm.link_bytes(s, 2) for s in cap]
        fitted, fit = cm.fit_link(moved, medians, terms=2)
        spread = [(min(times[s]), max(times[s])) for s in cap]
        out.append(Calibration(rate, cap, medians, spread, fitted, fit))
        SAY(out[-1].describe())
    return out


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Grid:
    """One model's sweep: the ``raygd sweep`` preset and ``--set`` overrides, and the rates it runs at."""

    name: str
    preset: str
    sets: tuple[str, ...]
    rates: tuple[float, ...]


def grids(quick: bool) -> list[Grid]:
    """The quickstart grid (logistic regression) and a CNN grid, at rates that span ρ ≈ 0.1 to ≥ 10."""
    common = ("sweep.extend_edges=false", "train.diversity_estimator=none")
    logreg = Grid(
        "logreg",
        "quickstart",
        (*common, "sweep.space.step_size=[0.4]") if quick else common,
        (100.0, 10.0, 1.0),
    )
    cnn_space = "sweep.space.global_batch_size=[128, 512]" if quick else "sweep.space.global_batch_size=[64, 256, 1024]"
    cnn = Grid(
        "cnn",
        "dropconnect-speedup",
        (
            *common,
            "data.train_size=10000",
            "data.eval_size=1000",
            "train.target_accuracy=0.7",
            "train.max_passes=4",
            "train.eval_every_passes=0.05",
            "sweep.space.step_size=[0.1]",
            cnn_space,
            "sweep.space.mechanism=[{name: vanilla}]",
        ),
        (1000.0, 100.0, 30.0),
    )
    return [logreg, cnn]


@dataclass
class SweepRun:
    grid: str
    rate_mbit: float | None
    parent_run_id: str
    wall_s: float
    load: str
    trials: list = field(default_factory=list)


def run_sweep(cluster, grid: Grid, rate: float | None, uri: str, tag: str) -> SweepRun:
    """``raygd sweep`` of ``grid`` at ``rate`` on ``cluster`` (a driver here, over the link's head end)."""
    from raygd import project
    from raygd.records import latest_sweep

    cluster.set_rate(rate)
    name = f"shaped-{tag}-{grid.name}-{'unshaped' if rate is None else f'{rate:g}mbit'}"
    cmd = [
        str(REPO / ".venv" / "bin" / "raygd"), "sweep", grid.preset, *[a for s in grid.sets for a in ("--set", s)],
        "--set", f"sweep.name={name}", "--set", f"tracking.tracking_uri={uri}",
        "--set", f"sweep.storage_path={cluster.root / 'tune'}",
    ]  # fmt: skip
    load = LoadAverage()
    start = time.monotonic()
    out = subprocess.run(cmd, env=cluster.driver_env(), cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - start
    load.stop()
    if out.returncode != 0:
        raise RuntimeError(f"{name} exited with {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    parent = latest_sweep(uri, name)
    SAY(f"  {name}: {wall:.0f} s, {load}")
    return SweepRun(grid.name, rate, parent, wall, str(load), project.read_trials(uri, parent))


# --------------------------------------------------------------------------- comparison


def compare(unshaped: SweepRun, shaped: SweepRun, link: cm.Link) -> list[dict]:
    """Per shaped trial: its measured TTA against the unshaped sweep's projection onto ``link`` (P = 2)."""
    from raygd import project

    target = project.Target(f"shaped {shaped.rate_mbit:g} Mbit/s", link)
    proj = project.project(unshaped.trials, target, [2])
    by_key = {(r["mechanism"], r["step_size"], r["global_batch_size"], r["seed"]): r for r in proj.trials}
    rows = []
    for t in shaped.trials:
        r = t.record
        p = by_key.get((r.mechanism, r.step_size, r.global_batch_size, r.seed))
        if p is None:
            continue
        projected = p["projected_time_to_accuracy_s"]
        measured = r.time_to_accuracy_s
        rows.append(
            {
                "grid": shaped.grid,
                "rate_mbit": shaped.rate_mbit,
                "mechanism": r.mechanism,
                "step_size": r.step_size,
                "global_batch_size": r.global_batch_size,
                "seed": r.seed,
                "updates_unshaped": p["updates_to_accuracy"],
                "updates_shaped": r.updates_to_accuracy,
                "projected_rho": p["projected_rho"],
                "projected_step_s": p["projected_step_s"],
                "measured_step_s": t.step_s,
                "projected_tta_s": projected,
                "measured_tta_s": measured,
                "error": (projected - measured) / measured if projected != "" and measured else "",
            }
        )
    return rows


def winners(rows: list[dict], column: str) -> dict[str, tuple[float, int]]:
    """Per mechanism: the (γ, B) with the smallest ``column`` (mean over seeds; every seed reached)."""
    pairs: dict[tuple, list[float]] = {}
    for r in rows:
        key = (r["mechanism"], r["step_size"], r["global_batch_size"])
        value = r[column]
        pairs.setdefault(key, []).append(value if value not in ("", None) else float("inf"))
    best: dict[str, tuple[float, tuple[float, int]]] = {}
    for (mech, step, batch), values in pairs.items():
        mean = statistics.fmean(values)
        if mean < float("inf") and (mech not in best or mean < best[mech][0]):
            best[mech] = (mean, (step, batch))
    return {m: pair for m, (_, pair) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and sizes: ≤ 20 minutes")
    parser.add_argument("--calibrate-only", action="store_true", help="the link calibration alone")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per calibration size")
    parser.add_argument("--collective-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collective_worker:
        _collective_worker(json.loads(args.collective_worker))
        return
    sys.path.insert(0, str(REPO))
    from tests.netlink import ShapedRayCluster, unavailable

    reason = unavailable()
    if reason:
        SAY(f"bench.shaped_link: cannot run here: {reason}")
        sys.exit(2)
    run(args, ShapedRayCluster)


def run(args, cluster_class) -> None:
    """Calibrate, sweep and compare (``main``), the cluster and its link removed at the end, whatever happens."""
    load = LoadAverage()
    reps = args.reps or (5 if args.quick else 9)
    plan = grids(args.quick)
    rates = sorted({r for g in plan for r in g.rates}, reverse=True)
    tag = time.strftime("%m%d%H%M")
    STORE.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    lines = [f"# bench.shaped_link ({provenance()}){' --quick' if args.quick else ''}", ""]
    SAY(lines[0])
    with cluster_class(rate_mbit=None) as cluster:
        if args.calibrate_only:
            cluster.link.up()
            calibrations = calibrate(cluster.link, [None, *rates], SIZES, reps)
        else:
            cluster.start()
            SAY(f"cluster up: head {cluster.link.host_ip}, node {cluster.link.node_ip} in {cluster.link.namespace}")
            calibrations = calibrate(cluster.link, [None, *rates], SIZES, reps)
        lines += _calibration_lines(calibrations, reps)
        if not args.calibrate_only:
            rows, sweeps = [], []
            for grid in plan:
                unshaped = run_sweep(cluster, grid, None, uri, tag)
                sweeps.append(unshaped)
                for rate in grid.rates:
                    shaped = run_sweep(cluster, grid, rate, uri, tag)
                    sweeps.append(shaped)
                    rows += compare(unshaped, shaped, cm.shaped_link(rate))
            lines += _comparison_lines(rows, sweeps)
            _write_csv(rows)
            _figure(rows)
    load.stop()
    lines += ["", f"whole bench: {load}"]
    text = "\n".join(lines)
    SAY(text)
    OUT.mkdir(exist_ok=True)
    (OUT / ("shaped_link_calibration.md" if args.calibrate_only else "shaped_link.md")).write_text(text + "\n")


def _calibration_lines(calibrations: list[Calibration], reps: int) -> list[str]:
    return [
        f"## Calibration: gloo all-reduce across the link (P = 2), median of {reps}, fitted t = 2α + bytes/β",
        "",
        *[c.describe() for c in calibrations],
        "",
    ]


def _comparison_lines(rows: list[dict], sweeps: list[SweepRun]) -> list[str]:
    lines = [
        "## Measured over the shaped link against the projection of the unshaped sweep",
        "",
        "| grid | rate Mbit/s | mechanism | γ | B | updates unshaped / shaped | ρ | projected s | measured s | error |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        proj = "" if r["projected_tta_s"] == "" else f"{r['projected_tta_s']:.2f}"
        meas = "" if r["measured_tta_s"] is None else f"{r['measured_tta_s']:.2f}"
        err = "" if r["error"] == "" else f"{r['error']:+.1%}"
        lines.append(
            f"| {r['grid']} | {r['rate_mbit']:g} | {r['mechanism']} | {r['step_size']:g} | {r['global_batch_size']} | "
            f"{r['updates_unshaped']} / {r['updates_shaped']} | {r['projected_rho']:.2g} | {proj} | {meas} | {err} |"
        )
    errors = [abs(r["error"]) for r in rows if r["error"] != ""]
    settings = sorted({(r["grid"], r["rate_mbit"]) for r in rows})
    per_setting = []
    agree = []
    for grid, rate in settings:
        sub = [r for r in rows if (r["grid"], r["rate_mbit"]) == (grid, rate)]
        errs = [abs(r["error"]) for r in sub if r["error"] != ""]
        w_proj, w_meas = winners(sub, "projected_tta_s"), winners(sub, "measured_tta_s")
        same = w_proj == w_meas
        agree.append(same)
        per_setting.append(
            f"- {grid} at {rate:g} Mbit/s: median |error| {statistics.median(errs):.1%} (worst {max(errs):.1%}), "
            f"winner projected {_pairs(w_proj)}, measured {_pairs(w_meas)}: {'same' if same else 'DIFFERENT'}"
            if errs
            else f"- {grid} at {rate:g} Mbit/s: nothing reached"
        )
    if errors:
        lines += [
            "",
            f"{len(errors)} trials in {len(settings)} settings (grid × rate): median |error| "
            f"{statistics.median(errors):.1%}, worst {max(errors):.1%} (goal: median ≤ 10%); winning (γ, B) the same "
            f"in {sum(agree)} of {len(agree)} settings",
            "",
            *per_setting,
        ]
    lines += ["", "Sweeps (wall time, load while each ran):", ""]
    lines += [
        f"- {s.grid} {'unshaped' if s.rate_mbit is None else f'{s.rate_mbit:g} Mbit/s'}: parent run "
        f"{s.parent_run_id}, {s.wall_s:.0f} s, {s.load}"
        for s in sweeps
    ]
    return lines


def _pairs(w: dict) -> str:
    return ", ".join(f"{m} γ {s:g} B {b}" for m, (s, b) in sorted(w.items())) or "none"


def _write_csv(rows: list[dict]) -> None:
    if not rows:
        return
    OUT.mkdir(exist_ok=True)
    with (OUT / "shaped_link.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figure(rows: list[dict]) -> None:
    """Measured against projected time to accuracy, one colour per grid, the diagonal ±10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["error"] != ""]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for i, grid in enumerate(sorted({r["grid"] for r in done})):
        sub = [r for r in done if r["grid"] == grid]
        ax.scatter([r["projected_tta_s"] for r in sub], [r["measured_tta_s"] for r in sub], s=14, c=f"C{i}", label=grid)
    lo = min(min(r["projected_tta_s"], r["measured_tta_s"]) for r in done) * 0.8
    hi = max(max(r["projected_tta_s"], r["measured_tta_s"]) for r in done) * 1.2
    for k, style in ((1.0, "-"), (1.1, ":"), (0.9, ":")):
        ax.plot([lo, hi], [lo * k, hi * k], style, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="projected time to accuracy (s)", ylabel="measured over tbf link (s)")
    ax.set_title("shaped link: measured vs PROJECTED (dotted: ±10%)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "shaped_link.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
