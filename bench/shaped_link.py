"""The projection checked against real packets: two Ray nodes on one machine over a ``tc tbf``-shaped link.

``tests/netlink.py`` makes the link (a veth pair from the root namespace into a namespace of its own,
``tbf`` on both ends) and the cluster (head here with 1 CPU, a worker node with 1 CPU in the namespace),
so a sweep's P = 2 Ray Train workers sit one per node and DDP's gloo all-reduce crosses the link over
TCP. Then, one model after the other:

1. calibration, as on a cluster (``bench.shaped_calibration``): timed gloo all-reduces of 1 KB–16 MB across the
   link (P = 2, capped at ~2 s a transfer at the slow rates) at every rate, fitted as t = 2α + bytes/β
   (``raygd.costmodel.fit_link_regimes``), the fitted β against the ``tbf`` rate and against
   ``raygd.costmodel.shaped_link``'s goodput, residuals;
2. per model, the same grid swept by ``raygd sweep`` unshaped (the veth's own speed) and at each rate, one
   cluster per rate (its nodes' environment names it), every run tagged ``raygd.network = shaped`` at its rate;
3. per trial: its measured time to accuracy over the shaped link against ``raygd project`` of the
   *unshaped* sweep onto the link calibrated at that rate (the unshaped trials' updates × their fitted
   compute, the calibrated unshaped transfer taken out first, + the calibrated transfer); the median
   |error|, the worst, and whether the winning (γ, B) per mechanism agrees. Beside it: the same onto
   ``costmodel.shaped_link(rate)`` (no calibration), and without taking the unshaped transfer out.

Runs only as root with ``ip`` and ``tc``. Outputs: ``bench/out/shaped_link.md`` (+ ``shaped_link.csv`` and
``shaped_link.png``), the MLflow store in ``bench/out/shaped_link/mlflow.db``; the load average beside every figure.

    .venv/bin/python -m bench.shaped_link --quick        # ≤ 20 minutes: fewer trials, fewer sizes
    .venv/bin/python -m bench.shaped_link                # both grids in full
    .venv/bin/python -m bench.shaped_link --smoke        # the whole path in minutes (synthetic, one rate)
    .venv/bin/python -m bench.shaped_link --quick --report   # the outputs again from the saved state and store
    .venv/bin/python -m bench.shaped_link --calibrate-only
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.pairing import SAY, LoadAverage, provenance
from bench.shaped_calibration import SIZES, calibrate, calibration_lines, fitted
from raygd import costmodel as cm

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
STORE = OUT / "shaped_link"

# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Grid:
    """One model's sweep: the ``raygd sweep`` preset and ``--set`` overrides, and the rates it runs at."""

    name: str
    preset: str
    sets: tuple[str, ...]
    rates: tuple[float, ...]


SMOKE = Grid(
    "smoke",
    "quickstart",
    (
        "sweep.extend_edges=false", "train.diversity_estimator=none", "data.name=synthetic",
        "data.synthetic_features=2048", "data.synthetic_size=1024", "data.train_size=null", "data.eval_size=256",
        "train.max_passes=2", "train.eval_every_passes=0.25", "train.target_accuracy=0.5",
        "sweep.space.step_size=[0.1]", "sweep.space.global_batch_size=[64, 128]",
        "sweep.space.mechanism=[{name: vanilla}]",
    ),
    (10.0,),
)  # fmt: skip
"""``--smoke``: the whole path in a few minutes (synthetic data, logistic regression, one rate)."""


