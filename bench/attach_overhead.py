"""What ``raygd.attach`` costs a user's loop: plain DDP (gloo, P = 2 processes, no Ray) on the MNIST CNN, with and
without the probe at its defaults (free estimator, one update in 10 measured), per window of 10 updates.

Each rank holds two DDP copies of ``raygd.models.MnistCNN`` with the same initial weights and trains both on the
same synthetic batches (global B = 128, 64 per worker, SGD): ``plain`` as DDP does it, ``attached`` with
``raygd.attach(model)``. A repetition times 10 updates of each, one at a time, the order reversed every other
repetition (``bench.pairing.interleave``; both ranks run the same order, and a barrier starts each window);
the ratio is the median of the per-repetition ratios with their min-max. Each window of 10 holds exactly one
measured update (norms of each bucket before and after its all-reduce, one 3-number all-reduce) and nine that
pass through the probe's comm hook to DDP's arithmetic. At the end the two copies' weights are compared bit
for bit.

    .venv/bin/python -m bench.attach_overhead                    # 11 pairs after a warm-up
    .venv/bin/python -m bench.attach_overhead --reps 21 --out bench/out/attach_overhead.md
    .venv/bin/python -m bench.attach_overhead --smoke            # seconds
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
from torch.nn.parallel import DistributedDataParallel

from bench.pairing import LoadAverage, interleave, paired, provenance

WORLD_SIZE, GLOBAL_BATCH = 2, 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    import raygd
    from raygd.models import MnistCNN

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(args.threads)
    b = GLOBAL_BATCH // WORLD_SIZE
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(8 * b, 1, 28, 28, generator=gen), torch.randint(0, 10, (8 * b,), generator=gen)
    nets, opts, steps = {}, {}, {"plain": 0, "attached": 0}
    for name in steps:
        torch.manual_seed(0)
        nets[name] = DistributedDataParallel(MnistCNN())
        opts[name] = torch.optim.SGD(nets[name].parameters(), lr=0.01)
    probe = raygd.attach(nets["attached"], n=60000)

    def window(name: str):
        def run() -> float:
            net, opt = nets[name], opts[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.updates):
                i = steps[name] % 8
                loss = torch.nn.functional.cross_entropy(net(x[i * b : (i + 1) * b]), y[i * b : (i + 1) * b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps[name] += 1
            return time.perf_counter() - t0

        return run

    load = LoadAverage() if rank == 0 else None
    figures = interleave({n: window(n) for n in nets}, reps=args.reps, progress=print if rank == 0 else None)
    metrics = probe.metrics()
    plain, attached = (nets[n].module.state_dict().values() for n in ("plain", "attached"))
    same = all(torch.equal(p, q) for p, q in zip(plain, attached, strict=True))
    if rank == 0 and load is not None:
        out.update(figures=figures, metrics=metrics, same=same, load=str(load.stop()))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11, help="repetitions (pairs), after one warm-up")
    ap.add_argument("--updates", type=int, default=10, help="updates per window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (Ray Train's default: 1)")
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    ap.add_argument("--smoke", action="store_true", help="1 repetition of 10 updates")
    args = ap.parse_args()
    if args.smoke:
        args.reps = 1
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), args, out), nprocs=WORLD_SIZE, join=True)
        result = dict(out)
    figures, metrics = result["figures"], result["metrics"]
    ratio = paired(figures["attached"], figures["plain"])
    lines = [
        f"## raygd.attach overhead: `python -m bench.attach_overhead --reps {args.reps}`",
        "",
        f"plain DDP, gloo, P = {WORLD_SIZE} processes ({args.threads} thread each, no Ray), MNIST CNN, global B = "
        f"{GLOBAL_BATCH}; windows of {args.updates} updates, {args.reps} interleaved pairs after a warm-up; "
        "the probe at its defaults (free estimator, every=10)",
        f"{provenance()}; {result['load']}",
        "",
        "| contender | s per window (median) | vs plain (median, min–max of pairs) |",
        "|---|---:|---:|",
        f"| plain DDP | {statistics.median(figures['plain']):.4f} | 1.00× |",
        f"| raygd.attach(model) | {statistics.median(figures['attached']):.4f} | {ratio.median:.3f}× "
        f"({min(ratio.ratios):.3f}–{max(ratio.ratios):.3f}) |",
        "",
        f"weights of the two copies identical after {args.updates * (args.reps + 1)} updates: {result['same']}; "
        f"the probe's B_D {metrics['diversity/batch_bound']:.1f} ± {metrics['diversity/batch_bound_se']:.1f} "
        f"over {metrics['diversity/measured_updates']:.0f} measured updates",
    ]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
