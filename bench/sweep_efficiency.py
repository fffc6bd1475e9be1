"""Compute saved by stopping every trial at its target, and whether the winner changes.

Runs the same small grid twice in one Ray session: (a) as raygd does, each trial stopping inside
the loop when it reaches the target; (b) full length, every trial running all ``max_passes``
(target set to 1.0). The saving is measured inside each full-length trial, so its two sides are
paired as closely as they can be: the training seconds to the first evaluation with
``train/accuracy`` >= target (``time/train_s`` there; all of it when never reached) against the
trial's training seconds in all, the first a prefix of the same run (same seed, same updates).
Printed: the ratio of their sums over the trials and, in updates, the same ratio free of machine
load; the median of the per-trial ratios with min-max; the load average. Sweep (a) checks the
in-loop stop: it must stop each trial at the update found post hoc and pick the same winner; its
own compute, from another sweep at another time, is context.

    .venv/bin/python -m bench.sweep_efficiency [--target 0.8]
"""

from __future__ import annotations

import argparse

from mlflow.tracking import MlflowClient

from bench.pairing import LoadAverage, paired, provenance
from raygd.records import child_runs
from tuning.spec import load_sweep_spec
from tuning.sweep import run_sweep

GRID = [
    "sweep.space.step_size=[0.02, 0.1, 0.4]",
    "sweep.space.global_batch_size=[64, 256]",
    "sweep.space.mechanism=[{name: vanilla}]",
    "train.max_passes=6",
    "train.eval_every_steps=10",
    "sweep.extend_edges=false",  # both sweeps run the same 6 trials: an extension round follows each sweep's winners
]


def post_hoc(client: MlflowClient, run, target: float) -> tuple[float, int] | None:
    """(time/train_s, update) at the first evaluation whose train accuracy reached ``target``."""
    acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/accuracy")}
    clock = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "time/train_s")}
    reached = sorted(step for step, value in acc.items() if value >= target)
    return (clock[reached[0]], reached[0]) if reached else None


def sweep(name: str, overrides: list[str]):
    spec = load_sweep_spec("quickstart", [*GRID, f"sweep.name={name}", *overrides])
    outcome = run_sweep(spec)
    return spec, child_runs(spec.tracking_uri, outcome.parent_run_id)


def label(run) -> str:
    return f"step {float(run.data.params['train.step_size']):g}, B {run.data.params['train.global_batch_size']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    load = LoadAverage()
    spec, early = sweep("bench-efficiency-early", [f"train.target_accuracy={args.target}"])
    _, full = sweep("bench-efficiency-full", ["train.target_accuracy=1.0"])
    load.stop()
    client = MlflowClient(spec.tracking_uri)
    m = {r.info.run_id: r.data.metrics for r in [*early, *full]}
    hit = {r.info.run_id: post_hoc(client, r, args.target) for r in full}
    to_target_s = [hit[r.info.run_id][0] if hit[r.info.run_id] else m[r.info.run_id]["train_time_s"] for r in full]
    to_target_n = [hit[r.info.run_id][1] if hit[r.info.run_id] else m[r.info.run_id]["steps"] for r in full]
    full_s, full_n = [m[r.info.run_id]["train_time_s"] for r in full], [m[r.info.run_id]["steps"] for r in full]
    per_trial = paired(to_target_s, full_s)
    early_s = sum(m[r.info.run_id]["train_time_s"] for r in early)

    reached_early = [r for r in early if "time_to_accuracy_s" in r.data.metrics]
    win_early = min(reached_early, key=lambda r: r.data.metrics["time_to_accuracy_s"]) if reached_early else None
    reached_full = [r for r in full if hit[r.info.run_id]]
    win_full = min(reached_full, key=lambda r: hit[r.info.run_id][0]) if reached_full else None
    stop_at = {label(r): int(r.data.metrics.get("updates_to_accuracy", -1)) for r in early}
    same_stops = all(stop_at.get(label(r)) == (hit[r.info.run_id][1] if hit[r.info.run_id] else -1) for r in full)

    print(f"\n{len(full)} trials, target train accuracy {args.target}, max 6 passes; {provenance()}; {load}\n")
    print("| sweep | trial compute (training s) | winner | its time to accuracy (s) |\n|---|---:|---|---:|")
    if win_early:
        tta = win_early.data.metrics["time_to_accuracy_s"]
        print(f"| stop at target | {early_s:.1f} | {label(win_early)} | {tta:.2f} |")
    if win_full:
        print(f"| full length | {sum(full_s):.1f} | {label(win_full)} | {hit[win_full.info.run_id][0]:.2f} |")
    same = bool(win_early and win_full and label(win_early) == label(win_full))
    print(
        f"\ncompute to the target / full length, within the full-length trials: {sum(to_target_s) / sum(full_s):.2f} "
        f"(training s), {sum(to_target_n) / sum(full_n):.2f} (updates); per trial: median {per_trial} "
        f"over the {len(full)} settings (they differ: this range is the grid's, not noise)"
    )
    print(
        f"stop at target, separate sweep: {early_s / sum(full_s):.2f} of the full-length compute; "
        f"same stopping updates in the loop as post hoc: {same_stops}; same winner: {same}"
    )


if __name__ == "__main__":
    main()
