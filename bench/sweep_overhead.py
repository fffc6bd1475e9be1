"""Where a sweep's wall time goes: per-trial start overhead and the fraction spent training.

Runs a small grid sweep (default: the quickstart grid's 4 vanilla trials, then its one round of 4
beyond the winners' grid edges: 8 trials) on local Ray and
reads, from each trial's MLflow child run, the start-up breakdown raygd records:

- ``overhead/trial_to_first_step_s``: trial function entry -> first training step;
- ``overhead/fit_setup_s``: data load, MLflow run, object store put (driver side of fit);
- ``overhead/worker_start_s``: TorchTrainer.fit() -> worker loop entry (Train controller,
  worker actors, torch process group);
- ``overhead/loop_setup_s``: loop entry -> first step (data fetch, model, DDP wrap);

and prints them with the sweep's wall time and the fraction of it spent in training steps.
On Linux it also samples /proc and prints the CPU seconds each kind of Ray process used per
trial (on 2 cores the sum bounds the start-up wall time from below, whatever the load).

``--ab pool`` runs the same grid with warm trial pools (``sweep.trial_pool: true``, the default) and
with one TorchTrainer per trial, ``--ab reuse`` without and with Tune reusing the trial actor
(``tuning.sweep.REUSE_TRIAL_ACTORS``), ``--ab rounds`` with each edge round a Tune experiment of its
own and with the rounds in the grid's experiment (``tuning.sweep.INLINE_EDGE_ROUNDS``, ``tuning.rounds``;
its figure is the gap from the grid's last trial to the first round trial's first step): A and B
alternate ``--pairs`` times in one Ray session, and
the table gives each figure's median over the pairs and the median of the paired ratios with its
min-max, with the load average over the run.

    .venv/bin/python -m bench.sweep_overhead [--preset quickstart] [--set k=v ...] [--ab pool|reuse] [--pairs 5]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import threading
import time
from pathlib import Path

import tuning.sweep as sweep
from raygd.records import EXTEND_PHASE, PHASE_TAG, SEARCH_PHASE, child_runs
from tuning.spec import load_sweep_spec

KEYS = ("overhead/trial_to_first_step_s", "overhead/fit_setup_s", "overhead/worker_start_s", "overhead/loop_setup_s")


class ProcessCpu:
    """CPU seconds of every process under this one (the local Ray cluster is), by process title,
    sampled from /proc every ``interval_s``; a process that ends between samples loses its last bit."""

    def __init__(self, interval_s: float = 0.5):
        self.tick, self.interval_s, self.last, self.title = os.sysconf("SC_CLK_TCK"), interval_s, {}, {}
        self.enabled = Path("/proc/self/stat").exists()
        if self.enabled:
            threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        stats = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
                fields = text[text.rindex(")") + 2 :].split()
                stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]), fields[19])
            except (OSError, ValueError, IndexError):
                continue
        children = collections.defaultdict(list)
        for pid, (ppid, _, _) in stats.items():
            children[ppid].append(pid)
        todo = [os.getpid()]
        while todo:
            pid = todo.pop()
            todo.extend(children[pid])
            if pid not in stats:
                continue
            key = (pid, stats[pid][2])
            self.last[key] = max(self.last.get(key, 0), stats[pid][1])
            try:
                title = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
            except OSError:
                continue
            if title.startswith("ray::") or key not in self.title:  # Ray actors retitle themselves
                self.title[key] = title.split(".")[0] if title.startswith("ray::") else Path(title).name

    def snapshot(self) -> dict:
        self.sample()
        return dict(self.last)

    def by_title(self, before: dict, after: dict) -> collections.Counter:
        out = collections.Counter()
        for key, ticks in after.items():
            out[self.title.get(key, "?")] += (ticks - before.get(key, 0)) / self.tick
        return out


def run_once(spec, cpu: ProcessCpu) -> dict:
    before, start = cpu.snapshot(), time.perf_counter()
    outcome = sweep.run_sweep(spec)
    wall = time.perf_counter() - start
    time.sleep(2)  # let the last trial's processes end
    runs = child_runs(spec.tracking_uri, outcome.parent_run_id)
    return {"spec": spec, "runs": runs, "wall": wall, "cpu": cpu.by_title(before, cpu.snapshot())}


def report(result: dict) -> dict[str, float]:
    spec, runs, wall = result["spec"], result["runs"], result["wall"]
    train_s = sum(r.data.metrics.get("train_time_s", 0.0) for r in runs)
    pool_start = _parent_metric(spec, runs, "pool/start_s")
    eval_s = sum(r.data.metrics.get("eval_time_s", 0.0) for r in runs)
    print(f"\nsweep {spec.name}: {len(runs)} trials, wall {wall:.1f} s (includes Ray start and the final analysis)")
    print("| per trial | median s | min s | max s |\n|---|---:|---:|---:|")
    medians = {}
    for key in KEYS:
        values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
        if values:
            medians[key] = statistics.median(values)
            print(f"| {key} | {medians[key]:.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(
        f"\ntraining steps: {train_s:.1f} s = {train_s / wall:.1%} of the sweep wall time; "
        f"evaluation {eval_s:.1f} s; everything else (start-up, Tune, MLflow) "
        f"{(wall - train_s - eval_s) / len(runs):.1f} s per trial"
    )
    extend = [r for r in runs if r.data.tags.get(PHASE_TAG) == EXTEND_PHASE]
    search = [r for r in runs if r.data.tags.get(PHASE_TAG) == SEARCH_PHASE]
    if extend and search:  # the grid's last run ends -> the first round trial's first training step
        first = min(extend, key=lambda r: r.info.start_time)
        to_step = first.data.metrics.get("overhead/fit_to_first_step_s", 0.0)
        gap = (first.info.start_time - max(r.info.end_time for r in search)) / 1e3 + to_step
        medians["round_gap_s"] = gap
        print(f"grid's last trial -> first step of the first round trial: {gap:.1f} s")
    medians["train_fraction"] = train_s / wall
    medians["sweep_wall_s"] = wall
    if pool_start is not None:
        print(f"pool start (launch -> first pool ready, once per sweep): {pool_start:.1f} s")
        medians["pool/start_s"] = pool_start
    if result["cpu"]:
        total = sum(result["cpu"].values())
        print(f"\nCPU seconds per trial by process ({total / len(runs):.1f} s in all; Ray start included):")
        print("| process | CPU s per trial |\n|---|---:|")
        for title, seconds in result["cpu"].most_common(12):
            print(f"| {title} | {seconds / len(runs):.2f} |")
        medians["cpu_per_trial_s"] = total / len(runs)
    return medians


def _parent_metric(spec, runs, key: str) -> float | None:
    if not runs:
        return None
    from mlflow.tracking import MlflowClient

    parent = MlflowClient(spec.tracking_uri).get_run(runs[0].data.tags["mlflow.parentRunId"])
    return parent.data.metrics.get(key)


VARIANTS = {
    "pool": (("one fit per trial", ["sweep.trial_pool=false"]), ("warm pool", ["sweep.trial_pool=true"])),
    "reuse": (("reuse off", []), ("reuse on", [])),
    "rounds": (("a Tune experiment per round", []), ("rounds in the grid's experiment", [])),
}


def ab(args, cpu: ProcessCpu) -> None:
    """A and B alternate ``args.pairs`` times; medians per variant and the median of paired ratios B / A."""
    import ray

    figures: dict[int, list[dict]] = {0: [], 1: []}
    load = [os.getloadavg()[0]]
    for pair in range(args.pairs):
        for which, (label, extra) in enumerate(VARIANTS[args.ab]):
            if args.ab == "reuse":
                sweep.REUSE_TRIAL_ACTORS = bool(which)
            if args.ab == "rounds":
                sweep.INLINE_EDGE_ROUNDS = bool(which)
            name = f"sweep.name=bench-sweep-overhead-{args.ab}-{which}"
            print(f"\n=== pair {pair + 1}/{args.pairs}: {label}")
            figures[which].append(report(run_once(load_sweep_spec(args.preset, [*args.overrides, *extra, name]), cpu)))
            load.append(os.getloadavg()[0])
    (a_label, _), (b_label, _) = VARIANTS[args.ab]
    print(
        f"\n{args.pairs} interleaved pairs in one Ray session ({ray.__version__}); load average (1 min) "
        f"{min(load):.1f}-{max(load):.1f}"
    )
    print(f"| figure | {a_label} (median) | {b_label} (median) | {b_label} / {a_label}: median of pairs (min-max) |")
    print("|---|---:|---:|---:|")
    for key in figures[0][0]:
        both = zip(figures[0], figures[1], strict=True)
        pairs = [(a[key], b[key]) for a, b in both if key in a and key in b and a[key]]
        if not pairs:
            continue
        ratios = [b / a for a, b in pairs]
        a_med, b_med = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
        print(
            f"| {key} | {a_med:.2f} | {b_med:.2f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    for key in ("pool/start_s",):
        values = [f[key] for f in figures[1] if key in f]
        if values:
            print(f"| {key} (once per sweep) | – | {statistics.median(values):.2f} | – |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=["sweep.space.mechanism=[{name: vanilla}]", "sweep.name=bench-sweep-overhead"],
    )
    parser.add_argument(
        "--ab",
        choices=sorted(VARIANTS),
        help="pool: warm pools vs one fit per trial; reuse: Tune's trial actor reused or not; "
        "rounds: edge rounds in experiments of their own vs in the grid's",
    )
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs for --ab (default 5)")
    args = parser.parse_args()
    cpu = ProcessCpu()
    if args.ab:
        ab(args, cpu)
    else:
        report(run_once(load_sweep_spec(args.preset, args.overrides), cpu))


if __name__ == "__main__":
    main()
