"""§4's DropConnect arms measured over a real slow link: two Ray nodes on one machine, ``tc tbf`` between them.

The paper's regime is communication-bound (ρ = t_comm / t_compute ≳ 1); ``docs/RESULTS.md`` §2 had it only
projected and under the *emulated* link, which waits out the cost model's own transfer time. Here the
transfer is real packets through ``tbf`` (``tests/netlink.py``, as ``bench.shaped_link``):

1. calibrate the link unshaped and at ``--rate`` (timed gloo all-reduces, ``costmodel.fit_link_regimes``);
2. project the §4 sweep (``paper-dropconnect``, every trial in ``bench/paper/out/state.tar.gz``, measured on
   one node) onto the calibrated link at P = 2 (the unshaped transfer taken out of its compute fit first) and
   take each arm's projected-best (γ, B) with ρ of vanilla at B = 256;
3. measure those settings over the shaped link, every seed of the preset (3), one ``raygd sweep`` per setting
   on a ``ShapedRayCluster`` (one Train worker per node), every run tagged ``raygd.network = shaped``;
4. report per arm the measured time to accuracy against the projection, and the measured speedup over vanilla
   with its 95% bootstrap interval over seeds beside the projected one.

    .venv/bin/python -m bench.shaped_paper --rate 350      # ρ ≈ 1 for vanilla at B = 256 (~20 min)
    .venv/bin/python -m bench.shaped_paper --report        # the outputs again from the saved state

Outputs: ``bench/out/shaped_paper.md``, the store in ``bench/out/shaped_link/mlflow.db`` (experiments
``shaped-paper-*``), the state in ``bench/out/shaped_link/shaped_paper.json``. Runs only as root with ``ip``/``tc``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tarfile
import time

from bench.pairing import SAY, LoadAverage, provenance
from bench.shaped_calibration import SIZES, calibrate, fitted
from bench.shaped_link import OUT, REPO, STORE, Grid, run_sweep, without_local_link

PRESET = "paper-dropconnect"
SOURCE_ARCHIVE = REPO / "bench" / "paper" / "out" / "state.tar.gz"
STATE = STORE / "shaped_paper.json"
RHO_BATCH = 256
SLUGS = {
    "vanilla": "vanilla",
    "dropconnect(p=0.4, per_group)": "dc04-groups",
    "dropconnect(p=0.5, per_group)": "dc05-groups",
    "dropconnect(p=0.4, per_worker)": "dc04-worker",
}
EMULATED_RHO1 = {  # bench/paper/out/dropconnect-link-rho1 (RESULTS §2): measured under the EMULATED ρ = 1 link
    "vanilla": 1.0,
    "dropconnect(p=0.4, per_group)": 0.82,
    "dropconnect(p=0.4, per_worker)": 0.91,
    "dropconnect(p=0.5, per_group)": 0.78,
}


def source_uri() -> str:
    """The §4 store, unpacked once from the committed archive."""
    db = STORE / "paper_source.db"
    if not db.exists():
        STORE.mkdir(parents=True, exist_ok=True)
        with tarfile.open(SOURCE_ARCHIVE) as tar:
            member = tar.getmember("mlflow.db")
            member.name = db.name
            tar.extract(member, STORE, filter="data")
    return f"sqlite:///{db}"


def plan(calibrations: dict, rate: float) -> tuple[list[dict], float]:
    """Each arm's projected-best (γ, B) at P = 2 on the calibrated link, and ρ of vanilla at B = 256 there."""
    from raygd import project
    from raygd.records import latest_sweep

    src = source_uri()
    trials = [t for t in project.read_trials(src, latest_sweep(src, PRESET)) if not t.emulated]
    local = without_local_link(trials, calibrations[None].link)
    proj = project.project(local, project.Target(f"shaped {rate:g} Mbit/s, calibrated", calibrations[rate].link), [2])
    rho = statistics.median(
        r["projected_rho"] for r in proj.trials if r["mechanism"] == "vanilla" and r["global_batch_size"] == RHO_BATCH
    )
    rows = [
        {
            "mechanism": r["mechanism"],
            "step_size": r["step_size"],
            "global_batch_size": r["global_batch_size"],
            "projected_tta_s": r["projected_time_to_accuracy_s"],
            "projected_speedup": r["projected_speedup_vs_vanilla"],
            "projected_rho": r["projected_rho"],
        }
        for r in sorted(proj.best, key=lambda r: (r["mechanism"] != "vanilla", r["mechanism"]))
    ]
    return rows, rho


def _sets(mechanism: str, step: float, batch: int) -> tuple[str, ...]:
    from raygd.mechanisms import mechanism_label
    from tuning.spec import load_sweep_spec

    spec = load_sweep_spec(PRESET, [])
    mechs = {mechanism_label(m): m for m in spec.space["mechanism"]}
    return (
        f"sweep.space.mechanism={json.dumps([mechs[mechanism]])}",
        f"sweep.space.step_size=[{step!r}]",
        f"sweep.space.global_batch_size=[{batch}]",
        "sweep.extend_edges=false",
    )


def qdisc_drops(link) -> dict[str, int]:
    """Packets each end's ``tbf`` has sent and dropped so far (``tc -s qdisc``): a drop is a TCP loss to recover."""
    import re

    from tests.netlink import run as ip_run

    out = {}
    for end, dev, ns in (("head", link.host_dev, None), ("node", link.node_dev, link.namespace)):
        text = ip_run("tc", "-s", "qdisc", "show", "dev", dev, ns=ns).stdout
        sent = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
        out[f"{end}_sent_pkts"], out[f"{end}_dropped_pkts"] = (int(sent[1]), int(sent[2])) if sent else (-1, -1)
    return out


