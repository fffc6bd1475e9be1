"""Issue #31: the ``adaptive-batch`` preset in its four cells, their table and the figure of B and γ along training.

    python -m bench.adaptive_batch run       # the four sweeps, one after another (~40 min on 2 cores)
    python -m bench.adaptive_batch report    # tables (bench/out/adaptive_batch/) and docs/adaptive_batch.png

Cells: logistic regression and the MNIST CNN, each on the machine's own link and on the emulated 1 Gbit/s, 10 ms
link (``train.network``). Each cell is one ``raygd sweep adaptive-batch`` with its ``--set`` overrides and an
MLflow experiment of its own (``adaptive-batch-<cell>``) in ``bench/out/adaptive_batch/mlflow.db``. ``run``
samples the load average every 30 s into ``load.json`` (others use the machine at the same time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path("bench/out/adaptive_batch")
FIGURE = Path("docs/adaptive_batch.png")
LINK = ["train.network.bandwidth_gbps=1", "train.network.latency_us=10000"]
CNN = ["train.model=mnist_cnn", "data.train_size=5000", "train.target_accuracy=0.75", "sweep.space.step_size=[0.2]"]
CELLS = {"logreg-free": [], "logreg-link": LINK, "cnn-free": CNN, "cnn-link": CNN + LINK}
POLICIES = ("diversity", "goodput")


def _uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def _sample_load(path: Path, stop: threading.Event) -> None:
    samples = []
    while not stop.wait(30.0):
        samples.append((time.time(), *os.getloadavg()))
        path.write_text(json.dumps(samples))


def run(cells: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(out / "load.json", stop), daemon=True)
    sampler.start()
    for cell in cells:
        sets = [f"sweep.name=adaptive-batch-{cell}", f"tracking.tracking_uri={_uri(out)}", *CELLS[cell]]
        cmd = [str(Path(sys.executable).with_name("raygd")), "sweep", "adaptive-batch"]
        cmd += [a for s in sets for a in ("--set", s)]
        print(f"== {cell}: {' '.join(cmd)}", flush=True)
        t0, load0 = time.time(), os.getloadavg()
        subprocess.run(cmd, check=False)
        print(f"== {cell}: {time.time() - t0:.0f} s, load {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    stop.set()


def _cell_rows(uri: str, cell: str):
    from raygd.records import latest_sweep
    from raygd.stats import bootstrap_ratio
    from tuning.report import collect_sweep
    from tuning.stats import best_per_mechanism

    parent = latest_sweep(uri, f"adaptive-batch-{cell}")
    records = collect_sweep(uri, parent).records
    rows = {r.mechanism: r for r in best_per_mechanism(records)}
    fixed = rows["vanilla"]
    by_id = {t.trial_id: t for t in records}
    out = {"cell": cell, "parent": parent, "fixed": fixed, "policies": {}}
    for policy in POLICIES:
        row = rows.get(f"vanilla: {policy}")
        if row is None:
            continue
        out["policies"][policy] = row
    d, g = out["policies"].get("diversity"), out["policies"].get("goodput")
    if d and g and d.time_to_accuracy_s and g.time_to_accuracy_s and min(d.n_seeds, g.n_seeds) >= 2:
        times = [[by_id[i].time_to_accuracy_s for i in r.trial_ids] for r in (g, d)]
        out["diversity_vs_goodput"] = bootstrap_ratio(*times)  # > 1: diversity faster
    out["records"] = records
    return out


def _fmt_row(name: str, r) -> str:
    t = "not reached" if r.time_to_accuracy_s is None else f"{r.time_to_accuracy_s:.3g} ± {r.time_std_s or 0:.2g}"
    b = f"{r.global_batch_size}" if r.batch_policy == "fixed" else f"B̄ {r.mean_batch_size or math.nan:.0f}"
    ratio = "1" if r.batch_policy == "fixed" else "–"
    if r.speedup is not None and r.batch_policy != "fixed":
        ratio = f"{1 / r.speedup:.2f}× [{1 / r.speedup_hi:.2f}–{1 / r.speedup_lo:.2f}]" if r.speedup_lo else "–"
    passes = "–" if r.passes_to_accuracy is None else f"{r.passes_to_accuracy:.2f}"
    return f"| {name} | {r.step_size:g} | {b} | {t} | {passes} | {ratio} | {r.n_seeds} |"


def _hysteresis_evidence(uri: str, records) -> tuple[float, float, int]:
    """Over the fixed-B runs: the median |log| change of the online B̂_D between consecutive evaluations, and the
    share of those changes a hysteresis of 30% would act on."""
    from raygd.records import mlflow_client

    client, changes = mlflow_client(uri), []
    for t in records:
        if t.batch_policy != "fixed" or t.run_id is None:
            continue
        values = [m.value for m in client.get_metric_history(t.run_id, "diversity/batch_bound")]
        values = [v for v in values if math.isfinite(v) and v > 0]
        changes += [abs(math.log(b / a)) for a, b in itertools.pairwise(values) if a != b]
    if not changes:
        return math.nan, math.nan, 0
    changes.sort()
    return math.exp(changes[len(changes) // 2]), sum(c >= math.log(1.3) for c in changes) / len(changes), len(changes)


def report(out: Path) -> None:
    uri, lines, cells = _uri(out), [], []
    for cell in CELLS:
        try:
            cells.append(_cell_rows(uri, cell))
        except Exception as err:  # a cell not run yet
            print(f"{cell}: {err}")
    for c in cells:
        lines += [
            f"### {c['cell']} (MLflow parent `{c['parent']}`)",
            "",
            "| arm | γ | B | time to target (s) | passes | time / best fixed [95%] | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|",
            _fmt_row("best fixed B", c["fixed"]),
        ]
        lines += [_fmt_row(p, r) for p, r in c["policies"].items()]
        if "diversity_vs_goodput" in c:
            ratio, _, lo, hi = c["diversity_vs_goodput"]
            lines += ["", f"diversity / goodput time: {1 / ratio:.2f}× [{1 / hi:.2f}–{1 / lo:.2f}]"]
        median, share, count = _hysteresis_evidence(uri, c["records"])
        lines += [
            f"online B̂_D between evaluations (fixed-B runs): median change ×{median:.2f}, {share:.0%} of {count} "
            "changes ≥ ×1.3",
            "",
        ]
    load = json.loads((out / "load.json").read_text()) if (out / "load.json").exists() else []
    if load:
        one = [s[1] for s in load]
        lines.append(
            f"load average (1 min) over the run: median {sorted(one)[len(one) // 2]:.1f}, "
            f"min {min(one):.1f}, max {max(one):.1f} ({len(one)} samples, 2 cores)"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(uri, cells, FIGURE)


def _histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = ("progress/passes", "train/global_batch_size", "train/step_size", "diversity/batch_bound")
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


def figure(uri: str, cells: list[dict], path: Path) -> None:
    """B (with B̂_D) and γ along training, per cell: each policy's seed-0 run at its best γ, and the best fixed B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raygd.records import mlflow_client

    client = mlflow_client(uri)
    fig, axes = plt.subplots(2, max(1, len(cells)), figsize=(4.2 * max(1, len(cells)), 6.4), squeeze=False)
    colours = {"diversity": "C0", "goodput": "C1", "fixed": "0.4"}
    for j, c in enumerate(cells):
        ax_b, ax_g = axes[0][j], axes[1][j]
        arms = {"fixed": c["fixed"], **c["policies"]}
        for name, row in arms.items():
            run = next((t for t in c["records"] if t.trial_id == row.trial_ids[0]), None)
            if run is None or run.run_id is None:
                continue
            h = _histories(client, run.run_id)
            passes = dict(h["progress/passes"])
            xs = [passes[s] for s, _ in h["train/global_batch_size"] if s in passes]
            label = f"{name} B" + (f" = {row.global_batch_size}" if name == "fixed" else "")
            ys = [v for s, v in h["train/global_batch_size"] if s in passes]
            ax_b.step(xs, ys, where="post", color=colours[name], label=label)
            ax_g.step(
                xs,
                [v for s, v in h["train/step_size"] if s in passes],
                where="post",
                color=colours[name],
                label=f"{name} γ",
            )
            if name == "diversity":
                bd = [(passes[s], v) for s, v in h["diversity/batch_bound"] if s in passes and math.isfinite(v)]
                ax_b.plot([x for x, _ in bd], [v for _, v in bd], ":", color="C2", label="B̂_D (diversity run)")
        ax_b.set_yscale("log", base=2)
        ax_b.set_title(c["cell"])
        ax_b.set_ylabel("global batch size B")
        ax_g.set_ylabel("step size γ")
        ax_g.set_xlabel("passes over the training set")
        ax_b.legend(fontsize=7)
        ax_g.legend(fontsize=7)
    fig.suptitle("raygd batch policies: B and γ along training (seed 0, best γ each), B̂_D online (free estimator)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run", "report"))
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated, of " + ", ".join(CELLS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.what == "run":
        run(args.cells.split(","), args.out)
    else:
        report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
