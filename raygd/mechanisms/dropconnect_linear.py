"""DropConnect's torch kernels: per-example weight masks and the masked linear layer.

``DropConnectLinear`` replaces an ``nn.Linear`` under ``raygd.mechanisms.DropConnect``: each group
of examples (one example, a group, or the worker batch) computes with its own Bernoulli mask on
the weight. Hand-written because ``torch.nn.functional.dropout`` drops activations, not weights,
and per-example weight masks need a batched matmul; masks are redrawn in backward from the saved
generator state so memory does not grow with the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MASK_BUDGET_BYTES = 64 * 2**20
"""Largest block of DropConnect masks alive at once (the rest is redrawn, not stored)."""


def dropconnect_masks(
    shape: Sequence[int],
    p: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Independent DropConnect masks: M = Bernoulli(1-p) / (1-p), so E[M * W] = W.

    Drawn as 1[u < 1-p] with u ~ U[0, 1) (twice as fast as ``bernoulli_`` on CPU).

    Args:
        shape: mask shape, e.g. (groups, out_features, in_features).
        p: drop probability in [0, 1).
        generator: source of randomness; the masks live on its device.
        dtype: floating dtype of the result.
        out: optional buffer of ``shape`` on the generator's device to draw into.

    Returns:
        Tensor of ``shape`` whose entries are exactly 0 or 1/(1-p).
    """
    keep = 1.0 - p
    masks = out if out is not None else torch.empty(tuple(shape), dtype=dtype, device=generator.device)
    return masks.uniform_(generator=generator).lt_(keep).mul_(1.0 / keep)


def _mask_chunks(
    weight: torch.Tensor, num_groups: int, p: float, generator: torch.Generator, groups_per_chunk: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, masks[start:stop]) for ``num_groups`` masks, drawn chunk by chunk.

    The masks are views of one reused buffer: each is overwritten by the next chunk, and the
    consumer may modify it in place (large fresh allocations cost page faults on every step).
    """
    rows = min(groups_per_chunk, num_groups)
    buffer = torch.empty((rows, *weight.shape), dtype=weight.dtype, device=generator.device)
    for start in range(0, num_groups, groups_per_chunk):
        stop = min(start + groups_per_chunk, num_groups)
        masks = dropconnect_masks(buffer[: stop - start].shape, p, generator, out=buffer[: stop - start])
        yield start, stop, masks.to(weight.device)


class _GroupMaskedLinear(torch.autograd.Function):
    """y[g] = x[g] (M_g * W)^T for groups g; masks are redrawn in backward, never stored.

    Backward: dx[g] = dy[g] (M_g * W);  dW = sum_g M_g * (dy[g]^T x[g]).
    """

    @staticmethod
    def forward(ctx, x, weight, p, generator, groups_per_chunk):
        ctx.rng_state, ctx.rng_device = generator.get_state(), generator.device
        ctx.p, ctx.groups_per_chunk = p, groups_per_chunk
        ctx.save_for_backward(x, weight)
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
        for start, stop, masks in _mask_chunks(weight, x.shape[0], p, generator, groups_per_chunk):
            torch.bmm(x[start:stop], masks.mul_(weight).transpose(1, 2), out=out[start:stop])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        generator = torch.Generator(device=ctx.rng_device)
        generator.set_state(ctx.rng_state)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        outer = None
        for start, stop, masks in _mask_chunks(weight, x.shape[0], ctx.p, generator, ctx.groups_per_chunk):
            dy = grad_out[start:stop]
            if grad_w is not None:
                outer = outer if outer is not None else torch.empty_like(masks)
                part = torch.bmm(dy.transpose(1, 2), x[start:stop], out=outer[: stop - start])
                grad_w += part.mul_(masks).sum(0)
            if grad_x is not None:
                torch.bmm(dy, masks.mul_(weight), out=grad_x[start:stop])
        return grad_x, grad_w, None, None, None


class DropConnectLinear(nn.Linear):
    """``nn.Linear`` whose weight is masked per group of examples in train mode.

    Train mode: examples are split into consecutive groups of ``group_size`` (None: the whole
    batch; the last group may be smaller); group g computes y = x (M_g * W)^T + b with its own
    M_g = Bernoulli(1-p)/(1-p). Biases are not masked. Eval mode (or p = 0): y = x W^T + b.
    Input (N, *, in_features): the mask belongs to the example (first dimension).
    Masks are drawn in chunks of at most ``mask_budget_bytes`` (forward holds one such buffer,
    backward two) and redrawn in backward from the saved generator state, so memory does not
    grow with the batch; per-example masks therefore cost two draws per weight per example.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        p: float = 0.5,
        group_size: int | None = 1,
        generator: torch.Generator | None = None,
        mask_budget_bytes: int = MASK_BUDGET_BYTES,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.p, self.group_size, self.mask_budget_bytes = p, group_size, mask_budget_bytes
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> DropConnectLinear:
        """Wrap ``linear``'s own weight and bias Parameters (shared, not copied)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **kwargs)
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, group_size={self.group_size}"

    def _groups_per_chunk(self) -> int:
        return max(1, self.mask_budget_bytes // (self.weight.numel() * self.weight.element_size()))

    def _group_layout(self, n: int) -> tuple[int, int]:
        """(examples per full group, number of full groups) for a batch of n examples."""
        g = min(self.group_size or n, n)
        return g, n // g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.shape[0] == 0:
            return F.linear(x, self.weight, self.bias)
        n = x.shape[0]
        rows = x.reshape(n, -1, self.in_features)
        g, full = self._group_layout(n)
        chunk = self._groups_per_chunk()
        parts = [
            _GroupMaskedLinear.apply(
                rows[: g * full].reshape(full, -1, self.in_features), self.weight, self.p, self.generator, chunk
            )
        ]
        if g * full < n:  # the shorter last group gets its own mask, drawn after the others
            parts.append(
                _GroupMaskedLinear.apply(
                    rows[g * full :].reshape(1, -1, self.in_features), self.weight, self.p, self.generator, chunk
                )
            )
        y = torch.cat([part.reshape(-1, self.out_features) for part in parts])
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def example_masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The (n, out, in) masks a forward of n examples draws from ``generator`` (for tests/analysis)."""
        g, full = self._group_layout(n)
        chunk = self._groups_per_chunk()
        masks = [m.clone() for _, _, m in _mask_chunks(self.weight, full, self.p, generator, chunk)]
        per_example = [torch.cat(masks).repeat_interleave(g, dim=0)]
        if g * full < n:
            last = next(_mask_chunks(self.weight, 1, self.p, generator, chunk))[2]
            per_example.append(last.expand(n - g * full, -1, -1))
        return torch.cat(per_example)


def replace_linears(
    module: nn.Module,
    p: float,
    group_size: int | None,
    generator: torch.Generator,
    layers: Sequence[str] | None = None,
    prefix: str = "",
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``module`` (recursively, or the module itself) whose name matches a glob
    of ``layers`` (``fnmatch`` on the name in the model, e.g. ``blocks.*.mlp.*``; None: all) by a
    ``DropConnectLinear`` sharing its parameters and ``generator``; returns the new module."""
    if isinstance(module, nn.Linear) and not isinstance(module, DropConnectLinear):
        if layers is None or any(fnmatchcase(prefix, pattern) for pattern in layers):
            return DropConnectLinear.from_linear(module, p=p, group_size=group_size, generator=generator)
        return module
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        new_child = replace_linears(child, p, group_size, generator, layers, name)
        if new_child is not child:
            setattr(module, child_name, new_child)
    return module
