"""Cost of measuring gradient diversity, relative to a plain forward+backward (CPU threads).

Per model and batch size B: plain forward+backward of the mean loss; raygd's exact norms
(``GhostNorms``: the same forward+backward with per-example ‖g_i‖² fused in; logistic
regression takes the closed form ‖∂L/∂z_i‖²(‖x_i‖² + 1) from its logits' gradient);
``per_example_sq_norms`` (the exact Δ_D path: norms and Σg, for logistic regression one
forward and no backward); torch.func per-example gradients (vmap of grad) and their norms; a
naive loop of one backward per example. Then the online estimators as ``raygd.loop`` runs
them, per measured SGD update (forward, backward, update) and per block of
``train.diversity_every_steps`` updates of which one is measured (what training pays): the
in-step estimator (ghost norms + ‖Σg‖²) against a plain step, and the free two-batch estimator
(backward under DDP's ``no_sync``, ‖G_b‖², ``reduce_gradients``, ‖G_B‖²) against a DDP step,
on a one-rank gloo group (no network: what remains is the estimator's own cost).

Models: the MNIST CNN and logistic regression on 28×28 images (``--batch-sizes``), and a character
language model (``--seq-batch-sizes`` sequences): the example decoder-only transformer of
``examples/charlm/model.py`` (2 layers, d_model 128, 4 heads, context 64, a vocabulary of 96), whose
per-example norms come from raygd's rules for Embedding, LayerNorm and Linear on [N, T, d] inputs;
its loss is ``raygd.loss`` (a sequence is one example, f_i the mean cross entropy over its positions).

Methods run round-robin (each rep runs every method once, after a warm-up call of each, the order
reversed every other rep), so a burst of load from other processes hits all of them; the table gives
the median over reps of each method's time over the plain time of the same rep with the min-max of
those paired ratios (and the ratio of minima), and the load average during the run. torch.func and
the naive loop run in rounds of their own, with their own plain baseline.
glibc's allocator returns large blocks to the OS and page faults are expensive on some
machines: ``--malloc tuned`` (the default) re-runs the script with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``, ``--malloc default`` without them.

    .venv/bin/python -m bench.diversity_overhead                      # mnist_cnn, logreg (B=64, 256), charlm (B=16, 64)
    .venv/bin/python -m bench.diversity_overhead --models charlm      # the transformer only
    .venv/bin/python -m bench.diversity_overhead --malloc default     # glibc's own allocator settings
    .venv/bin/python -m bench.diversity_overhead --smoke              # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from bench.pairing import LoadAverage, paired, provenance
from raygd import diversity as D
from raygd.config import TrainConfig
from raygd.loss import example_losses, mean_loss
from raygd.models import build_model

CHARLM = {"context": 64, "vocab": 96, "n_layers": 2, "d_model": 128, "n_heads": 4}
"""The char-LM case: ``examples.charlm.model.build((context,), vocab, ...)``."""

MALLOC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
"""Keep freed blocks in the heap instead of returning them to the OS (each return costs page faults)."""


def plain_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    mean_loss(model(x), y).backward()


def ghost_norms(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ghost: D.GhostNorms | None = None
) -> torch.Tensor:
    """Per-example ‖g_i‖² (mean loss, so rescaled by B²) plus the usual .grad, one backward.

    A training loop builds ``GhostNorms(model)`` once and enters it every step.
    """
    model.zero_grad(set_to_none=True)
    with ghost or D.GhostNorms(model) as ghost:
        mean_loss(model(x), y).backward()
    return ghost.sq_norms() * x.shape[0] ** 2


def exact_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``per_example_sq_norms``: what ``gradient_diversity`` runs per batch (norms and Σ_i g_i)."""
    return D.per_example_sq_norms(model, x, y)[0]


def func_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return D.per_example_sq_norms(model, x, y, method="func")[0]


def naive_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(example_losses(model(x[i : i + 1]), y[i : i + 1])[0], params)
        out[i] = sum(float(g.square().sum()) for g in grads)
    return out


