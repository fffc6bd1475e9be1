"""Does the cost model predict time to accuracy? Predicted vs measured on 2 workers over emulated links.

One 2-process gloo group (spawned once, no Ray) runs everything, one run at a time:

1. link calibration: timed gloo all-reduces of 1 KB–16 MB on this machine, fitted as
   t = 2α + bytes/β (``raygd.costmodel.fit_link``), fit and residuals printed;
2. per (B, mechanism): a plain run (the machine's own link), the same run under each emulated link
   (``train.network``) and under a free link (what the emulation itself costs: hook, sleep wake-up),
   in alternating order (plain first, then last, ...: bench/pairing.py), all of it ``--reps`` times;
3. the compute fit t_step = fixed + c·B/P per mechanism from the plain runs' step times;
4. per emulated setting: predicted TTA = updates to target of the *plain* run × (fitted compute step
   + the cost model's communication on that link), against the emulated run's measured TTA.

The prediction never sees the emulated run: it transfers updates (P- and link-independent, checked:
the emulated run's updates must equal the plain one's) and models time. Goal: median error ≤ 10%.
A second error column pairs within each repetition (bench/pairing.py): that repetition's plain step time
at the same B plus the modelled link, against that repetition's emulated run; the median of the ratios.
The free-link arm's cost per update (the emulation's own: hook, sleep wake-up) is printed beside.

    .venv/bin/python -m bench.projection                 # logistic regression, Fashion-MNIST subset
    .venv/bin/python -m bench.projection --smoke         # a few seconds, synthetic data
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.pairing import SAY, LoadAverage, provenance
from raygd import costmodel as cm
from raygd.config import load_run_config
from raygd.data import load_data
from raygd.loop import train_rank

OUT = Path(__file__).resolve().parent / "out" / "projection.md"
LINKS = {
    "slow": {"bandwidth_gbps": 0.05, "latency_us": 500.0},
    "medium": {"bandwidth_gbps": 0.5, "latency_us": 100.0},
}
ZERO = {"bandwidth_gbps": 1e6, "latency_us": 0.0}
"""A free link: what the emulation itself costs per update on this machine (hook, sleep wake-up)."""
MECHANISMS = ("vanilla", "quantize")


def _cfg(base: list[str], batch: int, mechanism: str, link: dict | None):
    net = (
        []
        if link is None
        else [f"train.network={{bandwidth_gbps: {link['bandwidth_gbps']}, latency_us: {link['latency_us']}}}"]
    )
    return load_run_config(None, [*base, f"train.global_batch_size={batch}", f"mechanism.name={mechanism}", *net])


def _time_collectives(sizes: list[int], reps: int) -> list[float]:
    times = []
    for size in sizes:
        t = torch.ones(size // 4)
        dist.all_reduce(t)
        runs = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            runs.append(time.perf_counter() - t0)
        times.append(statistics.median(runs))
    return times


def _worker(rank: int, world_size: int, port: int, jobs, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        sizes, reps, plan, data = jobs
        result = {"collectives": _time_collectives(sizes, reps), "runs": []}
        train_rank(plan[0][1], data, rank, world_size)  # warm-up: first-run costs (allocations, gloo buffers)
        for i, (name, cfg) in enumerate(plan):
            summary = train_rank(cfg, data, rank, world_size)
            result["runs"].append(
                (name, summary.updates_to_accuracy, summary.time_to_accuracy_s, summary.train_time_s, summary.steps)
            )
            if rank == 0:
                SAY(
                    f"  {i + 1}/{len(plan)} {name}: updates {summary.updates_to_accuracy}, "
                    f"TTA {summary.time_to_accuracy_s}"
                )
        out[rank] = result
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(base: list[str], batches: list[int], reps: int) -> list[tuple[tuple, object]]:
    """Every (B, mechanism): its plain run and its emulated runs together, the order reversed every other
    time; the whole list ``reps`` times. Names are (B, mechanism, link or None, repetition)."""
    plan, i = [], 0
    for rep in range(reps):
        for batch, mech in ((b, m) for b in batches for m in MECHANISMS):
            arms = [((batch, mech, None, rep), _cfg(base, batch, mech, None))]
            links = {**LINKS, "zero": ZERO}
            arms += [((batch, mech, name, rep), _cfg(base, batch, mech, link)) for name, link in links.items()]
            plan += arms if i % 2 == 0 else arms[::-1]
            i += 1
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="synthetic data, tiny: checks the path in seconds")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every run (medians; default 3)")
    args = parser.parse_args()
    if args.smoke:
        base = ["data.name=synthetic", "data.synthetic_size=1024", "train.target_accuracy=0.7", "train.step_size=0.5"]
        batches, sizes, reps = [32, 128], [1024, 65536, 1 << 20], 3
        args.reps = 1
    else:
        base = [
            "data.name=fashion_mnist",
            "data.train_size=10000",
            "data.eval_size=2000",
            "train.target_accuracy=0.78",
            "train.step_size=0.01",
        ]
        batches, sizes, reps = [32, 512], [1 << k for k in range(10, 25, 2)], 7
    base += [
        "train.model=logreg",
        "train.num_workers=2",
        "train.eval_every_steps=10",
        "train.diversity_estimator=none",
        "train.max_passes=20",
    ]
    load = LoadAverage()
    plan = _plan(base, batches, args.reps)
    data = load_data(plan[0][1].data, 0)
    num_params = 10 * (data.x_train[0].numel() + 1)
    SAY(f"bench.projection: {len(plan)} runs on 2 gloo workers, logreg ({num_params} parameters), {provenance()}")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), (sizes, reps, plan, data), out), nprocs=2, join=True)
        result = dict(out[0])
    load.stop()
    lines = [f"# bench.projection ({provenance()})", "", str(load), ""]
    link, fit = cm.fit_link([cm.link_bytes(s, 2) for s in sizes], result["collectives"], terms=2)
    lines += [
        f"gloo all-reduce on this machine, 1 KB–{sizes[-1] >> 20} MB, median of {reps}: "
        f"latency α = {link.latency_s * 1e6:.0f} µs, "
        f"bandwidth β = {link.bandwidth_bytes_per_s * 8 / 1e9:.2f} Gbit/s; residuals "
        + ", ".join(f"{s >> 10} KB {r * 1e6:+.0f} µs" for s, r in zip(sizes, fit.residuals, strict=True)),
        "",
    ]
    by_rep = {name: rest for name, *rest in result["runs"]}

    def median_of(batch, mech, link, index):
        values = [by_rep[(batch, mech, link, r)][index] for r in range(args.reps)]
        return None if any(v is None for v in values) else statistics.median(values)

    computes = {}
    for mech in MECHANISMS:
        xs = [b / 2 for b in batches]
        ys = [
            statistics.median(by_rep[(b, mech, None, r)][2] / by_rep[(b, mech, None, r)][3] for r in range(args.reps))
            for b in batches
        ]
        computes[mech], cfit = cm.fit_compute(xs, ys)
        lines.append(
            f"compute fit, {mech}: t_step = {computes[mech].fixed_s * 1e3:.3f} ms + "
            f"{computes[mech].per_example_s * 1e6:.2f} µs × B/P "
            f"(max relative residual {cfit.max_relative_residual:.1%}; medians of {args.reps} plain runs per B)"
        )

    def per_update(batch, mech, link):
        return statistics.median(
            by_rep[(batch, mech, link, r)][2] / by_rep[(batch, mech, link, r)][3] for r in range(args.reps)
        )

    overhead = {(b, m): per_update(b, m, "zero") - per_update(b, m, None) for b in batches for m in MECHANISMS}
    lines.append(
        "emulation overhead per update (free link minus plain, medians): "
        + ", ".join(f"B={b} {m} {v * 1e3:+.2f} ms" for (b, m), v in overhead.items())
    )
    lines += [
        "",
        "| B | mechanism | link | ρ | updates (plain = emulated, all reps) | predicted TTA s "
        "| measured TTA s (median) | error | error, paired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    errors, errors2 = [], []
    for batch in batches:
        for mech in MECHANISMS:
            plain_updates = by_rep[(batch, mech, None, 0)][0]
            for name, spec in LINKS.items():
                updates = {by_rep[(batch, mech, link, r)][0] for link in (None, name) for r in range(args.reps)}
                measured = median_of(batch, mech, name, 1)
                same = "equal" if len(updates) == 1 else f"DIFFER {sorted(updates, key=str)}"
                cost = cm.step_cost(
                    batch,
                    2,
                    computes[mech],
                    cm.payload_bytes(num_params, mech),
                    cm.Link.from_gbps_us(spec["bandwidth_gbps"], spec["latency_us"]),
                    collective=cm.collective_of(mech),
                )
                predicted = cm.time_to_accuracy(plain_updates, cost)
                if predicted is None or measured is None:
                    lines.append(
                        f"| {batch} | {mech} | {name} | {cost.rho:.2g} | {same} {plain_updates} | not reached | | |"
                    )
                    continue
                err = (predicted - measured) / measured
                comm = cost.total_s - cost.fixed_s - cost.compute_s  # exposed communication per update
                err2 = (
                    statistics.median(
                        plain_updates
                        * (by_rep[(batch, mech, None, r)][2] / by_rep[(batch, mech, None, r)][3] + comm)
                        / by_rep[(batch, mech, name, r)][1]
                        for r in range(args.reps)
                    )
                    - 1
                )
                errors.append(abs(err))
                errors2.append(abs(err2))
                lines.append(
                    f"| {batch} | {mech} | {name} | {cost.rho:.2g} | {same} {plain_updates} | {predicted:.2f} "
                    f"| {measured:.2f} | {err:+.1%} | {err2:+.1%} |"
                )
    if errors:
        lines += [
            "",
            f"{len(errors)} settings: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%} "
            "(goal: median ≤ 10%); paired (each repetition's plain step time at that B + the modelled link, "
            "against the same repetition's emulated run; median of the ratios): "
            f"median {statistics.median(errors2):.1%}, worst {max(errors2):.1%}",
        ]
    text = "\n".join(lines)
    SAY(text)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text + "\n")


if __name__ == "__main__":
    main()
