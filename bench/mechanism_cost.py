"""What each mechanism costs per update on a user's transformer: raygd's own step (``raygd.loop.train_step``)
on ``examples/charlm`` (2 layers, d_model 128, context 64), one process, against vanilla.

Each contender is a ``TrainState`` built once (vanilla, DropConnect at its three granularities, SGLD,
QSGD); a repetition times ``--steps`` updates of each, one contender at a time, the order reversed every
other repetition (``bench.pairing.interleave``); the ratio to vanilla is the median of the per-repetition
ratios with their min-max. Per-example DropConnect draws one (out, in) mask per sequence for every
masked Linear and runs a batched matmul per mask, which is what the paper's per-example surrogate costs.

    .venv/bin/python -m bench.mechanism_cost                    # B = 32 sequences, 5 pairs
    .venv/bin/python -m bench.mechanism_cost --batch 64 --reps 7
    .venv/bin/python -m bench.mechanism_cost --smoke            # seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.pairing import LoadAverage, interleave, paired, provenance
from raygd.config import load_run_config
from raygd.data import load_data
from raygd.loop import build_state, train_step

MECHANISMS = {
    "vanilla": [],
    "dropconnect per_example": ["mechanism.name=dropconnect", "mechanism.dropconnect_granularity=per_example"],
    "dropconnect per_group (8)": ["mechanism.name=dropconnect", "mechanism.dropconnect_granularity=per_group"],
    "dropconnect per_worker": ["mechanism.name=dropconnect", "mechanism.dropconnect_granularity=per_worker"],
    "sgld": ["mechanism.name=sgld"],
    "quantize": ["mechanism.name=quantize"],
}


def _state(overrides: list[str], batch: int, sequences: int):
    cfg = load_run_config(
        None,
        [
            "data.name=examples.charlm.data:load",
            f"data.args={{train_sequences: {sequences}, test_sequences: 64}}",
            "train.model=examples.charlm.model:build",
            "train.num_workers=1",
            f"train.global_batch_size={batch}",
            "train.target_loss=0.1",
            "train.diversity_estimator=none",
            *overrides,
        ],
    )
    return build_state(cfg, load_data(cfg.data, 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="B, sequences per update")
    ap.add_argument("--steps", type=int, default=10, help="updates timed per contender and repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (pairs), after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker's default is 1)")
    ap.add_argument("--smoke", action="store_true", help="B = 8, 2 steps, 1 repetition")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.steps, args.reps = 8, 2, 1
    torch.set_num_threads(args.threads)
    states = {name: _state(o, args.batch, max(256, args.batch * 4)) for name, o in MECHANISMS.items()}
    step = {name: 0 for name in states}

    def timed(name: str):
        def run() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(states[name], step[name])
                step[name] += 1
            return (time.perf_counter() - t0) / args.steps

        return run

    load = LoadAverage()
    figures = interleave({name: timed(name) for name in states}, reps=args.reps)
    load.stop()
    print(f"\nMechanism cost per update, examples/charlm (2 layers, d_model 128, T = 64), B = {args.batch} sequences, ")
    print(f"1 process, {args.threads} thread(s), {args.steps} updates x {args.reps} interleaved repetitions")
    print(f"{provenance()}; {load}\n")
    print("| mechanism | s per update (median) | vs vanilla (median, min–max of pairs) |")
    print("|---|---:|---:|")
    base = figures["vanilla"]
    for name, values in figures.items():
        ratio = "1.00×" if name == "vanilla" else str(paired(values, base))
        print(f"| {name} | {sorted(values)[len(values) // 2]:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
