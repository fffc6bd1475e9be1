"""One rank's SGD loop: its state, one update, evaluation, and the loop that ties them together.

The loop runs unchanged in-process (world size 1), under any torch process group (tests and
benchmarks spawn gloo groups) and inside Ray Train, where ``raygd.train.train_loop_per_worker``
wraps it; ``raygd.measure`` and the paper driver call it too, with their own evaluation schedule.

    state = build_state(cfg, data)          # model, mechanism, DDP, optimizer, sampler
    summary = run_loop(state, tracker)       # until the target, max passes or divergence

The clock: time-to-accuracy is wall-clock seconds spent in training steps (sampling, forward,
backward, all-reduce, update) until the training accuracy measured on a fixed sample of the
training set reaches the target. Evaluation, reporting and checkpoints are paused out of the
clock; both figures are logged. Every rank takes the stop decision from the same all-reduced
numbers (accuracy, and the first step at which any rank saw a non-finite loss or weights), so all
ranks return together and agree on ``diverged_at_step``.

Evaluation is fair across batch sizes: by default it falls every ``train.eval_every_passes`` of a
pass (the same example counts at every B, ``eval_schedule``), and measures test accuracy and the
generalization gap alongside train accuracy in the same all-reduce.

One module (over 400 lines) because state, step, evaluation schedule and loop change together:
the loop's stop, checkpoint and clock decisions read all of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from raygd.config import CHECKPOINT_AT_EVALUATIONS, RunConfig
from raygd.data import Dataset, GlobalBatchSampler, eval_indices
from raygd.diversity.online import OnlineDiversity
from raygd.loss import correct_and_count, mean_loss, summed_loss
from raygd.mechanisms import Mechanism, build_mechanism
from raygd.models import build_model
from raygd.network import install_network
from raygd.records import EVAL_RESOLUTION_METRIC, GAP_AT_TARGET_METRIC, Status
from raygd.tracking import Tracker

EVAL_CHUNK = 256
"""Examples per forward pass in an evaluation. Small enough for a chunk's activations to stay in cache:
the CNN's evaluation of 2000 examples on one CPU thread took 1.7x as long in chunks of 2048 as in
chunks of 256 (bench/eval_cost.py); below 256 it gains nothing. Logistic regression's evaluation is
slower in chunks of 256 (0.8x) but takes ~2-3 ms either way."""

Report = Callable[[dict[str, float]], None]
Checkpoint = Callable[[dict[str, float], dict[str, Any]], None]


@dataclass
class RunSummary:
    """What one run produced; ``status`` is reached_target, max_passes or diverged."""

    status: Status
    steps: int
    passes: float
    train_time_s: float
    eval_time_s: float
    final_train_accuracy: float
    final_train_loss: float
    final_test_accuracy: float
    samples_per_s: float
    time_to_accuracy_s: float | None = None
    passes_to_accuracy: float | None = None
    updates_to_accuracy: int | None = None
    diverged_at_step: int | None = None
    run_id: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    walls: dict[str, float] = field(default_factory=dict)
    """Wall-clock timestamps (time.time()) of start-up events, for the overhead figures."""

    def summary_metrics(self) -> dict[str, float]:
        """The numeric fields worth logging as MLflow summary metrics."""
        skip = {"status", "run_id", "extra", "walls"}
        out = {k: float(v) for k, v in asdict(self).items() if k not in skip and v is not None}
        out["reached_target"] = float(self.status == Status.REACHED_TARGET)
        out["diverged"] = float(self.status == Status.DIVERGED)
        return out


def all_reduce(values: list[float], world_size: int, device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few floats over all ranks with one collective (``op``: sum or min; identity at world size 1)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.tolist()


@torch.no_grad()
def _eval_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """This rank's summed loss Σ_i f_i, number of examples, number correct and number of predictions over
    (x, y) (``raygd.loss``: predictions are positions for a sequence model, so accuracy is token accuracy)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, predictions = 0.0, 0.0, 0.0
    for start in range(0, x.shape[0], EVAL_CHUNK):
        logits = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        loss_sum += float(summed_loss(logits, target))
        right, count = correct_and_count(logits, target)
        correct, predictions = correct + right, predictions + count
    model.train(was_training)
    return [loss_sum, float(x.shape[0]), correct, predictions]