def grids(quick: bool, smoke: bool = False) -> list[Grid]:
    """The quickstart grid (logistic regression) and a CNN grid, at rates that span ρ ≈ 0.1 to ≥ 10."""
    if smoke:
        return [SMOKE]
    common = ("sweep.extend_edges=false", "train.diversity_estimator=none")
    logreg = Grid(
        "logreg",
        "quickstart",
        (*common, "sweep.space.step_size=[0.4]") if quick else common,
        (100.0, 30.0, 3.0),
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


def run_sweep(cluster, grid: Grid, uri: str, tag: str) -> SweepRun:
    """``raygd sweep`` of ``grid`` on ``cluster`` at its link's rate (a driver here, on the head's side)."""
    from raygd import project
    from raygd.records import latest_sweep

    rate = cluster.link.rate_mbit
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


def without_local_link(trials: list, local: cm.Link) -> list:
    """The unshaped trials with the calibrated unshaped veth's transfer taken out of their training time: what
    ``raygd project`` fits as compute should not hold this machine's own all-reduce (1.2–2 Gbit/s here)."""
    import dataclasses

    return [
        dataclasses.replace(
            t,
            train_time_s=t.train_time_s
            - t.steps * cm.comm_time(t.payload, t.workers, local, "ring", t.collective, t.buckets),
        )
        for t in trials
    ]


def _projected(trials: list, link: cm.Link, name: str) -> dict[tuple, dict]:
    from raygd import project

    proj = project.project(trials, project.Target(name, link), [2])
    return {(r["mechanism"], r["step_size"], r["global_batch_size"], r["seed"]): r for r in proj.trials}


def compare(unshaped: SweepRun, shaped: SweepRun, link: cm.Link, local: cm.Link) -> list[dict]:
    """Per shaped trial: its measured TTA against the unshaped sweep's projection onto the calibrated ``link``
    (P = 2; the unshaped link ``local`` taken out first), and, beside it, onto ``costmodel.shaped_link(rate)``
    (the model alone, α = 0) and without taking ``local`` out."""
    assert shaped.rate_mbit is not None
    name = f"shaped {shaped.rate_mbit:g} Mbit/s"
    calibrated = _projected(without_local_link(unshaped.trials, local), link, name)
    model = _projected(without_local_link(unshaped.trials, local), cm.shaped_link(shaped.rate_mbit), name)
    raw = _projected(unshaped.trials, link, name)

    def err(p: dict | None, measured: float | None) -> float | str:
        if p is None or p["projected_time_to_accuracy_s"] == "" or not measured:
            return ""
        return (p["projected_time_to_accuracy_s"] - measured) / measured

    rows = []
    for t in shaped.trials:
        r = t.record
        key = (r.mechanism, r.step_size, r.global_batch_size, r.seed)
        p = calibrated.get(key)
        if p is None:
            continue
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
                "projected_tta_s": p["projected_time_to_accuracy_s"],
                "measured_tta_s": measured,
                "error": err(p, measured),
                "error_model_link": err(model.get(key), measured),
                "error_local_link_kept": err(raw.get(key), measured),
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials and sizes: ≤ 20 minutes")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, one rate, three sizes: minutes")
    parser.add_argument("--calibrate-only", action="store_true", help="the link calibration alone")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per calibration size")
    parser.add_argument("--report", action="store_true", help="rebuild the outputs from the saved state and store")
    args = parser.parse_args()
    if args.report:
        report(json.loads((STORE / f"{_name(args)}.json").read_text()), _name(args))
        return
    sys.path.insert(0, str(REPO))
    from tests.netlink import ShapedLink, ShapedRayCluster, unavailable

    reason = unavailable()
    if reason:
        SAY(f"bench.shaped_link: cannot run here: {reason}")
        sys.exit(2)
    run(args, ShapedRayCluster, ShapedLink)


def run(args, cluster_class, link_class) -> None:
    """Calibrate on a bare link, then one cluster per rate (a node's environment names its rate): every grid's
    unshaped sweep first, then each rate's; the state (calibration medians, sweeps' parent runs, loads) saved in
    ``bench/out/shaped_link/<name>.json`` after each step; then ``report``. Each link and cluster is removed
    whatever happens."""
    load = LoadAverage()
    reps = args.reps or (3 if args.smoke else 5 if args.quick else 9)
    plan = grids(args.quick, args.smoke)
    sizes = (1 << 10, 1 << 16, 1 << 20) if args.smoke else SIZES
    rates = sorted({r for g in plan for r in g.rates}, reverse=True)
    tag = time.strftime("%m%d%H%M")
    STORE.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    name = _name(args)
    mode = " --smoke" if args.smoke else " --quick" if args.quick else ""
    state: dict = {"title": f"# bench.shaped_link{mode} ({provenance()})", "uri": uri, "reps": reps, "sweeps": []}
    SAY(state["title"])
    calibration_load = LoadAverage()
    with link_class(rate_mbit=None) as link:
        calibrations = calibrate(link, [None, *rates], sizes, reps)
    state["calibration_load"] = str(calibration_load.stop())
    state["calibrations"] = [
        {"rate_mbit": c.rate_mbit, "sizes": c.sizes, "medians": c.medians, "spread": c.spread} for c in calibrations
    ]
    _save(state, name)
    if not args.calibrate_only:
        for rate in [None, *rates]:
            with cluster_class(rate_mbit=rate) as cluster:
                cluster.start()
                SAY(f"cluster at {rate or 'no'} Mbit/s: head {cluster.link.host_ip}, node {cluster.link.node_ip}")
                for grid in plan:
                    if rate is None or rate in grid.rates:
                        sweep = run_sweep(cluster, grid, uri, tag)
                        state["sweeps"].append(
                            {
                                "grid": grid.name,
                                "rate_mbit": rate,
                                "parent": sweep.parent_run_id,
                                "wall_s": sweep.wall_s,
                            }
                            | {"load": sweep.load}
                        )
                        _save(state, name)
    state["load"] = str(load.stop())
    _save(state, name)
    report(state, name)


