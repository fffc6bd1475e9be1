"""The ``train`` section of a run config: model, workers, batch, step size, target, schedule and estimators, with
its nested link (``train.network``) and batch policy (``train.batch_schedule``) sections (``raygd.config``).

One class over 200 lines: each of its fields is checked against the others (the target, the evaluation schedule,
checkpoints, the estimator and the batch policy constrain one another)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raygd.config.fields import (
    CHECKPOINT_AT_EVALUATIONS,
    DEVICES,
    DIVERSITY_ESTIMATORS,
    MODELS,
    _builtin_or_import,
    _choice,
    _require,
)
from raygd.config.sections import BatchScheduleConfig, NetworkConfig


@dataclass
class TrainConfig:
    """Model, parallelism and the SGD schedule."""

    model: str = "logreg"
    """logreg, logreg_binary (needs 2 classes), mnist_cnn, convnet, resnet, or a user's factory
    ``module.path:build``, called as ``build(input_shape, num_classes, **train.model_args)`` and returning
    an ``nn.Module`` whose forward gives logits [N, C] (or [N, T, C] for a sequence model)."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of a user model factory (``train.model`` an import string); must be empty otherwise."""
    num_workers: int = 2
    """P: data-parallel workers (one Ray Train worker each)."""
    global_batch_size: int = 64
    """B: examples per update over all workers; each worker takes B/P."""
    step_size: float = 0.05
    """Constant step size for w <- w - step_size * mean of the B gradients."""
    target_accuracy: float | None = 0.8
    """Stop when training accuracy (on the fixed eval sample; token accuracy for a sequence model) reaches
    this. Exactly one of target_accuracy and target_loss is set; setting target_loss alone clears this."""
    target_loss: float | None = None
    """Stop when the training loss on the fixed eval sample (mean cross entropy per example; per position
    for a sequence model) is at or below this; null: the target is target_accuracy."""
    max_passes: float = 5.0
    """Stop after this many passes over the training set if the target is not reached."""
    eval_every_passes: float = 0.05
    """Measure training and test accuracy every this fraction of a pass over the training set, the
    same number of examples N at every B: after each update that crosses a multiple of N (every
    update when N <= B), so passes-to-target are resolved alike at every B. In (0, 1]; paused out
    of the clock."""
    eval_every_steps: int | None = None
    """Explicit override: evaluate every this many updates instead (a resolution of k*B/n passes,
    coarser at larger B). null: the pass-based schedule of ``eval_every_passes``."""
    test_every_evals: int = 1
    """Measure test accuracy (and the generalization gap) at every this many evaluations, and always at
    the one that ends the run (target reached, diverged, last update), so the gap at the target is
    exact. 1: at every evaluation. A test evaluation costs as much as the training-accuracy one; with a
    fine schedule (the CNN paper presets evaluate every ~0.03-0.06 passes) they are most of a trial's
    wall time, so those presets take 8."""
    seed: int = 0
    """Seed for data order, subsets, replication, initialisation and mechanisms."""
    device: str = "auto"
    """auto (CUDA + NCCL when Ray sees GPUs, else CPU + gloo), cpu or cuda."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves for each worker; also the worker's torch threads."""
    diversity_estimator: str = "auto"
    """Online B_D estimate logged at each evaluation: auto (free at P > 1, in_step at P = 1, none where
    the mechanism excludes that one; ``RunConfig.online_estimator``), none, in_step (per-example norms of
    the batch) or free (local B/P vs all-reduced B gradient norms, needs P > 1)."""
    diversity_every_steps: int = 10
    """The online estimator measures one update in this many (the first, then every k-th), smoothed
    over measurements (EMA, decay 0.9). 1 measures every update: lowest variance, but a measured
    update costs ~1.05x (CNN) to ~1.3x (logistic regression) a plain one (bench/diversity_overhead.py)."""
    bound_sample: int = 512
    """B_D = nΔ_D at the initial weights (``raygd.bound``) is measured on the first this many examples of
    the evaluation sample (all of it when smaller), before training; 0 = not measured. Costs about one
    forward+backward of these examples per rank share (CNN: ~1% of a trial), times bound_draws under DropConnect."""
    bound_draws: int = 4
    """Monte Carlo mask draws of that B_D under DropConnect (its standard error shrinks as 1/sqrt(draws))."""
    max_failures: int = 0
    """Restarts of the worker group after a worker dies (Ray Train FailureConfig); -1 = unlimited.
    A restart resumes from the last checkpoint."""
    checkpoint_every_steps: int = 0
    """Checkpoint (model, optimizer, RNG, step, training clock) every this many updates through Ray
    Train. 0: at every evaluation when max_failures != 0, otherwise never. Paused out of the clock."""
    network: NetworkConfig | None = None
    """An emulated network link (``NetworkConfig``); None: the machine's own. Needs train.num_workers > 1
    to change anything; such runs are tagged ``raygd.network = emulated``."""
    batch_schedule: BatchScheduleConfig = field(default_factory=BatchScheduleConfig)
    """The batch controller (``BatchScheduleConfig``): fixed B (default), or B set along training."""

    def __post_init__(self) -> None:
        _builtin_or_import("train.model", self.model, MODELS)
        _require(
            isinstance(self.model_args, dict) and (not self.model_args or self.model not in MODELS),
            "train.model_args",
            self.model_args,
            "keyword arguments for a user model factory: a mapping, and only with train.model an import string",
        )
        _require(self.num_workers >= 1, "train.num_workers", self.num_workers, "must be an integer >= 1")
        _require(
            self.global_batch_size >= 1, "train.global_batch_size", self.global_batch_size, "must be an integer >= 1"
        )
        _require(
            self.global_batch_size % self.num_workers == 0,
            "train.global_batch_size",
            self.global_batch_size,
            f"must be divisible by train.num_workers = {self.num_workers} (each worker takes B/P examples)",
        )
        _require(
            math.isfinite(self.step_size) and self.step_size > 0,
            "train.step_size",
            self.step_size,
            "must be a finite number > 0",
        )
        _require(
            (self.target_accuracy is None) != (self.target_loss is None),
            "train.target_accuracy",
            self.target_accuracy,
            f"exactly one of train.target_accuracy and train.target_loss must be set (train.target_loss = "
            f"{self.target_loss!r}): set the other to null",
        )
        if self.target_accuracy is not None:
            _require(
                0.0 < self.target_accuracy <= 1.0, "train.target_accuracy", self.target_accuracy, "must be in (0, 1]"
            )
        if self.target_loss is not None:
            _require(
                math.isfinite(self.target_loss) and self.target_loss > 0,
                "train.target_loss",
                self.target_loss,
                "must be a finite number > 0 (mean cross entropy), or null",
            )
        _require(
            math.isfinite(self.max_passes) and self.max_passes > 0,
            "train.max_passes",
            self.max_passes,
            "must be a finite number > 0",
        )
        _require(
            math.isfinite(self.eval_every_passes) and 0 < self.eval_every_passes <= 1,
            "train.eval_every_passes",
            self.eval_every_passes,
            "must be a fraction of a pass in (0, 1]",
        )
        _require(
            self.eval_every_steps is None or self.eval_every_steps >= 1,
            "train.eval_every_steps",
            self.eval_every_steps,
            "must be an integer >= 1, or null (evaluate every train.eval_every_passes)",
        )
        _require(
            type(self.test_every_evals) is int and self.test_every_evals >= 1,
            "train.test_every_evals",
            self.test_every_evals,
            "must be an integer >= 1 (1 = test accuracy at every evaluation)",
        )
        _require(self.seed >= 0, "train.seed", self.seed, "must be an integer >= 0")
        _choice("train.device", self.device, DEVICES)
        _require(self.cpus_per_worker >= 1, "train.cpus_per_worker", self.cpus_per_worker, "must be an integer >= 1")
        _choice("train.diversity_estimator", self.diversity_estimator, DIVERSITY_ESTIMATORS)
        _require(
            self.diversity_estimator != "free" or self.num_workers > 1,
            "train.diversity_estimator",
            self.diversity_estimator,
            "free compares per-worker and all-reduced gradients: it needs "
            "train.num_workers > 1 (use in_step with one worker)",
        )
        _require(
            self.diversity_every_steps >= 1,
            "train.diversity_every_steps",
            self.diversity_every_steps,
            "must be an integer >= 1 (1 = measure every update)",
        )
        _require(self.bound_sample >= 0, "train.bound_sample", self.bound_sample, "must be an integer >= 0 (0 = off)")
        _require(self.bound_draws >= 2, "train.bound_draws", self.bound_draws, "must be an integer >= 2")
        _require(
            self.max_failures >= -1,
            "train.max_failures",
            self.max_failures,
            "must be an integer >= 0, or -1 for unlimited restarts",
        )
        _require(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            "must be an integer >= 1, or 0 (at every evaluation when train.max_failures != 0, else never)",
        )

        self._check_batch_schedule()

    def _check_batch_schedule(self) -> None:
        """The controller's bounds are multiples of P and hold B0 (the first batch)."""
        bs, P, B0 = self.batch_schedule, self.num_workers, self.global_batch_size
        for name in ("min_batch_size", "max_batch_size"):
            value = getattr(bs, name)
            _require(
                value is None or value % P == 0,
                f"train.batch_schedule.{name}",
                value,
                f"must be divisible by train.num_workers = {P} (each worker takes B/P examples)",
            )
        _require(
            bs.min_batch_size is None or bs.min_batch_size <= B0,
            "train.batch_schedule.min_batch_size",
            bs.min_batch_size,
            f"must be <= train.global_batch_size = {B0}, where the controller starts",
        )
        _require(
            bs.max_batch_size is None or bs.max_batch_size >= B0,
            "train.batch_schedule.max_batch_size",
            bs.max_batch_size,
            f"must be >= train.global_batch_size = {B0}, where the controller starts",
        )

    @property
    def checkpoint_interval(self) -> int:
        """Updates between checkpoints after resolving the default; 0 = never. The default with
        max_failures != 0 checkpoints at every evaluation: eval_every_steps, or
        ``CHECKPOINT_AT_EVALUATIONS`` on the pass-based schedule (its interval in updates depends on n)."""
        if self.checkpoint_every_steps:
            return self.checkpoint_every_steps
        if self.max_failures == 0:
            return 0
        return self.eval_every_steps or CHECKPOINT_AT_EVALUATIONS

    @property
    def batch_size_per_worker(self) -> int:
        return self.global_batch_size // self.num_workers

    @property
    def target_metric(self) -> str:
        """The evaluation metric the target is on: ``train/accuracy`` (>=) or ``train/loss`` (<=)."""
        return "train/loss" if self.target_loss is not None else "train/accuracy"

    @property
    def target_label(self) -> str:
        """The target as tables print it: ``train accuracy >= 0.8`` or ``train loss <= 1.5``."""
        from raygd.records import target_label

        return target_label(self.target_accuracy, self.target_loss) or "the target"

    def reached(self, accuracy: float, loss: float) -> bool:
        """Whether an evaluation's training accuracy and loss meet the run's target."""
        if self.target_loss is not None:
            return math.isfinite(loss) and loss <= self.target_loss
        assert self.target_accuracy is not None
        return accuracy >= self.target_accuracy
