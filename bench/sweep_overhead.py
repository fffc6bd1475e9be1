"""Where a sweep's wall time goes: per-trial start overhead and the fraction spent training.

Runs a small grid sweep (default: the quickstart preset with 4 trials) on local Ray and
reads, from each trial's MLflow child run, the start-up breakdown raygd records:

- ``overhead/trial_to_first_step_s``: trial function entry -> first training step;
- ``overhead/fit_setup_s``: data load, MLflow run, object store put (driver side of fit);
- ``overhead/worker_start_s``: TorchTrainer.fit() -> worker loop entry (Train controller,
  worker actors, torch process group);
- ``overhead/loop_setup_s``: loop entry -> first step (data fetch, model, DDP wrap);

and prints them with the sweep's wall time and the fraction of it spent in training steps.

    .venv/bin/python bench/sweep_overhead.py [--preset quickstart] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tuning.spec import load_sweep_spec  # noqa: E402
from tuning.sweep import child_runs, run_sweep  # noqa: E402

KEYS = ("overhead/trial_to_first_step_s", "overhead/fit_setup_s", "overhead/worker_start_s", "overhead/loop_setup_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["sweep.space.mechanism=[{name: vanilla}]", "sweep.name=bench-sweep-overhead"])
    args = parser.parse_args()
    spec = load_sweep_spec(args.preset, args.overrides)
    start = time.perf_counter()
    outcome = run_sweep(spec)
    wall = time.perf_counter() - start
    runs = child_runs(spec.tracking_uri, outcome.parent_run_id)
    train_s = sum(r.data.metrics.get("train_time_s", 0.0) for r in runs)
    eval_s = sum(r.data.metrics.get("eval_time_s", 0.0) for r in runs)
    print(f"\nsweep {spec.name}: {len(runs)} trials, wall {wall:.1f} s (includes Ray start and the final analysis)")
    print("| per trial | median s | min s | max s |\n|---|---:|---:|---:|")
    for key in KEYS:
        values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
        if values:
            print(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"\ntraining steps: {train_s:.1f} s = {train_s / wall:.1%} of the sweep wall time; "
          f"evaluation {eval_s:.1f} s; everything else (start-up, Tune, MLflow) "
          f"{(wall - train_s - eval_s) / len(runs):.1f} s per trial")


if __name__ == "__main__":
    main()
