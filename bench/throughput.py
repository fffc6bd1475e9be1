"""Training throughput: raygd P=2 on Ray Train vs plain PyTorch DDP P=2 (gloo) vs one process.

Same model, global batch B, in-memory data (Fashion-MNIST 10k) and threads (1 per process at P=2;
the single process with 1 and with 2). Every contender stays alive for the whole bench, idle while
another runs: raygd's loop in one warm trial pool (``raygd.pool``: a long-lived TorchTrainer whose
2 workers run one trial after another, as a sweep's trials do), the plain DDP loop in 2 gloo
processes spawned once, the single process in one more. A repetition runs each contender once, one
at a time, the order reversed every other repetition (``bench.pairing.interleave``); a contender's
figure in a repetition is samples/s over the median window of ``--window`` updates (``WINDOW``) of
``--windows`` after a warm-up window, measured inside the loop (raygd: its ``perf/step_s``). The first repetition
is a warm-up. The table gives each contender's median over the repetitions and the median of the
ratios within a repetition with their min-max, and the load average during the run.

    .venv/bin/python -m bench.throughput                        # mnist_cnn and logreg, B=128, 5 pairs
    .venv/bin/python -m bench.throughput --models logreg --reps 5 --windows 2
    .venv/bin/python -m bench.throughput --smoke                # logreg, seconds of training
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.pairing import LoadAverage, interleave, paired, provenance
from raygd.config import DataConfig, load_run_config
from raygd.data import Dataset, load_data, resolve_data_dir
from raygd.models import build_model

RAYGD, DDP, ONE, TWO = "raygd P=2 (Ray Train)", "plain DDP P=2 (gloo)", "1 process, 1 thread", "1 process, 2 threads"
WINDOW = {"mnist_cnn": 25, "logreg": 250}
"""Updates per timed window by model: a window of a few tenths of a second at least, so that one
preempted thread on a busy machine spoils one window, not the repetition's median."""


def _plain_loop(model, x, y, batch: int, windows: int, window: int, rank: int = 0, world: int = 1) -> float:
    """The textbook loop: random global batch, this rank's slice, forward/backward/step.

    Returns samples/s over the median of ``windows`` windows of ``window`` updates after a warm-up
    window (the windows raygd reports), so a burst of machine noise moves neither.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    per = batch // world
    times, start = [], time.perf_counter()
    for i in range(1, (windows + 1) * window + 1):
        idx = torch.randint(x.shape[0], (batch,), generator=g)[rank * per : (rank + 1) * per]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % window == 0:
            times.append((time.perf_counter() - start) / window)
            start = time.perf_counter()
    return batch / statistics.median(times[1:])


def _plain_worker(rank: int, world: int, port: int, data: Dataset, jobs, results) -> None:
    """A plain process: join the gloo group (world > 1), then train one repetition per job until None."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    while (job := jobs.get()) is not None:
        model_name, batch, windows, window, threads = job
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(model_name, data.input_shape, data.num_classes)
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        rate = _plain_loop(model, data.x_train, data.y_train, batch, windows, window, rank, world)
        if rank == 0:
            results.put(rate)
    if world > 1:
        dist.destroy_process_group()


class PlainGroup:
    """``world`` plain processes spawned once (before Ray starts in this process: torch.multiprocessing's
    spawn hangs once a Ray driver is connected here); each ``run`` trains one repetition."""

    def __init__(self, data: Dataset, world: int):
        ctx = mp.get_context("spawn")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.jobs = [ctx.SimpleQueue() for _ in range(world)]
        self.results = ctx.SimpleQueue()
        self.procs = [
            ctx.Process(
                target=_plain_worker, args=(rank, world, port, data, self.jobs[rank], self.results), daemon=True
            )
            for rank in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, model_name: str, batch: int, windows: int, window: int, threads: int) -> float:
        for jobs in self.jobs:
            jobs.put((model_name, batch, windows, window, threads))
        return self.results.get()

    def close(self) -> None:
        for jobs in self.jobs:
            jobs.put(None)
        for p in self.procs:
            p.join(timeout=30)


