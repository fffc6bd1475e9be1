"""``raygd.attach(model)``: gradient diversity and the batch-size bound inside a Ray Train loop of your own.

Three lines in a ``train_loop_per_worker`` that already calls ``ray.train.torch.prepare_model``::

    model = ray.train.torch.prepare_model(model)
    probe = raygd.attach(model, n=len(train_dataset))            # after prepare_model, before training
    ...
    ray.train.report({"loss": loss, **probe.metrics()})           # on every rank, as Ray wants

``probe.metrics()`` is a flat dict: ``diversity/batch_bound`` (B_D = E‖g‖²/‖E g‖² = 1 + B_noise, smoothed
over the measured updates), ``diversity/batch_bound_se`` (its standard error, ``smoothing.py``),
``diversity/noise_scale`` (B_noise = B_D − 1, McCandlish et al.'s simple noise scale),
``diversity/adascale_gain`` (AdaScale's gain of the current batch B over one example,
r = B_D·B/(B + B_D − 1), between 1 and B: how many single-example steps one step at B is worth),
``diversity/delta`` (Δ_D = B_D/n, only when ``n`` is given) and ``diversity/measured_updates``. They reach
Tune and MLflow (``ray.air.integrations.mlflow``) through ``ray.train.report`` like any other metric.

Which estimator, and why (``probe.estimator``):

- P > 1 (the DDP module ``prepare_model`` returns, or any ``DistributedDataParallel``): ``"free"``, the
  two-batch estimator from each worker's local gradient (B/P examples) and the all-reduced one (B),
  read inside DDP's communication hook before and after the all-reduce DDP does anyway: no extra
  backward, no extra pass over the gradient, one 3-number all-reduce per measured update, and it needs
  no per-example gradients, so it works for any model (BatchNorm, attention, custom layers). ``free.py``.
- P = 1 (an unwrapped module, which ``prepare_model`` returns on one worker): no second batch size
  exists, so ``"in_step"``: the batch's per-example gradient norms from the layers' norm rules, read
  from hooks that leave autograd's gradients as they are. ``in_step.py``.

One update in ``every`` (default 10) is measured; the others run DDP's collective through the probe's
hook untouched. The model object, its ``state_dict``, its gradients and the weights it reaches are those
of the same loop without the probe (tests/test_attach.py checks the weights bit for bit).

The exact value at the current weights, on a sample: ``probe.exact(loader_or_tensors)`` (``exact.py``).

DDP takes one communication hook and cannot remove it. A hook of your own (or QSGD's,
``raygd.mechanisms.Quantize.attach_ddp``) composes with the probe's: pass ``comm_hook=(state, hook)``, or
register it after ``attach``. A hook registered before ``attach`` cannot be composed, and ``attach`` says
so (``CommHookConflict``). ``probe.detach()`` removes every hook the probe added; on a DDP module the
probe's comm hook stays registered as a pass-through to the inner hook, since DDP has no way to take it
back, and a later ``attach`` reuses it.
"""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from raygd.diversity.exact import Diversity
from raygd.probe.exact import Data, LossFn, exact_diversity
from raygd.probe.free import CommHook, CommHookConflict, FreeEstimator, HookSlot
from raygd.probe.in_step import InStepEstimator
from raygd.probe.smoothing import SmoothedBound

__all__ = ["CommHookConflict", "Probe", "attach"]


def adascale_gain(batch_bound: float, batch_size: int) -> float:
    """AdaScale's gain r = (σ² + ‖μ‖²)/(σ²/B + ‖μ‖²) of batch B over one example: B_D·B/(B + B_D − 1)."""
    if math.isnan(batch_bound):
        return math.nan
    if math.isinf(batch_bound):
        return float(batch_size)
    return batch_bound * batch_size / (batch_size + batch_bound - 1)


