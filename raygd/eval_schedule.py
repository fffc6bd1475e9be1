"""When a run evaluates and when it ends, counted in examples consumed (not step·B, which B may change).

Evaluation is fair across batch sizes: by default it falls every ``train.eval_every_passes`` of a pass, N
examples, after each update whose examples cross a multiple of N, so the same example counts are
evaluated at every B (and along a run whose B moves, ``raygd.batch_schedule``). ``train.max_passes`` ends
the run at the first update that reaches max_passes·n examples: ⌈max_passes·n/B⌉ updates at a fixed B.

    schedule, resolution = eval_schedule(cfg, n)
    schedule.due(step, examples_before, examples_after)

``raygd.loop.run_loop`` reads it; callers with a schedule of their own (``raygd.measure``, the paper
driver) pass a predicate on the update count (``every_steps``, ``every_examples``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from raygd.config import RunConfig


def every_steps(k: int) -> Callable[[int], bool]:
    """Evaluate after every ``k``-th update (``train.eval_every_steps``; the last update always evaluates)."""
    return lambda step: step % k == 0


def every_examples(examples: int, batch: int) -> Callable[[int], bool]:
    """Evaluate after each update whose examples cross a multiple of N = ``examples`` at a fixed B = ``batch``:

        due(step) = step·B // N > (step − 1)·B // N        (step: 1-based update count)

    One evaluation per N examples, at the first update that reaches k·N (so at the same example
    counts for every B that divides N); every update when N ≤ B. ``EvalSchedule`` is the same rule on the
    examples consumed, for a B that changes.
    """
    if examples < 1 or batch < 1:
        raise ValueError(f"every_examples needs examples >= 1 and batch >= 1, got {examples}, {batch}")
    return lambda step: step * batch // examples > (step - 1) * batch // examples


@dataclass(frozen=True)
class EvalSchedule:
    """Evaluate after the update whose examples cross a multiple of ``examples`` (N), or where ``step_due``
    (a predicate on the 1-based update count) says so: ``due(step, before, after)`` with the examples
    consumed before and after update ``step``. At a fixed B it is ``every_examples(N, B)``."""

    examples: int | None = None
    step_due: Callable[[int], bool] | None = None

    def due(self, step: int, before: int, after: int) -> bool:
        if self.step_due is not None:
            return self.step_due(step)
        assert self.examples is not None
        return after // self.examples > before // self.examples


def eval_schedule(cfg: RunConfig, n: int) -> tuple[EvalSchedule, float]:
    """The run's evaluation schedule and its resolution in passes over the n training examples (at B0).

    ``train.eval_every_steps`` = k set: every k updates, resolution k·B/n. Otherwise every
    N = max(1, round(``train.eval_every_passes``·n)) examples, resolution max(N, B)/n: the same at every
    B ≤ N. (A run whose B moves records max(N, its largest B)/n: ``resolution``.)
    """
    B = cfg.train.global_batch_size
    if cfg.train.eval_every_steps is not None:
        return EvalSchedule(step_due=every_steps(cfg.train.eval_every_steps)), cfg.train.eval_every_steps * B / n
    examples = max(1, round(cfg.train.eval_every_passes * n))
    return EvalSchedule(examples=examples), max(examples, B) / n


def resolution(cfg: RunConfig, n: int, largest_batch: int) -> float:
    """Passes between evaluations of a run whose largest B was ``largest_batch``."""
    if cfg.train.eval_every_steps is not None:
        return cfg.train.eval_every_steps * largest_batch / n
    return max(max(1, round(cfg.train.eval_every_passes * n)), largest_batch) / n


def max_examples(cfg: RunConfig, n: int) -> int:
    """Examples after which the run stops (``train.max_passes``): the first update that reaches
    ⌈max_passes·n⌉ examples is the last, i.e. max(1, ⌈max_passes·n/B⌉) updates at a fixed B."""
    return max(1, math.ceil(cfg.train.max_passes * n))
