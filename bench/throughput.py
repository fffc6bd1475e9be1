"""Training throughput: raygd on Ray Train (P=2) vs plain PyTorch DDP (2 gloo processes) vs one process.

Same model, same global batch B, same in-memory data, same number of updates; each
figure is samples/s in the median window of ``--warmup`` updates after the first
(warm-up) window, measured inside the training loop. All three run in this one process tree, one after the other, so
the ratios compare like with like on a noisy machine.

    .venv/bin/python -m bench.throughput                 # mnist_cnn and logreg, B=128
    .venv/bin/python -m bench.throughput --models mnist_cnn --steps 100
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raygd.config import load_run_config
from raygd.data import Dataset, load_data, resolve_data_dir
from raygd.models import build_model


def _plain_loop(model, x, y, batch, steps, warmup, rank=0, world=1) -> float:
    """The textbook loop: random global batch, this rank's slice, forward/backward/step.

    Returns samples/s from the median window of ``warmup`` updates after the warm-up
    window (the same windows raygd reports), so a burst of machine noise moves neither.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    per = batch // world
    windows, start = [], time.perf_counter()
    for i in range(1, warmup + steps + 1):
        idx = torch.randint(x.shape[0], (batch,), generator=g)[rank * per:(rank + 1) * per]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i % warmup == 0:
            windows.append((time.perf_counter() - start) / warmup)
            start = time.perf_counter()
    return batch / statistics.median(windows[1:])


def _ddp_entry(rank, world, port, model_name, data, batch, steps, warmup, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(build_model(model_name, data.input_shape, data.num_classes))
    out[rank] = _plain_loop(model, data.x_train, data.y_train, batch, steps, warmup, rank, world)
    dist.destroy_process_group()


def plain_ddp(model_name: str, data: Dataset, batch: int, steps: int, warmup: int, world: int = 2) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_entry, args=(world, port, model_name, data, batch, steps, warmup, out), nprocs=world)
        return out[0]


def single_process(model_name: str, data: Dataset, batch: int, steps: int, warmup: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    return _plain_loop(model, data.x_train, data.y_train, batch, steps, warmup)


def raygd_fit(model_name: str, data_overrides: list[str], data: Dataset, batch: int, steps: int, warmup: int,
              store: str) -> float:
    """samples/s of raygd's loop on Ray Train, from the step metrics after the warm-up window."""
    from mlflow.tracking import MlflowClient

    from raygd.train import fit

    cfg = load_run_config(None, [*data_overrides, f"train.model={model_name}", "train.num_workers=2",
                                 f"train.global_batch_size={batch}", "train.step_size=0.01",
                                 "train.target_accuracy=1.0", f"train.eval_every_steps={warmup}",
                                 f"train.max_passes={((warmup + steps) * batch - 0.5) / data.n}",
                                 f"tracking.tracking_uri=sqlite:///{store}", "tracking.experiment_name=bench"])
    summary = fit(cfg, data=data)
    history = MlflowClient(cfg.tracking.tracking_uri).get_metric_history(summary.run_id, "perf/step_s")
    timed = [m.value for m in history if m.step > warmup]  # each is the mean step time of `warmup` updates
    return batch / statistics.median(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mnist_cnn,logreg")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=150, help="timed updates per configuration")
    parser.add_argument("--warmup", type=int, default=25)
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (raygd reports step times in windows of --warmup)")

    from raygd.config import DataConfig

    overrides = ["data.name=fashion_mnist", "data.train_size=10000"]
    if resolve_data_dir(DataConfig()) is None:
        print("Fashion-MNIST not found locally; using synthetic 28x28 data of the same shape")
        from tests.idx import write_idx_dataset

        folder = write_idx_dataset(Path(tempfile.mkdtemp()) / "fmnist", n_train=10000, n_test=500)
        overrides.append(f"data.data_dir={folder}")
    data = load_data(load_run_config(None, overrides).data, seed=0)
    store = Path(tempfile.mkdtemp()) / "bench.db"

    models = args.models.split(",")
    # The plain baselines run before Ray starts in this process: torch.multiprocessing's spawn
    # hangs once a Ray driver is connected here.
    plain = {m: (plain_ddp(m, data, args.batch, args.steps, args.warmup),
                 single_process(m, data, args.batch, args.steps, args.warmup, threads=1),
                 single_process(m, data, args.batch, args.steps, args.warmup, threads=2)) for m in models}
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [(m, raygd_fit(m, overrides, data, args.batch, args.steps, args.warmup, str(store)), *plain[m])
            for m in models]
    print(f"\nthroughput, Fashion-MNIST 10k, global batch B={args.batch}, {args.steps} timed updates "
          f"after {args.warmup} warm-up, {os.cpu_count()} cores")
    print("| model | raygd P=2 (Ray Train) | plain DDP P=2 (gloo) | 1 process, 1 thread | 1 process, 2 threads "
          "| raygd / plain DDP | raygd / 1 process (2 threads) |")
    print("|---|---|---|---|---|---|---|")
    for model_name, r, d, s1, s2 in rows:
        print(f"| {model_name} | {r:.0f} samples/s | {d:.0f} samples/s | {s1:.0f} samples/s | {s2:.0f} samples/s "
              f"| {r / d:.2f}x | {r / s2:.2f}x |")


if __name__ == "__main__":
    main()
