"""Issue #29 on the committed paper runs: the critical batch size B_crit (``raygd.critical``) against B_D = 1 + B_noise.

- §4 (``paper-dropconnect``, MLflow parent 39484aa5…): every trial is in ``bench/paper/out/state.tar.gz``; its store
  is unpacked into a temporary folder (the checkout's own store is not touched) and fitted per mechanism, with the
  interval of B_crit(DropConnect) / B_crit(vanilla) from independent resamples of the two mechanisms.
- Figures 1–2 (``paper-batch-scaling``, parent ab896fde…): that store was lost before the archive existed; only
  ``bench/paper/out/batch-scaling/pairs.md`` (mean ± std over 3 seeds per (γ, B)) is left. Each pair is given three
  pseudo-seeds mean + std·(−1, 0, 1), which have its mean and sample std: the fit is that of the recorded means, the
  interval assumes the seeds' spread was that symmetric.
- Figure 3a has two batch sizes (16, 512): too few to fit (``raygd.critical.MIN_BATCHES``).

    .venv/bin/python -m bench.paper.critical [--out DIR]     # tables printed, critical_batch_*.png in DIR
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from raygd.critical import CriticalFit, b_crit_samples, critical_batch
from raygd.records import CONFIRM_PHASE, PHASE_TAG, TrialRecord, child_runs
from tuning.figures import plot_critical_batch
from tuning.tables import critical_markdown

OUT = Path(__file__).resolve().parent / "out"
DROPCONNECT_PARENT = "39484aa5f4d549c1b2bb9da9ef93e0cc"
TRAIN_SIZE = 10_000
"""n of both CNN sweeps (Fashion-MNIST 10k): updates = passes · n / B."""


def dropconnect_records(archive: Path = OUT / "state.tar.gz") -> list[TrialRecord]:
    """§4's search and extension trials, read from the archived store unpacked into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extract("mlflow.db", tmp, filter="data")
        runs = child_runs(f"sqlite:///{tmp}/mlflow.db", DROPCONNECT_PARENT)
        return [TrialRecord.from_run(r) for r in runs if r.data.tags.get(PHASE_TAG) != CONFIRM_PHASE]


def batch_scaling_records(pairs_md: Path = OUT / "batch-scaling" / "pairs.md") -> list[TrialRecord]:
    """Figures 1–2's pairs as pseudo-seed records (module docstring); unreached pairs as max_passes."""
    records: list[TrialRecord] = []
    for line in pairs_md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 11 or cells[0] != "vanilla":
            continue
        batch, step, (reached, seeds) = int(cells[1]), float(cells[2]), map(int, cells[3].split("/"))
        bound = float(cells[7])
        values: list[float | None] = [None] * seeds
        if reached == seeds:
            mean, std = (float(v) for v in cells[5].split(" ± "))
            values = [mean - std, mean, mean + std]
        for seed, passes in enumerate(values):
            reached_it = passes is not None
            records.append(
                TrialRecord(
                    f"t{len(records)}",
                    "vanilla",
                    step,
                    batch,
                    "reached_target" if reached_it else "max_passes",
                    seed=seed,
                    time_to_accuracy_s=1.0 if reached_it else None,
                    updates_to_accuracy=round(passes * TRAIN_SIZE / batch) if passes is not None else None,
                    batch_bound_w0=bound,
                    batch_bound_median=float(cells[8]),
                )
            )
    return records


def ratio_rows(fits: list[CriticalFit]) -> list[str]:
    """B_crit and B_D of each mechanism over vanilla's, B_crit's with its 95% interval (independent resamples)."""
    samples = {f.mechanism: b_crit_samples(f.points, seed=i) for i, f in enumerate(fits) if f.fitted}
    base = next(f for f in fits if f.mechanism == "vanilla")
    lines = ["| mechanism | B_crit / B_crit(vanilla) | B_D(w0) / B_D(w0, vanilla) |", "|---|---:|---:|"]
    for f in fits:
        s, v = samples.get(f.mechanism), samples.get("vanilla")
        if f is base or s is None or v is None or f.b_crit is None or base.b_crit is None:
            continue
        low, high = np.quantile(s / v, [0.025, 0.975], method="inverted_cdf")
        bd = (f.batch_bound_w0 or 0) / (base.batch_bound_w0 or 1)
        lines.append(f"| {f.mechanism} | {f.b_crit / base.b_crit:.2f} ({low:.2f}–{high:.2f}) | {bd:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paper.critical", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "raygd-critical")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("dropconnect", dropconnect_records()), ("batch-scaling", batch_scaling_records())):
        fits = critical_batch(records)
        print(f"## {name}\n\n{critical_markdown(fits)}")
        if len(fits) > 1:
            print("\n".join(ratio_rows(fits)) + "\n")
        print(plot_critical_batch(fits, args.out / f"critical_batch_{name}.png"), "\n")


if __name__ == "__main__":
    main()