def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world_size: int, device: torch.device
) -> tuple[float, float]:
    """Mean loss per example and accuracy over this rank's examples, summed over all ranks."""
    loss_sum, count, correct, predictions = all_reduce(_eval_sums(model, x, y), world_size, device)
    return loss_sum / max(count, 1.0), correct / max(predictions, 1.0)


def _params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class TrainState:
    """One rank's training state: the model (unwrapped) and ``net`` that runs steps (DDP when
    P > 1), the mechanism, optimizer, sampler, this rank's slice of the evaluation sample, and the
    online diversity estimator (None when off)."""

    cfg: RunConfig
    data: Dataset
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module
    mechanism: Mechanism
    optimizer: torch.optim.Optimizer
    sampler: GlobalBatchSampler
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    estimator: OnlineDiversity | None = None
    x_test_eval: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    """This rank's slice of the fixed test sample (min(test size, data.eval_size) examples)."""
    y_test_eval: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def build_state(
    cfg: RunConfig, data: Dataset, rank: int = 0, world_size: int = 1, device: torch.device | None = None
) -> TrainState:
    """Build this rank's model (same initial weights on every rank), mechanism, DDP wrapper and sampler.

    Everything is rebuilt from the config: torch's RNG is seeded from ``train.seed`` first, so a
    state built in a process that trained before is the state a fresh process would build.
    world_size > 1 needs an initialised torch process group.
    """
    device = device or torch.device("cpu")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(tc.model, data.input_shape, data.num_classes, tc.model_args)
    mechanism = build_mechanism(cfg.mechanism)
    model = mechanism.setup(
        model, seed=tc.seed, rank=rank, world_size=world_size, global_batch_size=tc.global_batch_size, device=device
    ).to(device)
    net = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        install_network(net, tc.network, world_size)  # before attach_ddp: it wraps the mechanism's hook
        mechanism.attach_ddp(net)
    if device.type != "cpu":
        data = Dataset(
            data.x_train.to(device),
            data.y_train.to(device),
            data.x_test.to(device),
            data.y_test.to(device),
            data.num_classes,
            data.paired_eval_index,
        )
    ev = data.paired_eval_index  # the replication control: the replicated arm's sample, as distinct examples
    if ev is None:
        ev = eval_indices(data.n, cfg.data.eval_size, tc.seed)
    ev = ev[rank::world_size].to(device)
    ev_test = eval_indices(data.y_test.shape[0], cfg.data.eval_size, tc.seed)[rank::world_size].to(device)
    estimator = (
        OnlineDiversity(cfg, data.n, model, net, world_size, device, mechanism)
        if tc.diversity_estimator != "none"
        else None
    )
    return TrainState(
        cfg,
        data,
        rank,
        world_size,
        device,
        model,
        net,
        mechanism,
        torch.optim.SGD(model.parameters(), lr=tc.step_size),
        GlobalBatchSampler(data.n, tc.global_batch_size, cfg.data.sampling, tc.seed),
        data.x_train[ev],
        data.y_train[ev],
        estimator,
        data.x_test[ev_test],
        data.y_test[ev_test],
    )


def train_step(state: TrainState, step: int) -> float:
    """One SGD update on the global batch of ``step`` (0-based); returns this rank's batch loss."""
    idx = state.sampler.worker_batch(step, state.rank, state.world_size).to(state.device)
    state.optimizer.zero_grad(set_to_none=True)
    estimator = state.estimator if state.estimator is not None and state.estimator.due(step) else None
    with estimator.measuring() if estimator else contextlib.nullcontext():
        loss = mean_loss(state.net(state.data.x_train[idx]), state.data.y_train[idx])
        loss.backward()
    if estimator:
        estimator.update()  # before the mechanism changes the gradient
    state.mechanism.after_backward(state.model, step)
    state.optimizer.step()
    if state.device.type == "cuda":
        torch.cuda.synchronize(state.device)
    return float(loss.detach())


