"""How fast the machine ran while a long sweep ran: each trial's training seconds per pass over the
median of its (mechanism, B), grouped by the hour the trial started.

A paper re-run takes many hours on a shared 2-core VM whose speed drifts: the §4 re-run's trials
that started at 09:00 trained at 0.67× their (mechanism, B)'s median seconds per pass, those at
02:00 at 1.12× (docs/RESULTS.md §2). Every (γ, B) of one mechanism runs at some other hour, so
wall-clock comparisons between step sizes or seeds carry that drift; passes (updates) to target do
not. Reads the sweep's MLflow child runs only.

    python -m bench.paper.drift paper-dropconnect --tracking-uri sqlite:///bench/paper/out/mlflow.db
    python -m bench.paper.drift paper-dropconnect --parent 775f8d5ffa03438ba825d3a58ba4614e --tracking-uri ...
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections import defaultdict

from raygd.records import MECHANISM_LABEL_TAG, child_runs, latest_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--parent", help="the sweep's parent run id (default: the newest sweep of the experiment)")
    args = parser.parse_args(argv)
    parent = args.parent or latest_sweep(args.tracking_uri, args.experiment)
    trials = []
    for run in child_runs(args.tracking_uri, parent):
        m = run.data.metrics
        if m.get("passes") and m.get("train_time_s"):
            key = (run.data.tags.get(MECHANISM_LABEL_TAG, "?"), run.data.params.get("train.global_batch_size"))
            trials.append((run.info.start_time, key, m["train_time_s"] / m["passes"]))
    per_key = defaultdict(list)
    for _, key, s_per_pass in trials:
        per_key[key].append(s_per_pass)
    medians = {key: statistics.median(v) for key, v in per_key.items()}
    by_hour = defaultdict(list)
    for start, key, s_per_pass in sorted(trials):
        hour = datetime.datetime.fromtimestamp(start / 1000, datetime.UTC).strftime("%Y-%m-%d %H:00")
        by_hour[hour].append(s_per_pass / medians[key])
    print(f"sweep {parent}: {len(trials)} trials; s per pass over the median of the trial's (mechanism, B)")
    print("| hour started (UTC) | trials | median | min–max |")
    print("|---|---:|---:|---|")
    for hour, ratios in sorted(by_hour.items()):
        print(f"| {hour} | {len(ratios)} | {statistics.median(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
