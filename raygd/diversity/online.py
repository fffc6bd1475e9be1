"""Online estimates of B_D during training, from what a data-parallel step computes anyway.

B_D = E‖g‖² / ‖E g‖²; a step gives unbiased estimates of both moments either from its
per-example norms (``in_step_moments``, with ``GhostNorms``) or from the local and all-reduced
gradient norms (``two_batch_moments``, McCandlish et al.'s two-batch estimator: no extra backward,
via ``reduce_gradients``, DDP's all-reduce done by hand). ``MomentsEMA`` smooths the ratio over
steps; ``OnlineDiversity`` runs one of the two in ``raygd.loop``'s step. Hand-written: these are
small formulas on top of torch.distributed, tied to raygd's step.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raygd.diversity.ghost import GhostNorms
from raygd.mechanisms import build_mechanism
from raygd.records import BOUND_MEDIAN_METRIC

if TYPE_CHECKING:
    from raygd.config import RunConfig
    from raygd.mechanisms.base import Mechanism


class Moments(NamedTuple):
    """Estimates of E‖g‖² and ‖μ‖² = ‖E g‖² (uniform over the n examples)."""

    expected_sq_norm: float
    sq_norm_of_mean: float

    @property
    def batch_bound(self) -> float:
        """B_D = E‖g‖² / ‖μ‖²; inf when the ‖μ‖² estimate is <= 0 (noise dominates), nan if unknown."""
        if math.isnan(self.sq_norm_of_mean) or self.sq_norm_of_mean > 0:
            return self.expected_sq_norm / self.sq_norm_of_mean
        return math.inf


def in_step_moments(
    sum_sq_norms: float, grad_sum_sq_norm: float, batch_size: int, population_size: int | None = None
) -> Moments:
    """Unbiased E‖g‖² and ‖μ‖² from one batch's per-example norms s_i and summed gradient G.

    With replacement (the paper's sampling): E‖g‖² ≈ Σs_i / b and
    ‖μ‖² ≈ (‖G‖² − Σs_i) / (b(b−1)) (the mean of g_i·g_j over pairs i ≠ j), both unbiased.
    Without replacement from n (``population_size``), the pair mean estimates
    c = (n‖μ‖² − E‖g‖²)/(n−1), so ‖μ‖² ≈ ((n−1)c + E‖g‖²)/n (finite-population correction).

    Args:
        sum_sq_norms: Σ_i ‖g_i‖² over the b examples (all workers).
        grad_sum_sq_norm: ‖Σ_i g_i‖² (with the mean loss: b²‖grad‖² after the all-reduce).
        batch_size: b >= 2.
        population_size: n when the batch was drawn without replacement, else None.
    """
    if batch_size < 2:
        return Moments(math.nan, math.nan)
    m2 = sum_sq_norms / batch_size
    pairs = (grad_sum_sq_norm - sum_sq_norms) / (batch_size * (batch_size - 1))
    if population_size is not None:
        pairs = ((population_size - 1) * pairs + m2) / population_size
    return Moments(m2, pairs)


def two_batch_moments(
    small_sq_norm: float, small_batch: int, big_sq_norm: float, big_batch: int, population_size: int | None = None
) -> Moments:
    """E‖g‖² and ‖μ‖² from mean-gradient norms at two batch sizes (McCandlish et al., App. A).

    E‖G_b‖² = ‖μ‖² + v_b tr(Σ) with v_b = 1/b (with replacement) or (n−b)/(b(n−1))
    (without, ``population_size`` = n). Solving for b < B:
    tr(Σ) = (‖G_b‖² − ‖G_B‖²)/(v_b − v_B), ‖μ‖² = ‖G_B‖² − v_B tr(Σ), both unbiased; with
    replacement ‖μ‖² = (B‖G_B‖² − b‖G_b‖²)/(B − b). E‖g‖² = ‖μ‖² + tr(Σ).

    Under noise shared by a worker's whole batch (DropConnect ``per_worker``: one mask per worker batch) the
    estimate is b·Var(G_b), the variance a single example would need for its batch mean to be that noisy:
    σ²/(1 − p) + b·p/(1 − p)·‖μ‖² for a mask on every coordinate (brute force in tests/test_diversity.py).
    The mask noise does not average out over the batch, so this B_D grows with b = B/P, while B_D(w0)
    (``raygd.bound``, per-example surrogates) does not.

    Args:
        small_sq_norm: ‖G_b‖² of a b-example mean gradient (averaged over the P workers).
        small_batch: b = B/P.
        big_sq_norm: ‖G_B‖² of the all-reduced B-example mean gradient.
        big_batch: B > b (else the result is nan).
        population_size: n for sampling without replacement, else None.
    """
    if big_batch <= small_batch:
        return Moments(math.nan, math.nan)

    def v(b: int) -> float:
        return 1.0 / b if population_size is None else (population_size - b) / (b * (population_size - 1))

    trace = (small_sq_norm - big_sq_norm) / (v(small_batch) - v(big_batch))
    mu2 = big_sq_norm - v(big_batch) * trace
    return Moments(mu2 + trace, mu2)


def mean_over_workers(value: float, world_size: int, device: torch.device | str = "cpu") -> float:
    """(1/P) Σ_ranks value with one all-reduce; the value itself at world size 1."""
    return sum_over_workers([value], world_size, device)[0] / world_size


def sum_over_workers(values: list[float], world_size: int, device: torch.device | str = "cpu") -> list[float]:
    """Σ_ranks of each value with one all-reduce (float64); the values themselves at world size 1."""
    if world_size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def grad_sq_norm(model: nn.Module) -> float:
    """Σ over parameters of ‖p.grad‖², e.g. ‖G_B‖² after DDP's all-reduce.

    One fused kernel for all the norms (``torch._foreach_norm``, as ``clip_grad_norm_`` uses), squared
    and summed in float64: fewer kernel launches than a dot product per tensor, which a small
    model's training step (the free and in-step estimators read this every step) feels.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    # torch's stubs do not re-export _foreach_norm, which clip_grad_norm_ itself calls
    return math.fsum(float(n) ** 2 for n in torch._foreach_norm(grads))  # pyright: ignore[reportPrivateImportUsage]


class MomentsEMA:
    """Smoothed B_D over steps: the ratio of exponential moving averages of E‖g‖² and ‖μ‖².

    Averaging numerator and denominator separately (not the per-step ratio) is less biased:
    the per-step ‖μ‖² estimate is noisy and can be ≤ 0, and E[a/b] ≠ E[a]/E[b]. Steps whose
    estimate is nan are skipped. Values are bias-corrected (1 − decay^t), which cancels in
    the ratio.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay = {decay} must be in [0, 1).")
        self.decay, self.steps = decay, 0
        self._num = self._den = 0.0
        self.history: list[float] = []
        """The smoothed B_D after each update that folded something in."""

    def update(self, m: Moments) -> Moments:
        """Fold in one step's estimate; return the smoothed moments (``.batch_bound`` for B_D)."""
        if not (math.isnan(m.expected_sq_norm) or math.isnan(m.sq_norm_of_mean)):
            self.steps += 1
            self._num = self.decay * self._num + (1 - self.decay) * m.expected_sq_norm
            self._den = self.decay * self._den + (1 - self.decay) * m.sq_norm_of_mean
            self.history.append(self.value.batch_bound)
        return self.value

    @property
    def value(self) -> Moments:
        if self.steps == 0:
            return Moments(math.nan, math.nan)
        correction = 1 - self.decay**self.steps
        return Moments(self._num / correction, self._den / correction)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``update`` has folded in (for a checkpoint)."""
        return {"decay": self.decay, "steps": self.steps, "num": self._num, "den": self._den, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict``: the next ``update`` gives what it would have given there."""
        self.decay, self.steps, self._num, self._den = state["decay"], state["steps"], state["num"], state["den"]
        self.history = list(state.get("history", []))  # checkpoints from before the history have none


def reduce_gradients(model: nn.Module, world_size: int) -> tuple[float, float]:
    """The free estimator's two norms around DDP's all-reduce, done by hand in one flat all-reduce.

    For a backward run under ``ddp.no_sync()``: reads ‖G_b‖² of this rank's gradient, averages every
    ``.grad`` over the ranks in place (what DDP does after a backward) and reads ‖G_B‖² of the result.
    ‖G_b‖² rides in the same all-reduce as one extra entry, so the measured update pays one collective,
    like an ordinary one. Without a process group the gradients stay as they are.

    Returns:
        (mean over ranks of ‖G_b‖², ‖G_B‖²).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0, 0.0
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_zeros(1)])
    body = flat[:-1]
    flat[-1] = torch.dot(body, body)
    if dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        for g, part in zip(grads, body.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    return float(flat[-1]), float(torch.dot(body, body))


class OnlineDiversity:
    """B_D during training from the gradients of one update in ``train.diversity_every_steps``,
    smoothed over the measured updates; ``raygd.loop`` runs it.

    ``in_step``: per-example squared norms of the batch (ghost norms, one backward) give
    unbiased E‖g‖² and ‖μ‖². ``free``: the measured update's backward runs under DDP's
    ``no_sync``; ‖G_b‖² of each worker's B/P examples is read, the gradients are all-reduced by
    hand (``reduce_gradients``, one collective) and ‖G_B‖² read: no extra backward, and updates not measured
    keep DDP's overlapped all-reduce untouched. Both use the finite-population correction
    under ``shuffle`` sampling.
    """

    def __init__(
        self,
        cfg: RunConfig,
        n: int,
        model: torch.nn.Module,
        net: torch.nn.Module,
        world_size: int,
        device: torch.device,
        mechanism: Mechanism | None = None,
    ):
        self.kind, self.n = cfg.online_estimator, n  # auto resolved; "none": never due, no metrics
        self.every = cfg.train.diversity_every_steps
        self.model, self.net, self.world_size, self.device = model, net, world_size, device
        self.B = cfg.train.global_batch_size
        self.b = self.B // world_size
        self.population = n if cfg.data.sampling == "shuffle" else None
        self.ema = MomentsEMA(0.9)
        self.ghost = GhostNorms(model) if self.kind == "in_step" else None
        self.mechanism = mechanism or build_mechanism(cfg.mechanism)
        """The mechanism training runs (its communication may add noise the in_step estimate removes)."""
        self.surrogate, self.bound_of = self.mechanism.surrogate_moments, self.mechanism.bound_of
        self.num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def due(self, step: int) -> bool:
        """Whether update ``step`` (0-based) is measured."""
        return self.kind != "none" and step % self.every == 0

    def measuring(self):
        """The context a measured update's forward and backward run in."""
        if self.ghost is not None:
            self.mechanism.measure_reduction_noise(True)
            return self.ghost
        return cast(DistributedDataParallel, self.net).no_sync()  # free: P > 1, so net is DDP

    def update(self) -> None:
        """After a measured backward (before the mechanism changes the gradient)."""
        P = self.world_size
        if self.kind == "in_step":
            sq = self.ghost.sq_norms() if self.ghost is not None else None
            if sq is None:
                raise RuntimeError("OnlineDiversity.update() needs a measured backward run inside measuring()")
            # ‖Σg‖² from the reduced gradient, less the noise its compression added (QSGD at P > 1; else 0)
            self.mechanism.measure_reduction_noise(False)
            sum_sq, noise = sum_over_workers(
                [float(sq.sum()) * self.b**2, self.mechanism.reduction_noise_sq()], P, self.device
            )
            big = grad_sq_norm(self.model) - noise
            moments = in_step_moments(sum_sq, big * self.B**2, self.B, self.population)
        else:
            small, big = reduce_gradients(self.model, P)
            moments = two_batch_moments(small, self.b, big, self.B, self.population)
        self.ema.update(Moments(*self.surrogate(*moments, n=self.n, num_params=self.num_params)))

    def metrics(self) -> dict[str, float]:
        """``diversity/batch_bound`` (the smoothed B_D; nan before the first measured update) and
        ``diversity/delta``; nothing when the estimator is off."""
        if self.kind == "none":
            return {}
        bound = self.ema.value.batch_bound
        return {"diversity/batch_bound": bound, "diversity/delta": bound / self.n}

    def summary(self) -> dict[str, float]:
        """``BOUND_MEDIAN_METRIC``: the median of the smoothed B_D after each measured update (the
        values the estimator produced, kept across a checkpoint restart); empty when none."""
        values = [v for v in self.ema.history if not math.isnan(v)]
        return {BOUND_MEDIAN_METRIC: statistics.median(values)} if values else {}
