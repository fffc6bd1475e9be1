"""Reproduce the paper's experiments (issue #7) with raygd; each writes a table and a figure.

    python -m bench.paper.run fig3a          # Figure 3a: loss ratio vs replication (logistic regression)
    python -m bench.paper.run dropconnect    # section 4: DropConnect speedup, CNN on 2 workers (Ray Tune)
    python -m bench.paper.run batch-scaling  # Figures 1-2: per-pass speedup and passes to accuracy vs B
    python -m bench.paper.run bound          # B_D at w0 and along training vs the best B the sweeps found
    python -m bench.paper.run dropconnect-link --rho 1   # #15: section 4's projected winners measured under
                                                         # an emulated link of that ρ (after dropconnect)
    python -m bench.paper.run fig3a --set 'sweep.space.seed=[0,1]'   # scaled down (any --set of raygd sweep)
    python -m bench.paper.run dropconnect --report-only             # rebuild from the latest MLflow parent run
    python -m bench.paper.run dropconnect --resume                  # finish an interrupted sweep

Search spaces and seeds are fixed in tuning/presets/paper-*.yaml and bench/paper/bound.yaml.
Outputs: bench/paper/out/<experiment>/ (table.md, figure.png, ...), also logged to the
experiment's MLflow parent run; the MLflow store defaults to bench/paper/out/mlflow.db.

fig3a runs its trials in this process by default (``--engine inprocess``: raygd's own
``raygd.loop.run_loop`` with one worker; raygd's sampler gives P=1 and P=2
the same examples and the same weights, and the loss ratio does not depend on wall-clock),
evaluating every run at the same points in passes; ``--engine ray`` runs the same grid as a
Ray Tune sweep (``tuning.sweep.run_sweep``), for a cluster. The CNN sweeps always use Ray Tune:
their result is wall-clock time to accuracy on 2 workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.paper import results
from raygd.records import (
    KIND_TAG,
    MECHANISM_LABEL_TAG,
    STATUS_TAG,
    SWEEP_KIND,
    TRIAL_TAG,
    Status,
    child_runs,
    latest_sweep,
    mlflow_client,
    newest_sweep,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DEFAULT_URI = f"sqlite:///{OUT / 'mlflow.db'}"
PRESETS = {"fig3a": "paper-fig3a", "dropconnect": "paper-dropconnect", "batch-scaling": "paper-batch-scaling"}
BOUND_CONFIG = HERE / "bound.yaml"
BOUND_EVERY = 20
BOUND_DROP_PROBS = (0.4, 0.5)


def _spec(name: str, args: argparse.Namespace):
    from tuning.spec import load_sweep_spec

    return load_sweep_spec(PRESETS[name], [f"tracking.tracking_uri={args.tracking_uri}", *args.overrides])


def _log_to_parent(uri: str, run_id: str, paths: list[Path]) -> None:
    from raygd.tracking import Tracker

    tracker = Tracker(uri, run_id, enabled=True)
    for path in paths:
        tracker.log_artifact(path)


def _emit(name: str, table: str, paths: list[Path], uri: str, run_id: str, extra: str = "") -> None:
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    _log_to_parent(uri, run_id, [out / "table.md", *paths])
    print(f"\n== {name} ==\n{table}{extra}")
    print("files: " + ", ".join(str(p.relative_to(HERE.parent.parent)) for p in paths))
    print(f"MLflow parent run {run_id} (store {uri})")


# --------------------------------------------------------------------------- Figure 3a


def _run_inprocess_trial(
    cfg, data, grid_examples: int, parent_run_id: str, label: str, trial: str, tags: dict[str, str]
) -> None:
    """One trial in this process: raygd's loop with the config's B and step size, evaluated every grid_examples,
    trained for max_passes whatever the accuracy. A replication-control run (``data.replication_control``)
    is evaluated on ``data.paired_eval_index`` (by ``build_state``): the replicated arm's evaluation sample."""
    from raygd.loop import build_state, every_examples, run_loop
    from raygd.tracking import Tracker, create_run

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=1))
    tc = cfg.train
    arm = "-control" if cfg.data.replication_control else ""
    run_id = create_run(
        cfg.tracking.tracking_uri,
        cfg.tracking.experiment_name,
        f"{trial}-{label}{arm}-r{cfg.data.replication}-B{tc.global_batch_size}-lr{tc.step_size:g}-s{tc.seed}",
        {**cfg.flat(), "engine": "inprocess"},
        {**tags, TRIAL_TAG: trial, MECHANISM_LABEL_TAG: label},
        parent_run_id=parent_run_id,
    )
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=True)
    state = build_state(cfg, data)  # a control run evaluates on data.paired_eval_index (raygd.loop.build_state)
    summary = run_loop(
        state,
        tracker,
        stop_at_target=False,
        eval_due=every_examples(grid_examples, tc.global_batch_size),
    )
    tracker.log_metrics(summary.summary_metrics(), step=summary.steps)
    tracker.set_tags({STATUS_TAG: summary.status})
    tracker.finish("FINISHED")