def _blocks(
    plain: Callable[[], object], measured: Callable[[], object], every: int, label: str, estimator: str
) -> dict[str, Callable[[], object]]:
    """``every`` plain updates, and ``every`` updates of which the first is measured (as in training)."""

    def plain_block() -> None:
        for _ in range(every):
            plain()

    def measured_block() -> None:
        measured()
        for _ in range(every - 1):
            plain()

    return {label: plain_block, f"{label}, 1 measured {estimator}": measured_block}


def make_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, every: int) -> dict[str, Callable[[], object]]:
    """A plain SGD step and the step the in-step estimator measures (as ``raygd.loop.OnlineDiversity``
    at P = 1); then ``every`` plain steps against ``every`` steps of which the first is measured
    (``train.diversity_every_steps``)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    b, ghost = x.shape[0], D.GhostNorms(model)

    def plain_step() -> None:
        plain_backward(model, x, y)
        opt.step()

    def in_step() -> D.Moments:
        model.zero_grad(set_to_none=True)
        with ghost:
            mean_loss(model(x), y).backward()
        moments = D.in_step_moments(float(ghost.sq_norms().sum()) * b**2, D.grad_sq_norm(model) * b**2, b)
        opt.step()
        return moments

    return {
        "step": plain_step,
        "measured step (in-step)": in_step,
        **_blocks(plain_step, in_step, every, f"{every} steps", "(in-step)"),
    }


def make_ddp_steps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, every: int
) -> dict[str, Callable[[], object]]:
    """SGD steps under DDP on a one-rank gloo group (no network: what remains is the estimator's own
    cost): DDP's step, and the step the free estimator measures as ``raygd.loop`` runs it (backward
    under ``no_sync``, then ``reduce_gradients``: ‖G_b‖², one flat all-reduce, ‖G_B‖²); then blocks
    of ``every`` steps, the first one measured."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    b = x.shape[0]

    def ddp_step() -> None:
        opt.zero_grad(set_to_none=True)
        mean_loss(ddp(x), y).backward()
        opt.step()

    def free_step() -> D.Moments:
        opt.zero_grad(set_to_none=True)
        with ddp.no_sync():
            mean_loss(ddp(x), y).backward()
        small, big = D.reduce_gradients(model, 1)
        moments = D.two_batch_moments(small, b // 2, big, b)  # as if b were B/2
        opt.step()
        return moments

    return {
        "DDP step (P=1)": ddp_step,
        "measured DDP step (free)": free_step,
        **_blocks(ddp_step, free_step, every, f"{every} DDP steps", "(free)"),
    }


def round_robin(methods: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call by rep; every rep runs each method once, in order, reversed every other rep."""
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(reps):
        for name, fn in list(methods.items())[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def check_agreement(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative difference of the ghost norms from the naive loop (float32)."""
    ghost, naive = ghost_norms(model, x, y), naive_norms(model, x, y)
    return float(((ghost - naive).abs() / naive).max())


def _pairs(methods: dict[str, Callable[[], object]], reps: int) -> list[dict[str, list[float]]]:
    """Round-robin the first two methods (one update) and the last two (a block of updates) separately,
    the block's times renamed so that ``table`` compares each with its own baseline."""
    names = list(methods)
    single = round_robin({n: methods[n] for n in names[:2]}, reps)
    block = round_robin({n: methods[n] for n in names[2:]}, max(5, reps // 2))
    base = next(iter(single))
    return [single, {base: block[names[2]], names[2]: block[names[2]], names[3]: block[names[3]]}]


def table(title: str, runs: list[dict[str, list[float]]], baseline: str) -> str:
    """Markdown rows for every method of every run, each compared with the baseline of its own
    run: median ms, the median over reps of (time / baseline time in the same rep), the ratio
    of minima, and the number of reps."""
    lines = [
        f"\n{title}\n",
        f"| method | median ms | × {baseline}: median of paired ratios (min–max) | × (ratio of minima) | reps |",
        "|---|---:|---:|---:|---:|",
    ]
    seen = set()
    for times in runs:
        base = times[baseline]
        for name, t in times.items():
            if name in seen:
                continue
            seen.add(name)
            r = paired(t, base)
            lines.append(
                f"| {name} | {statistics.median(t) * 1e3:.2f} | {r.median:.3f} ({min(r.ratios):.3f}–"
                f"{max(r.ratios):.3f}) | {min(t) / min(base):.3f} | {len(t)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mnist_cnn", "logreg", "charlm"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256], help="images per batch")
    ap.add_argument("--seq-batch-sizes", nargs="+", type=int, default=[16, 64], help="sequences per batch (charlm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=21, help="reps of the fast methods")
    ap.add_argument("--slow-reps", type=int, default=5, help="reps of torch.func and the naive loop")
    ap.add_argument(
        "--every",
        type=int,
        default=TrainConfig.diversity_every_steps,
        help="train.diversity_every_steps: updates per measured update (default %(default)s)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: B=16, 3 reps")
    ap.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc settings: re-run the script with (tuned) or without (default) the MALLOC_ variables",
    )
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNED}
    if args.malloc == "tuned":
        env.update(MALLOC_TUNED)
    if env != dict(os.environ):  # glibc reads these at start-up: only a fresh process sees them
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)
    if args.smoke:
        args.batch_sizes, args.seq_batch_sizes, args.reps, args.slow_reps = [16], [4], 5, 5
    # torch.func has no batching rule for CPU flash attention and loops over the examples: say so once, here
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
    torch.set_num_threads(args.threads)
    malloc = "tuned" if os.environ.get("MALLOC_MMAP_MAX_") == "0" else "glibc default"
    load = LoadAverage()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {malloc}; {provenance()}")
    for name in args.models:
        for b in args.seq_batch_sizes if name == "charlm" else args.batch_sizes:
            bench_one(name, b, args)
    print(f"\n{load.stop()}")


def workload(name: str, b: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    """(model, inputs, labels, description) of B = b examples: images, or token-id sequences for charlm."""
    torch.manual_seed(0)
    if name != "charlm":
        return build_model(name, (1, 28, 28), 10), torch.randn(b, 1, 28, 28), torch.randint(10, (b,)), "28×28 images"
    from examples.charlm.model import build  # the example a user copies; imported here, not at start-up

    t, v = CHARLM["context"], CHARLM["vocab"]
    model = build((t,), v, n_layers=CHARLM["n_layers"], d_model=CHARLM["d_model"], n_heads=CHARLM["n_heads"])
    what = f"sequences of {t} token ids, vocabulary {v}, {sum(p.numel() for p in model.parameters())} parameters"
    return model, torch.randint(v, (b, t)), torch.randint(v, (b, t)), what


def bench_one(name: str, b: int, args: argparse.Namespace) -> None:
    """Every table for one model and batch size."""
    model, x, y, what = workload(name, b)
    print(
        f"\n## {name}, B={b} ({what}): ghost vs naive loop max relative difference {check_agreement(model, x, y):.1e}"
    )
    routes = D.norm_routes(model)
    kinds = sorted(set(routes.values()))
    print(f"\nnorm routes: {', '.join(f'{k} ×{list(routes.values()).count(k)}' for k in kinds)}")
    ghost = D.GhostNorms(model)
    plain = "plain forward+backward"
    fast = {
        plain: lambda: plain_backward(model, x, y),
        "raygd exact norms (GhostNorms)": lambda: ghost_norms(model, x, y, ghost),
        "raygd per_example_sq_norms": lambda: exact_norms(model, x, y),
    }
    # The slow methods get their own rounds: they evict caches and would slow the next plain call.
    slow = {
        plain: fast[plain],
        "torch.func vmap norms": lambda: func_norms(model, x, y),
        "naive per-example loop": lambda: naive_norms(model, x, y),
    }
    runs = [round_robin(fast, args.reps), round_robin(slow, args.slow_reps)]
    print(table("Per-example norms", runs, plain))
    steps = make_steps(model, x, y, args.every)
    print(table("In-step estimator in an SGD step", _pairs(steps, args.reps), "step"))
    ddp = make_ddp_steps(model, x, y, args.every)
    print(table("Free estimator under DDP", _pairs(ddp, args.reps), "DDP step (P=1)"))


if __name__ == "__main__":
    main()
