"""The exact B_D at the current weights on a sample: ``probe.exact(loader_or_tensors)``.

Cross entropy (``raygd.loss``: logits [N, C], or [N, T, C] with the mean over a sequence's positions) takes
``raygd.diversity.gradient_sums``: ghost norms for the layers with a rule, torch.func for the rest, the
closed form for a logistic regression. A loss of the user's own (``loss_fn(output, target)``, any
reduction) takes torch.func for every parameter: vmap of the gradient of the loss of one example, so
f_i is the user's loss on example i whatever its reduction (on one example mean and sum agree; for a
sequence, a sum over T positions scales every f_i by T, which B_D does not see).

Either way the model's parameters, ``.grad`` and mode are left as they were: the pass runs on detached
copies of the parameters, in eval mode (dropout off, BatchNorm's running statistics), then restores each
layer's mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap

from raygd.diversity.exact import Diversity, gradient_sums
from raygd.diversity.per_example import FUNC_CHUNK_BYTES, functional_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Iterable[Any]


def _batches(data: Data, batch_size: int, max_examples: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches from a pair of tensors or an iterable of (x, y) batches, up to ``max_examples``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, targets = data
        source: Iterable[Any] = [
            (inputs[s : s + batch_size], targets[s : s + batch_size]) for s in range(0, len(inputs), batch_size)
        ]
    else:
        source = data
    seen = 0
    for batch in source:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"probe.exact: a batch is (inputs, targets), got {type(batch).__name__}.")
        x, y = batch[0], batch[1]
        if max_examples is not None:
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        if len(x):
            seen += len(x)
            yield x, y
        if max_examples is not None and seen >= max_examples:
            return


def _func_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, dtype: torch.dtype | None
) -> tuple[float, torch.Tensor]:
    """(Σ_i‖∇f_i‖², Σ_i ∇f_i flattened, float64) with f_i = loss_fn on example i alone, by torch.func."""
    params, buffers = functional_state(model, dtype)

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    d = sum(p.numel() for p in params.values())
    chunk = max(1, FUNC_CHUNK_BYTES // (d * next(iter(params.values())).element_size()))
    total_sq, summed = 0.0, torch.zeros(d, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x[s : s + chunk], y[s : s + chunk])
        flat = torch.cat([g.detach().reshape(g.shape[0], -1) for g in grads.values()], 1).to(torch.float64)
        total_sq += float(flat.square().sum())
        summed += flat.sum(0)
    return total_sq, summed


def exact_diversity(
    model: nn.Module,
    data: Data,
    loss_fn: LossFn | None = None,
    *,
    max_examples: int | None = None,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    process_group: Any = None,
) -> Diversity:
    """Σ_i‖g_i‖², ‖Σ_i g_i‖² and n over the sample; with ``process_group``, summed over its ranks (one
    all-reduce of the summed gradient), so a sharded loader's shards make one sample."""
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total_sq, summed, n = 0.0, None, 0
    try:
        for x, y in _batches(data, batch_size, max_examples):
            x, y = x.to(device), y.to(device)
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            if loss_fn is None:
                sq, flat = gradient_sums(model, x, y, batch_size=batch_size, dtype=dtype)
            else:
                sq, flat = _func_sums(model, x, y, loss_fn, dtype)
            total_sq, n = total_sq + sq, n + int(x.shape[0])
            summed = flat if summed is None else summed + flat
    finally:
        for m, training in modes.items():
            m.training = training
    if summed is None:
        raise ValueError("probe.exact: the sample has no examples.")
    if process_group is not None:
        packed = torch.cat([summed, summed.new_tensor([total_sq, float(n)])])
        dist.all_reduce(packed, group=process_group)
        summed, total_sq, n = packed[:-2], float(packed[-2]), round(float(packed[-1]))
    return Diversity(n, total_sq, float(summed @ summed))