def control_config(cfg):
    """The replication control of an r-replicated run (r >= 2): the same seed's n/r distinct examples,
    each once (``data.replication_control``), trained for r x max_passes over them, i.e. the replicated
    run's number of updates and examples processed.

    Equal updates, not equal passes over the n/r examples: with ``with_replacement`` sampling a uniform
    draw from the replicated set is a uniform draw from its distinct examples, so at equal updates the
    control is the replicated run's process in distribution. Whatever the loss ratio does with r is then
    shared by "the same n/r examples, without replication": a ratio that matched the control would
    come from the number of distinct examples (and passes over them), not from repeating them.
    Equal passes over n/r would instead cut the control's updates by r and compare runs of different
    length.
    """
    r = cfg.data.replication
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, replication_control=True),
        train=dataclasses.replace(cfg.train, max_passes=cfg.train.max_passes * r),
    )


def grid_examples(cfg, n: int, b_max: int) -> int:
    """Examples between evaluations, the same for every B of the sweep: train.eval_every_steps updates of
    the largest B when that override is set, else train.eval_every_passes of the n examples rounded up
    to a multiple of the largest B (so every B dividing it evaluates at the same example counts)."""
    tc = cfg.train
    if tc.eval_every_steps is not None:
        return tc.eval_every_steps * b_max
    return math.ceil(max(1, round(tc.eval_every_passes * n)) / b_max) * b_max


def fig3a_jobs(spec, control: bool = True) -> list[tuple[dict, bool]]:
    """(trial params, is_control) in run order: seed slowest, then replication, the replicated arm before
    its control (r >= 2 only, when ``control``), the rest in the grid's order. Seeds finish one after
    another, so a run cut short leaves whole seeds, and each (seed, r, arm) loads its data once."""
    jobs = [(p, False) for p in spec.trial_params()]
    if control:
        jobs += [(p, True) for p in spec.trial_params() if p.get("replication", 1) >= 2]
    return sorted(jobs, key=lambda job: (job[0].get("seed", 0), job[0].get("replication", 1), job[1]))  # stable


