"""What a trial's per-evaluation MLflow logging costs, written at every evaluation or held back.

``raygd.loop.run_loop`` logs rank zero's metrics at every evaluation. Each ``log_batch`` into a
SQLite store costs ~14 ms of CPU here (SQLAlchemy, one transaction and fsync); on a cluster it is a
round trip to the head's tracking server. Since ``Tracker.buffered`` the loop holds them and sends
one batch per ``raygd.tracking.METRICS_FLUSH_S`` (and at checkpoints and its end). The logging runs
inside the evaluation window, paused out of time to accuracy, so this changes wall time only.

This bench trains the quickstart's first trial (Fashion-MNIST 10k logistic regression, vanilla,
γ = 0.1, B = 64, evaluation every 0.064 passes, to 80% train accuracy) on one rank in this process,
with a real ``Tracker`` on a new run of a SQLite store, A = ``METRICS_FLUSH_S`` 0 (a write per
evaluation, before) against B = the default, interleaved pairs (bench/pairing.py). It prints the
evaluation time of the trial (``RunSummary.eval_time_s``) and checks that both arms stored every
evaluation's metrics at the same steps.

    .venv/bin/python -m bench.metric_logging              # 7 pairs, ~1 min
    .venv/bin/python -m bench.metric_logging --pairs 9
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import median

import torch

from bench.pairing import SAY, LoadAverage, interleave, paired, provenance
from raygd import tracking
from raygd.config import load_run_config
from raygd.data import load_data
from raygd.loop import build_state, run_loop
from raygd.records import mlflow_client

FASHION = "/usr/share/datasets/fashion-mnist"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--data-dir", default=FASHION, help=f"Fashion-MNIST idx files (default {FASHION})")
    args = parser.parse_args(argv)
    if not Path(args.data_dir).is_dir():
        SAY(f"bench.metric_logging: no Fashion-MNIST at {args.data_dir} (apt-get install -y dataset-fashion-mnist)")
        return 2
    torch.set_num_threads(1)
    store = tempfile.mkdtemp(prefix="raygd-metric-logging-")
    uri = f"sqlite:///{store}/mlflow.db"
    cfg = load_run_config(
        None,
        [
            "data.name=fashion_mnist",
            f"data.data_dir={args.data_dir}",
            "data.train_size=10000",
            "data.eval_size=2000",
            "train.model=logreg",
            "train.num_workers=1",
            "train.step_size=0.1",
            "train.global_batch_size=64",
            "train.target_accuracy=0.8",
            "train.max_passes=5",
            "train.eval_every_passes=0.064",
            f"tracking.tracking_uri={uri}",
        ],
    )
    data = load_data(cfg.data, cfg.train.seed)
    runs: dict[str, list[str]] = {"write each": [], "held back": []}

    def trial(flush_every_s: float, arm: str) -> float:
        run_id = tracking.create_run(uri, "metric-logging", arm, {}, {})
        saved, tracking.METRICS_FLUSH_S = tracking.METRICS_FLUSH_S, flush_every_s
        try:
            summary = run_loop(build_state(cfg, data), tracking.Tracker(uri, run_id, enabled=True))
        finally:
            tracking.METRICS_FLUSH_S = saved
        runs[arm].append(run_id)
        return summary.eval_time_s

    default = tracking.METRICS_FLUSH_S
    load = LoadAverage()
    SAY(f"bench.metric_logging: quickstart's first trial on 1 rank, 1 thread, SQLite store {uri}; {provenance()}")
    figures = interleave(
        {"write each": lambda: trial(0.0, "write each"), "held back": lambda: trial(default, "held back")}, args.pairs
    )
    load.stop()
    client = mlflow_client(uri)
    steps = {
        arm: {tuple(sorted(m.step for m in client.get_metric_history(r, "train/accuracy"))) for r in ids}
        for arm, ids in runs.items()
    }
    same = len(steps["write each"] | steps["held back"]) == 1
    evaluations = [len(s) for s in steps["write each"]]
    each, held = figures.values()
    SAY(str(load))
    SAY("")
    SAY("| A vs B | A: evaluation s per trial (median) | B | A / B, median of pairs (min–max) |")
    SAY("|---|---:|---:|---:|")
    row = f"a write per evaluation vs one per {default:g} s"
    SAY(f"| {row} | {median(each):.3f} | {median(held):.3f} | {paired(each, held)} |")
    SAY(f"evaluations per trial: {evaluations[0]}; the same steps stored in both arms: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
