"""The in-step estimator at P = 1: per-example gradient norms of one batch, read from hooks, gradients untouched.

With one worker there is no second batch size to compare, so the probe reads the per-example squared norms
s_i of a measured batch from the layers' norm rules (``raygd.diversity.rules``: Linear, Conv2d, Embedding,
LayerNorm, RMSNorm and registered ones) and the batch's summed gradient G from ``.grad``; unbiased
E‖g‖² and ‖μ‖² follow (``raygd.diversity.in_step_moments``). The loss scale (mean, sum, an AMP scaler)
multiplies Σs_i and ‖G‖² alike and cancels in the bound.

Why hooks, not ``GhostNorms``: its fused Linear/Conv2d kernels compute the weight gradient themselves
(summed per-example matrices), which moves a convolution's gradient by a rounding error, and a probe must
leave training bit for bit as it is. Here a forward hook on each layer with a rule registers a gradient hook
on its output, which calls the rule with the layer's input and ∂L/∂y and returns nothing; autograd computes
every gradient as without the probe. The cost, on a measured update only, is the rules' own work (about
1.5-1.9x a plain step for the MNIST CNN, ``docs``: DESIGN's per-example norms table). The end of the
backward pass is found as AdaptDL does: a hook on the model's output queues a callback with autograd's engine.

Measured parameters: those of layers whose rule ran in the measured forward. A layer without a rule
(``norm_routes``: "fallback", e.g. GroupNorm), called twice, or whose input is not per example (rows
other than the batch's) is left out of both Σs_i and ‖G‖²: the bound is then that of the measured
parameters, and ``fallback_layers`` names the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from raygd.diversity.checks import mode_sensitive_layers
from raygd.diversity.online import in_step_moments
from raygd.diversity.routes import plan_routes
from raygd.diversity.rules import NormRule
from raygd.probe.free import _first_tensor
from raygd.probe.smoothing import SmoothedBound


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)


class InStepEstimator:
    """Measures one forward+backward in ``every`` (forwards with gradients enabled count) of a P = 1 model."""

    kind = "in_step"

    def __init__(self, model: nn.Module, every: int, population: int | None, smoothing: SmoothedBound) -> None:
        sensitive = [f"{name or '<model>'} ({type(m).__name__})" for name, m in mode_sensitive_layers(model)]
        if sensitive:
            raise ValueError(
                f"raygd.attach at P = 1 reads per-example gradients, which {', '.join(sensitive)} make undefined "
                "(batch statistics) or random in train mode. Attach with every=0 and measure with probe.exact(...) "
                "(eval mode), or train on P >= 2 workers, where the free estimator needs no per-example gradients."
            )
        plan = plan_routes(model)
        if not plan.rules:
            raise ValueError(
                "raygd.attach at P = 1: no layer of this model has a per-example norm rule "
                f"({plan.reasons or 'no trainable parameters'}); register one (raygd.diversity.register_norm_rule), "
                "or attach with every=0 and use probe.exact(...)."
            )
        self.model, self.every, self.population, self.smoothing = model, every, population, smoothing
        self.fallback_layers = dict(plan.reasons)
        """Layer name -> why its parameters are not measured (by construction; ``skipped`` adds run time)."""
        self.skipped: dict[str, str] = {}
        """Layers of the last measured forward that were left out, and why."""
        self._params = {
            name: {k: p for k, p in m.named_parameters(recurse=False) if p.requires_grad}
            for name, m in model.named_modules()
            if name in plan.rules
        }
        self.forwards, self.paused, self.last_batch = 0, False, None
        self.problem: str | None = None
        self._open = False
        self._batch: int | None = None
        self._called: set[str] = set()
        self._norms: list[torch.Tensor] = []
        self._start: dict[int, torch.Tensor] = {}
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
            *(
                m.register_forward_hook(partial(self._layer, name, plan.rules[name]))
                for name, m in model.named_modules()
                if name in plan.rules
            ),
        ]

    # ------------------------------------------------------------------ forward: decide, then hook the outputs

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.paused or not torch.is_grad_enabled() or self.every == 0:
            return
        due = self.forwards % self.every == 0
        self.forwards += 1
        first = _first_tensor(args, kwargs)
        self._open = due and first is not None
        if self._open:
            assert first is not None
            self._batch, self._called, self._norms, self.skipped = int(first.shape[0]), set(), [], {}

    def _layer(self, name: str, rule: NormRule, module: nn.Module, args: tuple, out: Any) -> None:
        if not self._open or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        params = {k: getattr(module, k) for k in self._params[name]}
        problem = None
        if name in self._called:
            problem = "is called twice in one forward"
        elif out.dim() == 0 or out.shape[0] != self._batch:
            problem = f"has {out.shape[0] if out.dim() else 'no'} rows where the batch has {self._batch} examples"
        elif rule.check_call is not None:
            problem = rule.check_call(module, args)
        self._called.add(name)
        if problem is not None:
            self.skipped[name] = problem
            return
        out.register_hook(partial(self._run_rule, module, rule, args, params))

    def _run_rule(self, module: nn.Module, rule: NormRule, args: tuple, params: dict, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self._norms.append(rule.fn(module, args, grad, params).detach().to(torch.float64))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._open:
            return
        self._open = False
        out = next((t for t in _tensors(output) if t.requires_grad), None)
        if out is not None:
            out.register_hook(self._backward_starts)

    # ------------------------------------------------------------------ backward: snapshot, then read at the end

    def _measured(self) -> list[tuple[str, str, torch.Tensor]]:
        return [
            (name, k, p) for name in self._called if name not in self.skipped for k, p in self._params[name].items()
        ]

    def _backward_starts(self, grad: torch.Tensor) -> None:
        # .grad before this backward adds to it (gradient accumulation, zero_grad(set_to_none=False))
        self._start = {id(p): p.grad.detach().clone() for _, _, p in self._measured() if p.grad is not None}
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)  # pyright: ignore[reportAttributeAccessIssue]

    def _backward_ends(self) -> None:
        norms, self._norms = self._norms, []
        if not norms or self._batch is None:
            return
        big = 0.0
        for _, _, p in self._measured():
            if p.grad is not None:
                g = p.grad.detach()
                start = self._start.get(id(p))
                big += float(torch.linalg.vector_norm(g if start is None else g - start, dtype=torch.float64) ** 2)
        self._start = {}
        sum_sq = float(torch.stack(norms).sum())
        self.smoothing.update(in_step_moments(sum_sq, big, self._batch, self.population))
        self.last_batch = self._batch

    def fold(self) -> None:
        """Nothing to fold: each measured backward folds itself in at its end."""

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._open = [], False