def _fig3a_inprocess(spec, control: bool = True) -> str:
    import torch

    from raygd.data import load_data
    from raygd.tracking import create_run, provenance_tags
    from tuning.spec import mechanism_label

    jobs = fig3a_jobs(spec, control)
    # One worker's threads, as Ray Train gives it (train.cpus_per_worker): on a shared 2-core machine
    # torch's default 2 intra-op threads made a B=16 logistic-regression step 15-35x slower (measured).
    torch.set_num_threads(spec.run_config(jobs[0][0]).train.cpus_per_worker)
    b_max = max(spec.space["global_batch_size"])
    first = spec.run_config(jobs[0][0])
    grid = grid_examples(first, load_data(first.data, first.train.seed).n, b_max)  # r-replication keeps n
    parent = create_run(
        spec.tracking_uri,
        spec.name,
        f"sweep-{spec.name}",
        {
            "engine": "inprocess",
            "num_trials": len(jobs),
            "replication_control": control,
            "eval_every_examples": grid,
            **{f"space.{k}": json.dumps(v) for k, v in spec.space.items()},
        },
        provenance_tags({KIND_TAG: SWEEP_KIND}),
    )
    tags = provenance_tags()  # git and library versions: once, not per trial (0.3 s each)
    start, cache = time.time(), {}
    for i, (params, ctrl) in enumerate(jobs):
        cfg = spec.run_config(params)
        cfg = control_config(cfg) if ctrl else cfg
        key = (cfg.data.replication, ctrl, cfg.train.seed)
        if key not in cache:
            cache = {key: load_data(cfg.data, cfg.train.seed)}  # jobs vary seed, r and arm slowest: keep one
        _run_inprocess_trial(cfg, cache[key], grid, parent, mechanism_label(params["mechanism"]), f"t{i:04d}", tags)
        if (i + 1) % 20 == 0:
            print(f"  fig3a: {i + 1}/{len(jobs)} runs, {time.time() - start:.0f} s", flush=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(spec.tracking_uri).set_terminated(parent, "FINISHED")
    return parent


def _curves(uri: str, parent: str) -> list[dict]:
    """Every child run of ``parent`` with its loss curve (train/loss against progress/passes)."""
    from mlflow.tracking import MlflowClient

    client, out = MlflowClient(uri), []
    for run in child_runs(uri, parent):
        p, rid = run.data.params, run.info.run_id
        passes = {m.step: m.value for m in client.get_metric_history(rid, "progress/passes")}
        loss = {m.step: m.value for m in client.get_metric_history(rid, "train/loss")}
        steps = sorted(passes.keys() & loss.keys())
        control = p.get("data.replication_control") == "True"
        r = int(p.get("data.replication", 1))
        scale = 1 / r if control else 1.0  # the control's passes over n/r -> examples processed / n
        curve = results.Curve(tuple(passes[s] * scale for s in steps), tuple(loss[s] for s in steps))
        if run.data.tags.get(STATUS_TAG) == Status.DIVERGED:
            curve = results.Curve((*curve.passes, math.inf), (*curve.loss, math.nan))
        out.append(
            {
                "replication": r,
                "control": control,
                "mechanism": run.data.tags.get(MECHANISM_LABEL_TAG, p.get("mechanism.name")),
                "global_batch_size": int(p["train.global_batch_size"]),
                "step_size": float(p["train.step_size"]),
                "seed": int(p["train.seed"]),
                "curve": curve,
            }
        )
    return out


def exp_fig3a(args: argparse.Namespace) -> None:
    from tuning.sweep import run_sweep

    spec = _spec("fig3a", args)
    if args.report_only:
        parent = latest_sweep(spec.tracking_uri, spec.name)
    elif args.engine == "ray":
        print("fig3a --engine ray: the replicated grid only (the replication control runs in-process)")
        parent = run_sweep(spec).parent_run_id
    else:
        parent = _fig3a_inprocess(spec, control=not args.no_control)
    small, large = min(spec.space["global_batch_size"]), max(spec.space["global_batch_size"])
    rows = results.fig3a_rows(_curves(spec.tracking_uri, parent), small, large)
    fig = results.plot_fig3a(rows, OUT / "fig3a" / "figure.png", small, large)
    table = results.fig3a_markdown(rows, small, large) + "\n" + results.fig3a_control_markdown(rows)
    _emit("fig3a", table, [fig], spec.tracking_uri, parent)


# --------------------------------------------------------------------------- CNN sweeps


def _sweep_outcome(name: str, args: argparse.Namespace):
    from tuning.report import collect_sweep
    from tuning.sweep import run_sweep

    spec = _spec(name, args)
    if args.report_only:
        return spec, collect_sweep(spec.tracking_uri, latest_sweep(spec.tracking_uri, spec.name))
    return spec, run_sweep(spec, resume=args.resume)


def exp_dropconnect(args: argparse.Namespace) -> None:
    from tuning import stats
    from tuning.report import write_outputs

    spec, outcome = _sweep_outcome("dropconnect", args)
    out = OUT / "dropconnect"
    paths = write_outputs(out, outcome.records, outcome.best_rows, outcome.table)
    figs = [p for p in paths if p.suffix == ".png" and p.name in ("speedup.png", "time_vs_batch.png")]
    by_mechanism: dict[str, list] = {}
    for pair in stats.pair_stats(outcome.records):
        by_mechanism.setdefault(pair.mechanism, []).append(pair)
    target = spec.run_config(spec.trial_params()[0]).train.target_accuracy
    per_batch = "\n".join(
        results.scaling_markdown(results.scaling_rows(pairs), target, label=mechanism)
        for mechanism, pairs in by_mechanism.items()
    )
    common = results.common_speed_markdown(results.common_speed_rows(outcome.records), target)
    table = outcome.table + "\n\n" + common + "\n" + per_batch
    _emit("dropconnect", table, figs, spec.tracking_uri, outcome.parent_run_id)


def exp_batch_scaling(args: argparse.Namespace) -> None:
    from tuning import stats, tables

    spec, outcome = _sweep_outcome("batch-scaling", args)
    pairs = [p for p in stats.pair_stats(outcome.records) if p.mechanism == results.BASELINE]
    rows = results.scaling_rows(pairs)
    fig = results.plot_scaling(rows, OUT / "batch-scaling" / "figure.png")
    every = OUT / "batch-scaling" / "pairs.md"  # every (γ, B) over its seeds, beside the best-step table
    every.write_text(tables.pairs_markdown(stats.every_pair(outcome.records)))
    target = spec.run_config(spec.trial_params()[0]).train.target_accuracy
    paths = [fig, every]
    _emit("batch-scaling", results.scaling_markdown(rows, target), paths, spec.tracking_uri, outcome.parent_run_id)


# --------------------------------------------------------------------------- §4 on an emulated link (#15)

LINK_NAME = "paper-dropconnect-link"
"""The MLflow experiment of the measured check: one sweep (parent run) per (mechanism, γ, B) measured."""
LINK_BATCH = 256
"""ρ = t_comm / t_compute is set for vanilla at this B on P = 2 (issue #15: ρ ≈ 0.1, 1, 10 at B = 256)."""
LINK_LATENCY_US = 50.0


def link_plan(trials: list, rho: float, neighbours: bool) -> tuple[Any, Any, list[tuple[str, float, int]]]:
    """The emulated link for ``rho`` and what to measure on it: per mechanism the projected best (γ, B) on P = 2
    (``raygd.project``: measured updates × modelled step; every seed reached), with ``neighbours`` also the next
    smaller and larger B tried, each at its own projected-best γ. Returns (link, projection, [(mechanism, γ, B)])."""
    from raygd import costmodel as cm
    from raygd import project as pj

    link = pj.link_for_rho(trials, rho, LINK_BATCH, workers=2, latency_us=LINK_LATENCY_US)
    bandwidth = float(f"{link.bandwidth_bytes_per_s * 8 / 1e9:.4g}")  # Gbit/s, as the run config states it
    link = cm.Link.from_gbps_us(bandwidth, LINK_LATENCY_US)
    proj = pj.project(trials, pj.Target(f"emulated link, ρ = {rho:g} at B = {LINK_BATCH}", link), workers=(2,))
    seeds: dict[tuple[str, int, float], list] = defaultdict(list)
    for row in proj.trials:
        seeds[(row["mechanism"], row["global_batch_size"], row["step_size"])].append(
            row["projected_time_to_accuracy_s"]
        )
    at_batch: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)  # mechanism -> B -> (TTA, γ)
    for (mech, batch, step), ttas in sorted(seeds.items()):
        if all(t != "" for t in ttas):
            tta = statistics.fmean(ttas)  # the mean, as raygd.project ranks pairs
            if batch not in at_batch[mech] or tta < at_batch[mech][batch][0]:
                at_batch[mech][batch] = (tta, step)
    plan = []
    for mech, by_b in sorted(at_batch.items(), key=lambda kv: (kv[0] != results.BASELINE, kv[0])):
        batches = sorted(by_b)
        i = min(range(len(batches)), key=lambda k: by_b[batches[k]][0])
        for b in batches[max(0, i - 1) : i + 2] if neighbours else [batches[i]]:
            plan.append((mech, by_b[b][1], b))
    return link, proj, plan


