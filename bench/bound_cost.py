"""What the bound costs a sweep: Σ over its trials of ``time/bound_s`` (B_D at the initial weights,
``raygd.bound``) against the sweep's wall time, from its MLflow runs. Goal (#14): ≤ 2%.

    python -m bench.bound_cost quickstart                       # the newest sweep of that experiment
    python -m bench.bound_cost quickstart --tracking-uri sqlite:///mlflow.db

Reads only; per mechanism it also prints the median bound time per trial and its share of the
trials' own training time (``train_time_s``), where the cost of a mechanism's Monte Carlo shows.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from raygd.records import MECHANISM_LABEL_TAG, child_runs, latest_sweep, mlflow_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args(argv)
    parent_id = latest_sweep(args.tracking_uri, args.experiment)
    parent = mlflow_client(args.tracking_uri).get_run(parent_id)
    if parent.info.end_time is None:
        raise SystemExit(f"sweep {parent_id} has not ended: its wall time is not known yet")
    wall = (parent.info.end_time - parent.info.start_time) / 1000
    by_mech: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in child_runs(args.tracking_uri, parent_id):
        m = run.data.metrics
        if "time/bound_s" in m:
            by_mech[run.data.tags.get(MECHANISM_LABEL_TAG, "?")].append((m["time/bound_s"], m.get("train_time_s", 0.0)))
    total = sum(b for rows in by_mech.values() for b, _ in rows)
    print(f"sweep {parent_id}: {sum(map(len, by_mech.values()))} trials with a bound, wall {wall:.1f} s")
    print(f"bound total {total:.2f} s = {total / wall:.2%} of the sweep's wall time (goal <= 2%)")
    print("| mechanism | trials | median bound (s) | bound / training time |")
    print("|---|---:|---:|---:|")
    for mech, rows in sorted(by_mech.items()):
        train = sum(t for _, t in rows)
        share = f"{sum(b for b, _ in rows) / train:.1%}" if train > 0 else "–"
        print(f"| {mech} | {len(rows)} | {statistics.median(b for b, _ in rows):.3f} | {share} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