def _name(args) -> str:
    return "shaped_link_smoke" if args.smoke else "shaped_link_calibration" if args.calibrate_only else "shaped_link"


def _save(state: dict, name: str) -> None:
    (STORE / f"{name}.json").write_text(json.dumps(state, indent=1))


def report(state: dict, name: str) -> None:
    """Fit, compare and write ``bench/out/<name>.md`` (+ .csv, .png) from a saved state and the MLflow store."""
    from raygd import project

    calibrations = {
        c["rate_mbit"]: fitted(c["rate_mbit"], c["sizes"], c["medians"], c["spread"]) for c in state["calibrations"]
    }
    lines = [state["title"], ""]
    lines += calibration_lines(list(calibrations.values()), state["reps"], state["calibration_load"])
    sweeps = [
        SweepRun(
            s["grid"],
            s["rate_mbit"],
            s["parent"],
            s["wall_s"],
            s["load"],
            project.read_trials(state["uri"], s["parent"]),
        )
        for s in state["sweeps"]
    ]
    if sweeps:
        unshaped = {s.grid: s for s in sweeps if s.rate_mbit is None}
        rows = []
        for s in sweeps:
            if s.rate_mbit is not None and s.grid in unshaped:
                rows += compare(unshaped[s.grid], s, calibrations[s.rate_mbit].link, calibrations[None].link)
        lines += _comparison_lines(rows, sweeps)
        _write_csv(rows, name)
        _figure(rows, name)
    lines += ["", f"whole bench: {state.get('load', 'unfinished')}"]
    text = "\n".join(lines)
    SAY(text)
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.md").write_text(text + "\n")


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
            f"- {grid} at {rate:g} Mbit/s (ρ {_rho_range(sub)}): median |error| {statistics.median(errs):.1%} "
            f"(range {min(r['error'] for r in sub if r['error'] != ''):+.1%} to "
            f"{max(r['error'] for r in sub if r['error'] != ''):+.1%}), "
            f"winner projected {_pairs(w_proj)}, measured {_pairs(w_meas)}: {'same' if same else 'DIFFERENT'}"
            if errs
            else f"- {grid} at {rate:g} Mbit/s: nothing reached"
        )
    if errors:
        model = [abs(r["error_model_link"]) for r in rows if r["error_model_link"] != ""]
        kept = [abs(r["error_local_link_kept"]) for r in rows if r["error_local_link_kept"] != ""]
        lines += [
            "",
            f"{len(errors)} trials in {len(settings)} settings (grid × rate): median |error| "
            f"{statistics.median(errors):.1%}, worst {max(errors):.1%} (goal: median ≤ 10%); winning (γ, B) the same "
            f"in {sum(agree)} of {len(agree)} settings. Onto costmodel.shaped_link(rate) uncalibrated: median "
            f"{statistics.median(model):.1%}, worst {max(model):.1%}; calibrated but the unshaped transfer left in "
            f"the compute fit: median {statistics.median(kept):.1%}, worst {max(kept):.1%}",
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


def _rho_range(rows: list[dict]) -> str:
    rhos = [r["projected_rho"] for r in rows]
    return f"{min(rhos):.2g}–{max(rhos):.2g}"


def _pairs(w: dict) -> str:
    return ", ".join(f"{m} γ {s:g} B {b}" for m, (s, b) in sorted(w.items())) or "none"


def _write_csv(rows: list[dict], name: str) -> None:
    if not rows:
        return
    OUT.mkdir(exist_ok=True)
    with (OUT / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figure(rows: list[dict], name: str) -> None:
    """Measured against projected time to accuracy, one colour per grid, the diagonal ±10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["error"] != ""]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    rates = sorted({r["rate_mbit"] for r in done}, reverse=True)
    markers = dict(zip(rates, "osD^vP", strict=False))
    for i, grid in enumerate(sorted({r["grid"] for r in done})):
        for rate in rates:
            sub = [r for r in done if r["grid"] == grid and r["rate_mbit"] == rate]
            if sub:
                ax.scatter(
                    [r["projected_tta_s"] for r in sub],
                    [r["measured_tta_s"] for r in sub],
                    s=22,
                    c=f"C{i}",
                    marker=markers.get(rate, "o"),
                    label=f"{grid}, tbf {rate:g} Mbit/s",
                )
    lo = min(min(r["projected_tta_s"], r["measured_tta_s"]) for r in done) * 0.8
    hi = max(max(r["projected_tta_s"], r["measured_tta_s"]) for r in done) * 1.2
    for k, style in ((1.0, "-"), (1.1, ":"), (0.9, ":")):
        ax.plot([lo, hi], [lo * k, hi * k], style, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="projected time to accuracy (s)", ylabel="measured over tbf link (s)")
    ax.set_title("SHAPED link (tc tbf, one machine): measured vs PROJECTED, a trial each (dotted: ±10%)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