def _link_overrides(spec, mech: str, step: float, batch: int, link) -> list[str]:
    from raygd.mechanisms import mechanism_label

    mechs = {mechanism_label(m): m for m in spec.space["mechanism"]}
    bw = link.bandwidth_bytes_per_s * 8 / 1e9
    return [
        f"sweep.name={LINK_NAME}",
        f"sweep.space.mechanism={json.dumps([mechs[mech]])}",
        f"sweep.space.step_size=[{step!r}]",
        f"sweep.space.global_batch_size=[{batch}]",
        "sweep.extend_edges=false",
        f"train.network={{bandwidth_gbps: {bw!r}, latency_us: {LINK_LATENCY_US!r}}}",
    ]


def _link_sweeps(uri: str) -> list:
    """The measured check's parent runs, newest first."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(LINK_NAME)
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id], f"tags.`{KIND_TAG}` = '{SWEEP_KIND}'", order_by=["attributes.start_time DESC"]
    )


def _same_setting(run, spec) -> bool:
    """Whether a parent run of the check measured the setting of ``spec`` (its space and its link)."""
    p = run.data.params
    net = spec.run_config(spec.trial_params()[0]).train.network
    return (
        all(p.get(f"space.{k}") == json.dumps(v) for k, v in spec.space.items())
        and p.get("base.train.network.bandwidth_gbps") == str(net.bandwidth_gbps)
        and p.get("base.train.network.latency_us") == str(net.latency_us)
    )


def exp_dropconnect_link(args: argparse.Namespace) -> None:
    """#15: the §4 sweep's projected winners on P = 2, measured under the emulated link of ρ = ``--rho``."""
    from raygd import project as pj
    from tuning.report import collect_sweep
    from tuning.spec import load_sweep_spec
    from tuning.sweep import run_sweep

    source = latest_sweep(args.tracking_uri, PRESETS["dropconnect"])
    trials = [t for t in pj.read_trials(args.tracking_uri, source) if not t.emulated]
    link, proj, plan = link_plan(trials, args.rho, args.neighbours)
    bw = link.bandwidth_bytes_per_s * 8 / 1e9
    print(f"emulated link: {bw:.4g} Gbit/s, {LINK_LATENCY_US:g} µs (ρ = {args.rho:g} for vanilla at B = {LINK_BATCH})")
    for mech, step, batch in plan:
        print(f"  measure {mech} γ={step:g} B={batch}")
    base = _spec("dropconnect", args)
    specs = [
        load_sweep_spec(
            PRESETS["dropconnect"], [f"tracking.tracking_uri={args.tracking_uri}", *_link_overrides(base, *s, link)]
        )
        for s in plan
    ]
    if not args.report_only:
        for spec in specs:
            done = [r for r in _link_sweeps(args.tracking_uri) if _same_setting(r, spec)]
            if any(r.info.status == "FINISHED" for r in done):
                continue
            newest_running = newest_sweep(args.tracking_uri, LINK_NAME, running_only=True)
            resume = bool(done) and newest_running is not None and newest_running.info.run_id == done[0].info.run_id
            run_sweep(spec, resume=resume)
    measured, sweeps = [], _link_sweeps(args.tracking_uri)
    for spec in specs:
        parents = [r for r in sweeps if _same_setting(r, spec) and r.info.status == "FINISHED"]
        if parents:
            measured += collect_sweep(args.tracking_uri, parents[0].info.run_id).records
    table = results.link_check_markdown(
        results.link_check_rows(proj.trials, measured), link_text=f"{bw:.4g} Gbit/s, {LINK_LATENCY_US:g} µs"
    )
    if not measured:  # --report-only before any setting finished: nothing to record
        print(table)
        return
    _emit(
        f"dropconnect-link-rho{args.rho:g}",
        table,
        [],
        args.tracking_uri,
        sweeps[0].info.run_id,
    )