class Probe:
    """The handle ``raygd.attach`` returns: ``metrics()``, ``exact(...)``, ``detach()``."""

    def __init__(
        self,
        model: nn.Module,
        estimator: FreeEstimator | InStepEstimator | None,
        smoothing: SmoothedBound,
        n: int | None,
        process_group: Any,
    ) -> None:
        self.model, self._estimator, self.smoothing, self.n = model, estimator, smoothing, n
        self.process_group = process_group
        self.estimator = estimator.kind if estimator is not None else "none"
        """"free" (P > 1), "in_step" (P = 1) or "none" (``every=0``)."""
        self.attached = True

    @property
    def problem(self) -> str | None:
        """Why measured updates were left out (e.g. a batch size that could not be inferred), or None."""
        return self._estimator.problem if self._estimator is not None else None

    @property
    def fallback_layers(self) -> dict[str, str]:
        """P = 1: layers whose parameters the in-step estimate leaves out, and why (empty at P > 1)."""
        if isinstance(self._estimator, InStepEstimator):
            return {**self._estimator.fallback_layers, **self._estimator.skipped}
        return {}

    def metrics(self) -> dict[str, float]:
        """The smoothed bound and what follows from it, as a flat dict for ``ray.train.report``.

        Every rank gets the same values (at P > 1 the measured updates' numbers are all-reduced). nan before
        the first measured update (two for the standard error); empty when the probe measures nothing."""
        if self._estimator is None:
            return {}
        self._estimator.fold()
        bound = self.smoothing.value.batch_bound
        out = {
            "diversity/batch_bound": bound,
            "diversity/batch_bound_se": self.smoothing.standard_error(),
            "diversity/noise_scale": bound - 1,
            "diversity/measured_updates": float(self.smoothing.steps),
        }
        batch = self._estimator.last_batch
        out["diversity/adascale_gain"] = adascale_gain(bound, batch) if batch else math.nan
        if self.n:
            out["diversity/delta"] = bound / self.n
        return out

    def exact(
        self,
        data: Data,
        loss_fn: LossFn | None = None,
        *,
        max_examples: int | None = None,
        batch_size: int = 256,
        dtype: Any = None,
        across_ranks: bool = False,
    ) -> Diversity:
        """The exact Δ_D and B_D = nΔ_D at the current weights on a sample (``.batch_bound``, ``.delta``, ``.n``).

        Args:
            data: a pair of tensors (inputs, targets) or an iterable of (inputs, targets) batches (a DataLoader).
            loss_fn: ``loss_fn(output, target)`` of one example's loss, any reduction; default cross entropy
                (``raygd.loss``: also a sequence model's [N, T, C] logits with [N, T] targets).
            max_examples: stop after this many examples.
            batch_size: examples per pass (tensors); a loader keeps its own batches.
            dtype: compute in this dtype (torch.float64 for a reference value); the model is not modified.
            across_ranks: sum over the workers (every rank must call it): a loader sharded by
                ``prepare_data_loader`` then gives the bound on the union of the shards. Default: this
                rank's sample only.
        """
        group = self.process_group if across_ranks and dist.is_initialized() else None
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        estimator = self._estimator if isinstance(self._estimator, InStepEstimator) else None
        if estimator is not None:
            estimator.paused = True  # the pass calls the model: not a training forward
        try:
            return exact_diversity(
                model, data, loss_fn, max_examples=max_examples, batch_size=batch_size, dtype=dtype, process_group=group
            )
        finally:
            if estimator is not None:
                estimator.paused = False

    def detach(self) -> None:
        """Remove every hook the probe added (a DDP comm hook becomes a pass-through); metrics() keeps its values."""
        if self._estimator is not None:
            self._estimator.fold()
            self._estimator.detach()
        self.attached = False

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(
    model: nn.Module,
    *,
    n: int | None = None,
    global_batch_size: int | None = None,
    every: int = 10,
    decay: float = 0.9,
    comm_hook: tuple[Any, CommHook] | None = None,
    with_replacement: bool = False,
) -> Probe:
    """Attach the probe to the model a Ray Train loop trains; returns its handle (see the module docstring).

    Args:
        model: the module ``ray.train.torch.prepare_model`` returned: a ``DistributedDataParallel`` (P > 1)
            or the plain module (P = 1). Attach before the first backward.
        n: the training set's size; gives ``diversity/delta`` and the finite-population correction.
        global_batch_size: B, examples per update over all workers; default: counted from the forwards
            (dim 0 of the first tensor input), gradient accumulation included.
        every: measure one update in ``every``; 0 measures nothing (``exact`` only).
        decay: the moving averages' decay over measured updates (effective window (1 + d)/(1 − d)).
        comm_hook: ``(state, hook)`` of a DDP communication hook to run inside the probe's (P > 1).
        with_replacement: the loop samples with replacement (default: epochs without, as
            ``DistributedSampler``; with ``n`` the estimators then correct for the finite population).
    """
    if every < 0:
        raise ValueError(f"every = {every} must be >= 0 (0: no online estimate).")
    if n is not None and n < 2:
        raise ValueError(f"n = {n} must be the training set's size (>= 2).")
    smoothing = SmoothedBound(decay)
    population = None if with_replacement else n
    ddp = model if isinstance(model, DistributedDataParallel) else None
    world_size = dist.get_world_size(ddp.process_group) if ddp is not None else 1
    if ddp is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise TypeError(
            f"raygd.attach got a {type(model).__name__} in a process group of {dist.get_world_size()} workers: attach "
            "to the DistributedDataParallel module that ray.train.torch.prepare_model returns, which holds the "
            "all-reduce the probe reads."
        )
    if comm_hook is not None and (ddp is None or world_size == 1):
        raise ValueError("comm_hook: only a DistributedDataParallel module on P > 1 workers has a communication hook.")
    estimator: FreeEstimator | InStepEstimator | None = None
    if ddp is not None and world_size > 1:
        slot = HookSlot.of(ddp)
        if slot.reader is not None:
            raise CommHookConflict("raygd.attach: a probe is already attached to this module; detach() it first.")
        if comm_hook is not None:
            slot.compose(*comm_hook)
        if every:
            estimator = FreeEstimator(ddp, slot, every, global_batch_size, population, smoothing)
    elif every:
        inner = ddp.module if ddp is not None else model
        estimator = InStepEstimator(inner, every, population, smoothing)
    return Probe(model, estimator, smoothing, n, ddp.process_group if ddp is not None else None)