@dataclass
class Clock:
    """Seconds spent training (the time-to-accuracy clock) and evaluating, plus the steps since the
    last evaluation (its window gives ``perf/*`` and ``train/batch_loss``)."""

    train_s: float = 0.0
    eval_s: float = 0.0
    window_s: float = 0.0
    window_steps: int = 0
    window_loss: float = 0.0

    def add_step(self, seconds: float, loss: float) -> None:
        self.train_s += seconds
        self.window_s += seconds
        self.window_steps += 1
        self.window_loss += loss

    def close_window(self) -> None:
        self.window_s, self.window_steps, self.window_loss = 0.0, 0, 0.0


def every_steps(k: int) -> Callable[[int], bool]:
    """Evaluate after every ``k``-th update (``train.eval_every_steps``; the last update always evaluates)."""
    return lambda step: step % k == 0


def every_examples(examples: int, batch: int) -> Callable[[int], bool]:
    """Evaluate after each update whose examples cross a multiple of N = ``examples`` at B = ``batch``:

        due(step) = step·B // N > (step − 1)·B // N        (step: 1-based update count)

    One evaluation per N examples, at the first update that reaches k·N (so at the same example
    counts for every B that divides N); every update when N ≤ B.
    """
    if examples < 1 or batch < 1:
        raise ValueError(f"every_examples needs examples >= 1 and batch >= 1, got {examples}, {batch}")
    return lambda step: step * batch // examples > (step - 1) * batch // examples


def eval_schedule(cfg: RunConfig, n: int) -> tuple[Callable[[int], bool], float]:
    """The run's evaluation schedule and its resolution in passes over the n training examples.

    ``train.eval_every_steps`` = k set: every k updates, resolution k·B/n. Otherwise every
    N = max(1, round(``train.eval_every_passes``·n)) examples (``every_examples``), resolution
    max(N, B)/n: the same at every B ≤ N.
    """
    B = cfg.train.global_batch_size
    if cfg.train.eval_every_steps is not None:
        return every_steps(cfg.train.eval_every_steps), cfg.train.eval_every_steps * B / n
    examples = max(1, round(cfg.train.eval_every_passes * n))
    return every_examples(examples, B), max(examples, B) / n


@dataclass
class Evaluation:
    """One evaluation's metrics and the decisions every rank takes from them."""

    metrics: dict[str, float]
    accuracy: float
    loss: float
    diverged_at_step: int | None
    test_accuracy: float = math.nan


def _evaluation(
    state: TrainState,
    step: int,
    clock: Clock,
    first_bad_step: float,
    test_due: bool = True,
    stop_at_target: bool = False,
) -> Evaluation:
    """Evaluate on the fixed training sample (one sum and one min all-reduce across ranks) and, when
    ``test_due`` or when this evaluation ends the run (the target reached with ``stop_at_target``, or diverged),
    on the fixed test sample (one more sum); every rank takes the same decision from the reduced figures.

    A rank's first bad step is the first update whose batch loss was not finite (or this step if the
    weights are not); the run diverged at the earliest such step over all ranks.
    """
    tc, n, P = state.cfg.train, state.data.n, state.world_size
    if math.isinf(first_bad_step) and not _params_finite(state.model):
        first_bad_step = step
    sums = [*_eval_sums(state.model, state.x_eval, state.y_eval), clock.window_loss]
    loss_sum, count, correct, predictions, batch_loss_sum = all_reduce(sums, P, state.device)
    (bad,) = all_reduce([first_bad_step], P, state.device, op="min")
    loss, acc = loss_sum / max(count, 1.0), correct / max(predictions, 1.0)
    diverged_at = int(bad) if math.isfinite(bad) else (step if not math.isfinite(loss) else None)
    test_acc, test_metrics = math.nan, {}
    if test_due or diverged_at is not None or (stop_at_target and tc.reached(acc, loss)):
        test_correct, test_count = all_reduce(
            _eval_sums(state.model, state.x_test_eval, state.y_test_eval)[2:], P, state.device
        )
        if test_count > 0:
            test_acc = test_correct / test_count
            test_metrics = {"test/accuracy": test_acc, "train/generalization_gap": acc - test_acc}
    estimator = state.estimator.metrics() if state.estimator else {}
    metrics = {
        "train/loss": loss,
        "train/accuracy": acc,
        **test_metrics,
        "train/batch_loss": batch_loss_sum / P / clock.window_steps,
        "perf/samples_per_s": tc.global_batch_size * clock.window_steps / clock.window_s,
        "perf/step_s": clock.window_s / clock.window_steps,
        "progress/passes": step * tc.global_batch_size / n,
        "time/train_s": clock.train_s,
        **state.mechanism.metrics(),
        **estimator,
    }
    clock.close_window()
    return Evaluation(metrics, acc, loss, diverged_at, test_acc)