class RaygdPool:
    """raygd's loop on 2 Ray Train workers that stay up: one warm trial pool, one trial per repetition."""

    def __init__(self, overrides: list[str], data: Dataset, store: Path):
        from raygd.pool import start_pools

        self.overrides = [
            *overrides,
            "train.num_workers=2",
            "train.step_size=0.01",
            "train.target_accuracy=1.0",
            f"tracking.tracking_uri=sqlite:///{store}",
            "tracking.experiment_name=bench-throughput",
        ]
        self.data = data
        cfg = load_run_config(None, self.overrides)
        from raygd.train import prepare

        prepare(cfg, data)  # starts local Ray with raygd's settings
        self.pools = start_pools(
            cfg, count=1, sweep_id=f"throughput-{uuid.uuid4().hex[:8]}", storage_path=str(store.parent / "ray")
        )

    def run(self, model_name: str, batch: int, windows: int, window: int) -> float:
        from mlflow.tracking import MlflowClient

        from raygd.pool import fit_in_pool

        passes = ((windows + 1) * window * batch - 0.5) / self.data.n  # the warm-up window and the timed ones
        cfg = load_run_config(
            None,
            [
                *self.overrides,
                f"train.model={model_name}",
                f"train.global_batch_size={batch}",
                f"train.eval_every_steps={window}",
                f"train.max_passes={passes}",
            ],
        )
        summary = fit_in_pool(cfg, self.pools.name, data=self.data, progress=False)
        history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(summary.run_id, "perf/step_s")
        timed = [m.value for m in history if m.step > window]  # each is the mean step time of one window
        return batch / statistics.median(timed)

    def close(self) -> None:
        self.pools.stop()


def _data(size: int) -> tuple[list[str], Dataset]:
    overrides = ["data.name=fashion_mnist", f"data.train_size={size}"]
    if resolve_data_dir(DataConfig()) is None:
        print("Fashion-MNIST not found locally; using synthetic 28x28 data of the same shape")
        from tests.idx import write_idx_dataset

        folder = write_idx_dataset(Path(tempfile.mkdtemp()) / "fmnist", n_train=size, n_test=500)
        overrides.append(f"data.data_dir={folder}")
    return overrides, load_data(load_run_config(None, overrides).data, seed=0)


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    cols = (RAYGD, DDP, ONE, TWO)
    lines = [
        f"| model | {' | '.join(cols)} | raygd / plain DDP | raygd / 1 process (2 threads) |",
        "|---|" + "---:|" * (len(cols) + 2),
    ]
    for model_name, f in rows.items():
        medians = " | ".join(f"{statistics.median(f[c]):.0f} samples/s" for c in cols)
        lines.append(f"| {model_name} | {medians} | {paired(f[RAYGD], f[DDP])} | {paired(f[RAYGD], f[TWO])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mnist_cnn,logreg")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--window", type=int, help=f"updates per timed window (raygd: eval_every_steps); default by model: {WINDOW}"
    )
    parser.add_argument("--windows", type=int, default=4, help="timed windows per repetition, after a warm-up window")
    parser.add_argument("--reps", type=int, default=5, help="paired repetitions after the warm-up repetition")
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--smoke", action="store_true", help="logreg, 2 pairs of 1 window of 20 updates")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.window, args.windows, args.reps = "logreg", 20, 1, 2
    load = LoadAverage()
    overrides, data = _data(args.train_size)
    store = Path(tempfile.mkdtemp()) / "bench.db"
    ddp, single = PlainGroup(data, world=2), PlainGroup(data, world=1)
    torch.set_num_threads(1)  # this process only hands out turns
    pool = RaygdPool(overrides, data, store)
    b, n = args.batch, args.windows
    rows, windows = {}, {}
    try:
        for model_name in args.models.split(","):
            w = windows[model_name] = args.window or WINDOW.get(model_name, 25)
            print(f"{model_name}: {args.reps} pairs after a warm-up repetition, windows of {w} updates", flush=True)
            rows[model_name] = interleave(
                {
                    RAYGD: lambda m=model_name, w=w: pool.run(m, b, n, w),
                    DDP: lambda m=model_name, w=w: ddp.run(m, b, n, w, threads=1),
                    ONE: lambda m=model_name, w=w: single.run(m, b, n, w, threads=1),
                    TWO: lambda m=model_name, w=w: single.run(m, b, n, w, threads=2),
                },
                reps=args.reps,
            )
    finally:
        pool.close()
        ddp.close()
        single.close()
    load.stop()
    sizes = ", ".join(f"{m} {w}" for m, w in windows.items())
    print(
        f"\nthroughput, Fashion-MNIST {data.n // 1000}k, global batch B={b}; per repetition the median of {n} "
        f"windows (updates per window: {sizes}) after a warm-up window; {args.reps} repetitions after a warm-up "
        f"one, contenders interleaved; medians of samples/s, ratios: median of the paired ratios (min–max)"
    )
    print(f"{provenance()}; {load}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