def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from tests.netlink import ShapedLink, ShapedRayCluster, unavailable

    reason = unavailable()
    if reason:
        SAY(f"bench.shaped_paper: cannot run here: {reason}")
        sys.exit(2)
    load = LoadAverage()
    state: dict = {"title": f"# bench.shaped_paper --rate {args.rate:g} ({provenance()})", "rate": args.rate}
    SAY(state["title"])
    with ShapedLink(rate_mbit=None) as link:
        cals = calibrate(link, [None, args.rate], SIZES, args.reps)
    state["calibrations"] = [
        {"rate_mbit": c.rate_mbit, "sizes": c.sizes, "medians": c.medians, "spread": c.spread} for c in cals
    ]
    calibrations = {c.rate_mbit: c for c in cals}
    state["plan"], state["rho"] = plan(calibrations, args.rate)
    SAY(f"ρ of vanilla at B = {RHO_BATCH}, P = 2 on the calibrated link: {state['rho']:.2f}")
    for p in state["plan"]:
        SAY(f"  measure {p['mechanism']} γ={p['step_size']:g} B={p['global_batch_size']}")
    uri = f"sqlite:///{STORE / 'mlflow.db'}"
    state["sweeps"], state["uri"] = [], uri
    _save(state)
    tag = time.strftime("%m%d%H%M")
    with ShapedRayCluster(rate_mbit=args.rate) as cluster:
        cluster.start()
        for p in state["plan"]:
            sets = _sets(p["mechanism"], p["step_size"], p["global_batch_size"])
            grid = Grid(f"paper-{SLUGS.get(p['mechanism'], 'arm')}", PRESET, sets, (args.rate,))
            before = qdisc_drops(cluster.link)
            sweep = run_sweep(cluster, grid, uri, tag)
            after = qdisc_drops(cluster.link)
            state["sweeps"].append(
                {"mechanism": p["mechanism"], "parent": sweep.parent_run_id, "wall_s": sweep.wall_s, "load": sweep.load}
                | {k: after[k] - before[k] for k in after}
            )
            _save(state)
    state["load"] = str(load.stop())
    _save(state)
    report(state)


def _save(state: dict) -> None:
    STATE.write_text(json.dumps(state, indent=1))


def report(state: dict) -> None:
    """Measured against projected per arm, and the measured speedups with their intervals."""
    from raygd import project
    from raygd.stats import bootstrap_ratio

    cals = [fitted(c["rate_mbit"], c["sizes"], c["medians"], c["spread"]) for c in state["calibrations"]]
    rate = state["rate"]
    measured = {}
    for s in state["sweeps"]:
        trials = project.read_trials(state["uri"], s["parent"])
        measured[s["mechanism"]] = [t.record.time_to_accuracy_s for t in trials if t.record.reached]
    lines = [
        state["title"],
        "",
        f"Two Ray nodes over a veth pair, `tbf` at {rate:g} Mbit/s both ways (SHAPED: real packets on one machine, "
        "not a cluster). Calibration (gloo all-reduce, P = 2, `costmodel.fit_link_regimes`):",
        "",
        *[c.describe() for c in cals],
        "",
        f"ρ = t_comm / t_compute of vanilla at B = {RHO_BATCH}, P = 2 on the calibrated link: {state['rho']:.2f}. "
        "Each arm at its projected-best (γ, B) there (the §4 sweep's updates, its trials' compute fit), every seed:",
        "",
        "| mechanism | γ | B | seeds reached | projected TTA (s) | measured TTA (s) | error | measured speedup vs "
        "vanilla (95% interval) | projected speedup | under the EMULATED ρ = 1 link |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    base = measured.get("vanilla", [])
    for p in state["plan"]:
        times = measured.get(p["mechanism"], [])
        mean = statistics.fmean(times) if times else None
        spread = f" ± {statistics.stdev(times):.3g}" if len(times) > 1 else ""
        err = f"{(p['projected_tta_s'] - mean) / mean:+.1%}" if mean else ""
        if p["mechanism"] == "vanilla" or len(times) < 2 or len(base) < 2:
            speed = "1.00×" if p["mechanism"] == "vanilla" else ""
        else:
            ratio, _, low, high = bootstrap_ratio(base, times)
            speed = f"{ratio:.2f}× ({low:.2f}–{high:.2f})" + (" n.s." if low <= 1 <= high else "")
        projected = p["projected_speedup"]
        lines.append(
            f"| {p['mechanism']} | {p['step_size']:g} | {p['global_batch_size']} | {len(times)} | "
            f"{p['projected_tta_s']:.3g} | {'' if mean is None else f'{mean:.3g}{spread}'} | {err} | {speed} | "
            f"{'' if projected == '' else f'{projected:.2f}×'} | {EMULATED_RHO1.get(p['mechanism'], math.nan):.2f}× |"
        )
    lines += ["", "Sweeps (one per setting; wall time, load while each ran):", ""]
    lines += [
        f"- {s['mechanism']}: parent {s['parent']}, {s['wall_s']:.0f} s, {s['load']}; tbf sent / dropped packets: "
        f"head {s.get('head_sent_pkts')} / {s.get('head_dropped_pkts')}, node {s.get('node_sent_pkts')} / "
        f"{s.get('node_dropped_pkts')}"
        for s in state["sweeps"]
    ]
    lines += ["", f"whole bench: {state.get('load', 'unfinished')}"]
    text = "\n".join(lines)
    SAY(text)
    (OUT / "shaped_paper.md").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=350.0, help="the tbf rate, Mbit/s (default %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per calibration size")
    parser.add_argument("--report", action="store_true", help="the outputs again from the saved state and store")
    args = parser.parse_args()
    if args.report:
        report(json.loads(STATE.read_text()))
        return
    run(args)


if __name__ == "__main__":
    main()