def _resume(state: TrainState, resume: dict[str, Any]) -> tuple[int, Clock]:
    """Restore a checkpoint (if any) into ``state``; the step to continue after and the clock."""
    from raygd.checkpoint import restore_state

    clock, start = Clock(), 0
    if "model" in resume:
        restore_state(state, resume)
        start, clock.train_s, clock.eval_s = resume["step"], resume["clock"], resume["eval_time"]
    clock.train_s += float(resume.get("lost_train_s", 0.0))
    return start, clock


def run_loop(
    state: TrainState,
    tracker: Tracker | None = None,
    report: Report | None = None,
    checkpoint: Checkpoint | None = None,
    resume: dict[str, Any] | None = None,
    *,
    eval_due: Callable[[int], bool] | None = None,
    stop_at_target: bool = True,
) -> RunSummary:
    """Train ``state`` until the target (``train.target_accuracy`` or ``train.target_loss``), ``train.max_passes``
    or divergence.

    Args:
        state: the built ``TrainState`` of this rank.
        tracker: rank-zero MLflow logger; None logs nothing.
        report: called with the metrics (and ``step``) at every evaluation that is not a checkpoint.
        checkpoint: called with (metrics, ``checkpoint_state``) every ``train.checkpoint_interval``
            updates (or at every evaluation, the default with ``train.max_failures``) instead of
            ``report`` (not at the final evaluation); its time is paused out of the clock.
        resume: a ``checkpoint_state`` to continue from (its step, clock, weights and RNG), plus
            optionally ``restarts`` and ``lost_train_s`` (training time spent on work the restart
            threw away, added to the clock so time-to-accuracy counts the time actually spent).
        eval_due: the evaluation schedule, a predicate on the 1-based update count (default:
            ``eval_schedule``, every ``train.eval_every_passes`` or ``train.eval_every_steps``, whose
            resolution in passes the summary records as ``EVAL_RESOLUTION_METRIC``); the last update
            always evaluates.
        stop_at_target: False trains to ``max_passes`` whatever the accuracy (diversity along training).

    Returns:
        The run's ``RunSummary`` (the same decisions on every rank). Its ``extra`` holds
        ``GAP_AT_TARGET_METRIC`` (train − test accuracy at the evaluation that reached the target).
    """
    from raygd.checkpoint import checkpoint_state

    tracker = tracker or Tracker(None, None, enabled=False)
    tc, n = state.cfg.train, state.data.n
    max_steps = max(1, math.ceil(tc.max_passes * n / tc.global_batch_size))
    resolution = None  # in passes; unknown for a caller's own schedule
    if eval_due is None:
        eval_due, resolution = eval_schedule(state.cfg, n)
    ckpt_every = tc.checkpoint_interval if checkpoint is not None else 0
    resume = resume or {}
    start, clock = _resume(state, resume)
    status, step, first_bad_step, last, evals = Status.MAX_PASSES, start, math.inf, None, 0
    first_step_wall = time.time()
    with tracker.buffered():  # one MLflow write per METRICS_FLUSH_S, not per evaluation (in the eval time)
        for step in range(start + 1, max_steps + 1):
            t0 = time.perf_counter()
            loss = train_step(state, step - 1)
            clock.add_step(time.perf_counter() - t0, loss)
            if not math.isfinite(loss):
                first_bad_step = min(first_bad_step, step)
            due = eval_due(step)
            save = due if ckpt_every == CHECKPOINT_AT_EVALUATIONS else ckpt_every > 0 and step % ckpt_every == 0
            save = save and step != max_steps
            if not (save or due or step == max_steps):
                continue
            t_eval = time.perf_counter()
            evals += 1
            test_due = (evals - 1) % tc.test_every_evals == 0 or step == max_steps
            last = _evaluation(state, step, clock, first_bad_step, test_due, stop_at_target)
            tracker.log_metrics(last.metrics, step=step)
            reached = stop_at_target and tc.reached(last.accuracy, last.loss)
            done = last.diverged_at_step is not None or reached
            if save and not done and checkpoint is not None:
                tracker.flush()  # a restart from this checkpoint finds every metric up to it
                checkpoint(dict(last.metrics, step=step), checkpoint_state(state, step, clock.train_s, clock.eval_s))
            elif report is not None:
                report(dict(last.metrics, step=step))
            clock.eval_s += time.perf_counter() - t_eval
            if done:
                status = Status.DIVERGED if last.diverged_at_step is not None else Status.REACHED_TARGET
                break
    summary = _summary(state, status, step, clock, last, resume, first_step_wall)
    if resolution is not None:
        summary.extra[EVAL_RESOLUTION_METRIC] = resolution
    if status == Status.REACHED_TARGET and last is not None and math.isfinite(last.test_accuracy):
        summary.extra[GAP_AT_TARGET_METRIC] = last.accuracy - last.test_accuracy
    return summary


