"""Compute saved by stopping every trial at its target, and whether the winner changes.

Runs the same small grid twice on local Ray: (a) as raygd does, each trial stopping
inside the loop when it reaches the target; (b) full length, every trial running all
``max_passes`` (target set to 1.0), with its time to the real target read back from its
step metrics (``time/train_s`` at the first evaluation with ``train/accuracy`` >= target).
Prints total trial compute (training seconds) of both, their ratio, and both winners.

    .venv/bin/python -m bench.sweep_efficiency
"""

from __future__ import annotations

import argparse

from mlflow.tracking import MlflowClient

from raygd.records import child_runs
from tuning.spec import load_sweep_spec
from tuning.sweep import run_sweep

GRID = ["sweep.space.step_size=[0.02, 0.1, 0.4]", "sweep.space.global_batch_size=[64, 256]",
        "sweep.space.mechanism=[{name: vanilla}]", "train.max_passes=6", "train.eval_every_steps=10"]


def post_hoc_tta(client: MlflowClient, run, target: float) -> float | None:
    """time/train_s at the first evaluation whose train accuracy reached ``target``."""
    acc = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/accuracy")}
    clock = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "time/train_s")}
    reached = sorted(step for step, value in acc.items() if value >= target)
    return clock[reached[0]] if reached else None


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
    spec, early = sweep("bench-efficiency-early", [f"train.target_accuracy={args.target}"])
    _, full = sweep("bench-efficiency-full", ["train.target_accuracy=1.0"])
    client = MlflowClient(spec.tracking_uri)
    early_s = sum(r.data.metrics["train_time_s"] for r in early)
    full_s = sum(r.data.metrics["train_time_s"] for r in full)
    reached_early = [r for r in early if "time_to_accuracy_s" in r.data.metrics]
    win_early = min(reached_early, key=lambda r: r.data.metrics["time_to_accuracy_s"]) if reached_early else None
    full_tta = {r.info.run_id: post_hoc_tta(client, r, args.target) for r in full}
    reached_full = [r for r in full if full_tta[r.info.run_id] is not None]
    win_full = min(reached_full, key=lambda r: full_tta[r.info.run_id]) if reached_full else None
    print(f"\n{len(early)} trials, target train accuracy {args.target}, max 6 passes")
    print("| sweep | trial compute (training s) | winner | its time to accuracy (s) |\n|---|---:|---|---:|")
    if win_early:
        tta = win_early.data.metrics["time_to_accuracy_s"]
        print(f"| stop at target | {early_s:.1f} | {label(win_early)} | {tta:.2f} |")
    if win_full:
        print(f"| full length | {full_s:.1f} | {label(win_full)} | {full_tta[win_full.info.run_id]:.2f} |")
    same = bool(win_early and win_full and label(win_early) == label(win_full))
    print(f"\ncompute ratio (stop at target / full length): {early_s / full_s:.2f}; same winner: {same}")


if __name__ == "__main__":
    main()
