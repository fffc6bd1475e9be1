"""What one evaluation costs, and what makes it cheaper: the chunk size of its forward passes and how
often the test sample is measured.

On the CNN paper presets an evaluation (2000 training + 2000 test examples, 1000 + 1000 per rank,
every ~0.03-0.06 passes) took ~2.75 s per rank against ~0.3 s of training between two evaluations, so
evaluation was most of a trial's wall time. Two levers, each timed here on one CPU thread (as a rank
runs), A and B interleaved (bench/pairing.py):

1. ``raygd.evaluation.eval_sums`` over one rank's 2000 examples in chunks of 2048 (the old ``EVAL_CHUNK``)
   against chunks of ``EVAL_CHUNK`` (256): the activations of a smaller chunk stay in cache;
2. a rank's evaluation with the test sample every time (``train.test_every_evals=1``) against every
   8th time (the paper presets), per evaluation on average: the training sample alone plus 1/8 of the test.

    .venv/bin/python -m bench.eval_cost            # mnist_cnn, 5 pairs after a warm-up
    .venv/bin/python -m bench.eval_cost --model logreg --pairs 9
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from bench.pairing import SAY, LoadAverage, interleave, paired, provenance
from raygd import evaluation
from raygd.models import build_model

OLD_CHUNK = 2048


def _timed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int, repeat: int) -> float:
    saved, evaluation.EVAL_CHUNK = evaluation.EVAL_CHUNK, chunk
    try:
        t0 = time.perf_counter()
        for _ in range(repeat):
            evaluation.eval_sums(model, x, y)
        return (time.perf_counter() - t0) / repeat
    finally:
        evaluation.EVAL_CHUNK = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mnist_cnn", choices=["mnist_cnn", "logreg"])
    parser.add_argument("--examples", type=int, default=1000, help="one rank's share of each sample (default 1000)")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="evaluations timed per figure")
    parser.add_argument("--test-every", type=int, default=8, help="train.test_every_evals of the B arm")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(args.model, (1, 28, 28), 10)
    x, y = torch.randn(2 * args.examples, 1, 28, 28), torch.randint(0, 10, (2 * args.examples,))
    half = args.examples
    load = LoadAverage()
    SAY(f"bench.eval_cost: {args.model}, {args.examples} + {args.examples} examples per rank, 1 thread; {provenance()}")
    k = args.test_every

    def sparse() -> float:  # one evaluation on average: the training sample, and the test sample 1 time in k
        train = _timed(model, x[:half], y[:half], evaluation.EVAL_CHUNK, args.repeat)
        return train + _timed(model, x[half:], y[half:], evaluation.EVAL_CHUNK, args.repeat) / k

    figures = interleave(
        {
            "before": lambda: _timed(model, x, y, OLD_CHUNK, args.repeat),  # chunk 2048, test every time
            "chunk": lambda: _timed(model, x, y, evaluation.EVAL_CHUNK, args.repeat),
            "chunk+sparse": sparse,
        },
        args.pairs,
    )
    load.stop()
    before, chunk, both = figures.values()
    SAY(str(load))
    SAY("")
    SAY("| A vs B | A (s per evaluation, median) | B | A / B, median of pairs (min–max) |")
    SAY("|---|---:|---:|---:|")
    chunks = f"chunk {OLD_CHUNK} vs {evaluation.EVAL_CHUNK}"
    SAY(f"| {chunks} | {median(before):.3f} | {median(chunk):.3f} | {paired(before, chunk)} |")
    SAY(f"| test sample every time vs 1 in {k} | {median(chunk):.3f} | {median(both):.3f} | {paired(chunk, both)} |")
    SAY(f"| before vs both | {median(before):.3f} | {median(both):.3f} | {paired(before, both)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