def _summary(
    state: TrainState,
    status: Status,
    step: int,
    clock: Clock,
    last: Evaluation | None,
    resume: dict[str, Any],
    first_step_wall: float,
) -> RunSummary:
    """Evaluate on the test set (every rank its slice) and assemble the ``RunSummary``."""
    tc, n, rank, P = state.cfg.train, state.data.n, state.rank, state.world_size
    t_eval = time.perf_counter()
    _, test_acc = evaluate(state.model, state.data.x_test[rank::P], state.data.y_test[rank::P], P, state.device)
    clock.eval_s += time.perf_counter() - t_eval
    reached = status == Status.REACHED_TARGET
    passes = step * tc.global_batch_size / n
    return RunSummary(
        status=status,
        steps=step,
        passes=passes,
        train_time_s=clock.train_s,
        eval_time_s=clock.eval_s,
        final_train_accuracy=last.accuracy if last else math.nan,
        final_train_loss=last.loss if last else math.nan,
        final_test_accuracy=test_acc,
        samples_per_s=tc.global_batch_size * step / clock.train_s if clock.train_s > 0 else 0.0,
        time_to_accuracy_s=clock.train_s if reached else None,
        passes_to_accuracy=passes if reached else None,
        updates_to_accuracy=step if reached else None,
        diverged_at_step=last.diverged_at_step if status == Status.DIVERGED and last else None,
        extra={
            **state.mechanism.metrics(),
            "train/restarts": float(resume.get("restarts", 0)),
            "time/lost_train_s": float(resume.get("lost_train_s", 0.0)),
            **(state.estimator.summary() if state.estimator else {}),  # median online B_D (raygd.bound)
        },
        walls={"first_step": first_step_wall},
    )


def train_rank(
    cfg: RunConfig,
    data: Dataset,
    rank: int = 0,
    world_size: int = 1,
    tracker: Tracker | None = None,
    report: Report | None = None,
    device: torch.device | None = None,
) -> RunSummary:
    """Build this rank's state and run the loop (in-process, or in any torch process group).

    Args:
        cfg: the run config (identical on every rank).
        data: the full training/test tensors (every rank holds them; each uses its slice).
        rank, world_size: this worker's place; world_size > 1 needs an initialised process group.
        tracker: rank-zero MLflow logger (no-op elsewhere); None logs nothing.
        report: called with the metrics dict at every evaluation on every rank.
        device: where to train; default CPU.
    """
    return run_loop(build_state(cfg, data, rank, world_size, device), tracker, report)