# --------------------------------------------------------------------------- bound


def _best_batches(uri: str) -> dict[str, tuple[int | None, str]]:
    """Best B per setting from the latest paper-dropconnect / paper-batch-scaling sweeps in MLflow."""
    from raygd.config import ConfigError
    from raygd.mechanisms import parse_label, surrogate_label
    from tuning.report import collect_sweep

    best: dict[str, tuple[int | None, str]] = {}
    for name in ("paper-dropconnect", "paper-batch-scaling"):
        try:
            outcome = collect_sweep(uri, latest_sweep(uri, name))
        except ConfigError:
            continue
        for row in outcome.best_rows:
            setting = surrogate_label(parse_label(row.mechanism))  # dropconnect(p=0.4, per_group) -> (p=0.4)
            if setting not in best and row.time_to_accuracy_s is not None:
                best[setting] = (row.global_batch_size, f"{name} sweep")
    return best


def exp_bound(args: argparse.Namespace) -> None:
    from raygd import measure
    from raygd.config import load_run_config
    from raygd.mechanisms import surrogate_label

    cfg = load_run_config(str(BOUND_CONFIG), [f"tracking.tracking_uri={args.tracking_uri}", *args.overrides])
    t0 = time.time()
    rows = measure.measure_replications(cfg, [1], ["vanilla"])
    bounds = {"vanilla": rows[0].batch_bound}
    # DropConnect's B_D is a Monte Carlo over per-example masks of the CNN's fc weights (~3M draws per
    # example and draw): on 2 cores only a subset is affordable; vanilla is measured on it too, like for like.
    sub = (
        cfg
        if not args.dc_sample
        else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=args.dc_sample))
    )
    if args.dc_sample:
        rows += [
            dataclasses.replace(r, mechanism=f"vanilla_n{args.dc_sample}")
            for r in measure.measure_replications(sub, [1], ["vanilla"])
        ]
        bounds[rows[-1].mechanism] = rows[-1].batch_bound
    for p in BOUND_DROP_PROBS:
        mech = dataclasses.replace(cfg.mechanism, name="dropconnect", drop_prob=p)
        rows += [
            dataclasses.replace(r, mechanism=f"dropconnect_p{p:g}")
            for r in measure.measure_replications(dataclasses.replace(sub, mechanism=mech), [1], ["dropconnect"])
        ]
        bounds[surrogate_label(mech)] = rows[-1].batch_bound
    print(f"  bound: CNN at w0 measured in {time.time() - t0:.0f} s", flush=True)
    along = measure.measure_along_training(cfg, BOUND_EVERY)
    print(f"  bound: along training measured in {time.time() - t0:.0f} s", flush=True)
    from tuning.spec import load_sweep_spec

    spec3 = load_sweep_spec(PRESETS["fig3a"], [f"tracking.tracking_uri={args.tracking_uri}"])  # its own config
    cfg3 = spec3.run_config(spec3.trial_params()[0])
    lr_rows = [
        dataclasses.replace(r, mechanism=f"logreg-{r.mechanism}")
        for r in measure.measure_replications(cfg3, sorted(spec3.space["replication"]), ["vanilla", "dropconnect"])
    ]
    run_id = measure.record(cfg, rows + lr_rows, along)
    best = _best_batches(cfg.tracking.tracking_uri)
    table_rows = results.bound_vs_best(bounds, {"vanilla": min(r.batch_bound for r in along)}, best)
    fig = results.plot_bound([(r.passes, r.batch_bound) for r in along], table_rows, OUT / "bound" / "figure.png")
    b3 = sorted(spec3.space["global_batch_size"])
    dc_n = f"a random subset of n={args.dc_sample}" if args.dc_sample else "the same data"
    table = (
        f"MNIST CNN on Fashion-MNIST (n={rows[0].n}), exact B_D = nΔ_D; DropConnect: per-example masks, "
        f"Monte Carlo, on {dc_n} (its own B_D = nΔ_D there). Along training: vanilla SGD, "
        f"B={cfg.train.global_batch_size}, step size "
        f"{cfg.train.step_size:g}, every {BOUND_EVERY} updates.\n\n"
        + results.bound_markdown(table_rows)
        + "\nB_D along training (vanilla):\n\n"
        + measure.table(along)
        + f"\n\nFigure 3a's logistic regression at w0 (compare with its B = {b3}):\n\n"
        + measure.table(lr_rows)
        + "\n"
    )
    _emit("bound", table, [fig], cfg.tracking.tracking_uri, run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["fig3a", "dropconnect", "batch-scaling", "bound", "dropconnect-link"])
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="raygd overrides (section.field=value, sweep.space.seed=[0,1]); repeatable",
    )
    parser.add_argument("--tracking-uri", default=DEFAULT_URI, help="MLflow store (default %(default)s)")
    parser.add_argument(
        "--engine",
        choices=["inprocess", "ray"],
        default="inprocess",
        help="fig3a only: run trials in this process (default) or as a Ray Tune sweep",
    )
    parser.add_argument(
        "--no-control",
        action="store_true",
        help="fig3a only: skip the replication control (n/r distinct examples, no replication, equal updates)",
    )
    parser.add_argument(
        "--dc-sample",
        type=int,
        default=0,
        help="bound only: measure DropConnect's B_D on a random subset of this size (0: all data)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="dropconnect / batch-scaling: finish the latest interrupted sweep of this experiment (runs of hours "
        "can span sessions) instead of starting a new one",
    )
    parser.add_argument(
        "--rho",
        type=float,
        default=1.0,
        help="dropconnect-link only: the emulated link's ρ = t_comm / t_compute for vanilla at B = 256 on P = 2",
    )
    parser.add_argument(
        "--neighbours",
        action="store_true",
        help="dropconnect-link only: also measure the B next to each projected winner, at its own best γ",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild table and figure from the latest MLflow parent run, run nothing",
    )
    args = parser.parse_args(argv)
    if args.resume and (args.experiment not in ("dropconnect", "batch-scaling") or args.report_only):
        parser.error(
            f"--resume is for the Ray Tune sweeps dropconnect and batch-scaling without --report-only, "
            f"not {args.experiment}{' --report-only' if args.report_only else ''}"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    from bench.paper import archive

    if args.tracking_uri == DEFAULT_URI and not archive.store_path(DEFAULT_URI).exists() and archive.ARCHIVE.exists():
        archive.restore(
            archive.store_path(DEFAULT_URI)
        )  # a new machine: the committed store (and unfinished sweeps' Tune folders) first
        print(f"restored {DEFAULT_URI} and its unfinished sweeps' Tune folders from {archive.ARCHIVE}")
    start = time.time()
    experiments = {
        "fig3a": exp_fig3a,
        "dropconnect": exp_dropconnect,
        "batch-scaling": exp_batch_scaling,
        "bound": exp_bound,
        "dropconnect-link": exp_dropconnect_link,
    }
    experiments[args.experiment](args)
    print(f"wall time {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
