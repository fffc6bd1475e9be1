"""One evaluation of a rank's training state: sums over its slice of the fixed samples, reduced across ranks.

``raygd.loop.run_loop`` calls ``evaluation`` at each point of its schedule (``raygd.eval_schedule``): loss and
accuracy on the fixed training sample (one sum and one min all-reduce, the min for the first non-finite
step), test accuracy when due (one more sum), and the window's throughput from the ``Clock``, whose training
seconds are the time-to-accuracy clock. Every rank takes the same decisions from the reduced figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from raygd.loss import correct_and_count, summed_loss

if TYPE_CHECKING:
    from raygd.state import TrainState

EVAL_CHUNK = 256
"""Examples per forward pass in an evaluation. Small enough for a chunk's activations to stay in cache:
the CNN's evaluation of 2000 examples on one CPU thread took 1.7x as long in chunks of 2048 as in
chunks of 256 (bench/eval_cost.py); below 256 it gains nothing. Logistic regression's evaluation is
slower in chunks of 256 (0.8x) but takes ~2-3 ms either way."""


def all_reduce(values: list[float], world_size: int, device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few floats over all ranks with one collective (``op``: sum or min; identity at world size 1)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t.tolist()


@torch.no_grad()
def eval_sums(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
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
    loss_sum, count, correct, predictions = all_reduce(eval_sums(model, x, y), world_size, device)
    return loss_sum / max(count, 1.0), correct / max(predictions, 1.0)


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class Clock:
    """Seconds spent training (the time-to-accuracy clock) and evaluating, plus the steps since the
    last evaluation (its window gives ``perf/*`` and ``train/batch_loss``)."""

    train_s: float = 0.0
    eval_s: float = 0.0
    window_s: float = 0.0
    window_steps: int = 0
    window_loss: float = 0.0
    window_examples: int = 0

    def add_step(self, seconds: float, loss: float, examples: int = 0) -> None:
        self.train_s += seconds
        self.window_s += seconds
        self.window_steps += 1
        self.window_loss += loss
        self.window_examples += examples

    def close_window(self) -> None:
        self.window_s, self.window_steps, self.window_loss, self.window_examples = 0.0, 0, 0.0, 0


@dataclass
class Evaluation:
    """One evaluation's metrics and the decisions every rank takes from them."""

    metrics: dict[str, float]
    accuracy: float
    loss: float
    diverged_at_step: int | None
    test_accuracy: float = math.nan


def evaluation(
    state: TrainState,
    step: int,
    clock: Clock,
    first_bad_step: float,
    test_due: bool = True,
    stop_at_target: bool = False,
    extra: dict[str, float] | None = None,
) -> Evaluation:
    """Evaluate on the fixed training sample (one sum and one min all-reduce across ranks) and, when
    ``test_due`` or when this evaluation ends the run (the target reached with ``stop_at_target``, or diverged),
    on the fixed test sample (one more sum); every rank takes the same decision from the reduced figures.
    ``extra``: more metrics of this point (the batch controller's decision).

    A rank's first bad step is the first update whose batch loss was not finite (or this step if the
    weights are not); the run diverged at the earliest such step over all ranks.
    """
    tc, n, P = state.cfg.train, state.data.n, state.world_size
    if math.isinf(first_bad_step) and not params_finite(state.model):
        first_bad_step = step
    sums = [*eval_sums(state.model, state.x_eval, state.y_eval), clock.window_loss]
    loss_sum, count, correct, predictions, batch_loss_sum = all_reduce(sums, P, state.device)
    (bad,) = all_reduce([first_bad_step], P, state.device, op="min")
    loss, acc = loss_sum / max(count, 1.0), correct / max(predictions, 1.0)
    diverged_at = int(bad) if math.isfinite(bad) else (step if not math.isfinite(loss) else None)
    test_acc, test_metrics = math.nan, {}
    if test_due or diverged_at is not None or (stop_at_target and tc.reached(acc, loss)):
        test_correct, test_count = all_reduce(
            eval_sums(state.model, state.x_test_eval, state.y_test_eval)[2:], P, state.device
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
        "perf/samples_per_s": clock.window_examples / clock.window_s,
        "perf/step_s": clock.window_s / clock.window_steps,
        "progress/passes": state.cursor.examples / n,
        "time/train_s": clock.train_s,
        **state.mechanism.metrics(),
        **estimator,
        **(extra or {}),
    }
    clock.close_window()
    return Evaluation(metrics, acc, loss, diverged_at, test_acc)
