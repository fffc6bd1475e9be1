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
pass (the same example counts at every B, ``raygd.eval_schedule``), and measures test accuracy and the
generalization gap alongside train accuracy in the same all-reduce. Passes count examples consumed, so B
may change along the run: ``train.batch_schedule`` (``raygd.batch_schedule``) decides B and the step size
at evaluations (or every K updates), on the clock, and the sampler's ``Cursor`` follows.

One module (over 400 lines) because state, step and loop change together: the loop's stop, checkpoint,
batch and clock decisions read all of them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from raygd import batch_schedule
from raygd.batch_schedule import BatchController
from raygd.config import CHECKPOINT_AT_EVALUATIONS, RunConfig
from raygd.data import Dataset, GlobalBatchSampler, eval_indices, worker_slice
from raygd.diversity.online import OnlineDiversity
from raygd.eval_schedule import EvalSchedule, max_examples
from raygd.eval_schedule import eval_schedule as eval_schedule
from raygd.eval_schedule import every_examples as every_examples
from raygd.eval_schedule import every_steps as every_steps
from raygd.eval_schedule import resolution as eval_resolution
from raygd.evaluation import EVAL_CHUNK as EVAL_CHUNK
from raygd.evaluation import Clock, Evaluation, evaluate, evaluation
from raygd.evaluation import all_reduce as all_reduce
from raygd.loss import mean_loss
from raygd.mechanisms import build_mechanism
from raygd.models import build_model
from raygd.network import install_network
from raygd.records import EVAL_RESOLUTION_METRIC, GAP_AT_TARGET_METRIC, Status
from raygd.state import TrainState
from raygd.tracking import Tracker

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
        _controller(cfg, data.n, model, world_size),
        data.x_train[ev],
        data.y_train[ev],
        estimator,
        data.x_test[ev_test],
        data.y_test[ev_test],
    )


def _controller(cfg: RunConfig, n: int, model: torch.nn.Module, world_size: int) -> BatchController:
    tc, net = cfg.train, cfg.train.network
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    comm_s = batch_schedule.link_comm_s(net, world_size, num_params, cfg.mechanism.name)
    overlap = net.overlap if net is not None else 0.0
    return BatchController(tc.batch_schedule, tc.global_batch_size, tc.step_size, world_size, n, comm_s, overlap)


def train_step(state: TrainState, step: int) -> float:
    """One SGD update (``step``: 0-based) on the next global batch of the controller's B from the state's
    cursor, which it advances; returns this rank's batch loss."""
    batch, state.cursor = state.sampler.take(state.cursor, step, state.controller.batch)
    idx = worker_slice(batch, state.rank, state.world_size).to(state.device)
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
    budget = max_examples(state.cfg, n)
    schedule, resolution = EvalSchedule(step_due=eval_due), None  # resolution unknown for a caller's schedule
    if eval_due is None:
        schedule, resolution = eval_schedule(state.cfg, n)
    ckpt_every = tc.checkpoint_interval if checkpoint is not None else 0
    resume = resume or {}
    start, clock = _resume(state, resume)
    status, step, first_bad_step, last, evals = Status.MAX_PASSES, start, math.inf, None, 0
    largest = state.controller.batch
    first_step_wall = time.time()
    with tracker.buffered():  # one MLflow write per METRICS_FLUSH_S, not per evaluation (in the eval time)
        while state.cursor.examples < budget:
            step, before, batch = step + 1, state.cursor.examples, state.controller.batch
            point = {batch_schedule.BATCH_METRIC: float(batch), batch_schedule.STEP_SIZE_METRIC: _step_size(state)}
            t0 = time.perf_counter()
            loss = train_step(state, step - 1)
            seconds = time.perf_counter() - t0
            clock.add_step(seconds, loss, batch)
            if not math.isfinite(loss):
                first_bad_step = min(first_bad_step, step)
            final = state.cursor.examples >= budget
            due = schedule.due(step, before, state.cursor.examples)
            _decide(state, clock, seconds, step, due and not final)
            largest = max(largest, state.controller.batch)
            save = due if ckpt_every == CHECKPOINT_AT_EVALUATIONS else ckpt_every > 0 and step % ckpt_every == 0
            save = save and not final
            if not (save or due or final):
                continue
            t_eval = time.perf_counter()
            evals += 1
            test_due = (evals - 1) % tc.test_every_evals == 0 or final
            extra = {**point, **state.controller.last}  # the B and γ of this update; the latest decision's inputs
            last = evaluation(state, step, clock, first_bad_step, test_due, stop_at_target, extra)
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
        summary.extra[EVAL_RESOLUTION_METRIC] = eval_resolution(state.cfg, n, largest)
    if status == Status.REACHED_TARGET and last is not None and math.isfinite(last.test_accuracy):
        summary.extra[GAP_AT_TARGET_METRIC] = last.accuracy - last.test_accuracy
    return summary


def _step_size(state: TrainState) -> float:
    return float(state.optimizer.param_groups[0]["lr"])


def _decide(state: TrainState, clock: Clock, seconds: float, step: int, at_evaluation: bool) -> None:
    """Give the controller the update's time and, where a decision is due, the online B̂_D; apply what it
    decides to the next update (on the clock: deciding is part of training)."""
    controller = state.controller
    controller.observe_step(seconds)
    if not controller.decision_due(step, at_evaluation):
        return
    t0 = time.perf_counter()
    estimator, P = state.estimator, state.world_size
    if P > 1 and controller.times.seconds:  # every rank decides from the same step times
        controller.times.agree(lambda xs: [x / P for x in all_reduce(xs, P, state.device)])
    bound = estimator.metrics().get("diversity/batch_bound", math.nan) if estimator else math.nan
    decision = controller.decide(bound, estimator.ema.steps if estimator else 0)
    batch_schedule.apply(decision, state.optimizer, estimator, state.mechanism, state.world_size)
    clock.train_s += time.perf_counter() - t0


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
    n, rank, P = state.data.n, state.rank, state.world_size
    t_eval = time.perf_counter()
    _, test_acc = evaluate(state.model, state.data.x_test[rank::P], state.data.y_test[rank::P], P, state.device)
    clock.eval_s += time.perf_counter() - t_eval
    reached = status == Status.REACHED_TARGET
    examples = state.cursor.examples
    passes = examples / n
    return RunSummary(
        status=status,
        steps=step,
        passes=passes,
        train_time_s=clock.train_s,
        eval_time_s=clock.eval_s,
        final_train_accuracy=last.accuracy if last else math.nan,
        final_train_loss=last.loss if last else math.nan,
        final_test_accuracy=test_acc,
        samples_per_s=examples / clock.train_s if clock.train_s > 0 else 0.0,
        time_to_accuracy_s=clock.train_s if reached else None,
        passes_to_accuracy=passes if reached else None,
        updates_to_accuracy=step if reached else None,
        diverged_at_step=last.diverged_at_step if status == Status.DIVERGED and last else None,
        extra={
            **state.mechanism.metrics(),
            "train/restarts": float(resume.get("restarts", 0)),
            "time/lost_train_s": float(resume.get("lost_train_s", 0.0)),
            **(state.estimator.summary() if state.estimator else {}),  # median online B_D (raygd.bound)
            **state.controller.summary(examples, step),  # mean and final B
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
