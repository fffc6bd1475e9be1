"""Per-example gradients and their squared norms ‖∇f_i(w)‖², f_i example i's loss (``raygd.loss``:
cross entropy, averaged over the positions of a sequence).

``per_example_sq_norms`` is the exact path's workhorse: ghost norms (``ghost.py``) for the layers
with a norm rule (Linear, Conv2d, Embedding, LayerNorm, RMSNorm, registered ones) plus torch.func
per-example gradients for the rest (e.g. GroupNorm, a parameter shared by two layers),
or the closed form ‖g_i‖² = ‖p_i − e_{y_i}‖²(‖x_i‖² + 1) for logistic regression
(``linear_softmax_sq_norms``, one forward and no backward). ``per_example_grads`` (torch.func's
vmap of grad) also evaluates DropConnect's masked surrogates, which no library provides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from raygd.diversity.checks import LinearSoftmax, check_per_example, linear_softmax
from raygd.diversity.ghost import GhostNorms
from raygd.diversity.rules import _linear_sq_norms, _row_sq_norms
from raygd.loss import summed_loss

FUNC_CHUNK_BYTES = 64 * 2**20
"""Largest block of torch.func per-example gradients (N·d floats) alive at once."""

Params = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- torch.func path


def functional_state(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[Params, Params]:
    """(params, buffers) for ``torch.func.functional_call``: detached copies of the trainable
    parameters (requiring grad) and of the buffers and frozen parameters, cast to ``dtype``."""

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

    params = {n: cast(p).requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: cast(p) for n, p in model.named_parameters() if not p.requires_grad}
    return params, {**frozen, **{n: cast(b) for n, b in model.named_buffers()}}


def per_example_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params,
    buffers: Params,
    names: Sequence[str] | None = None,
    weight_masks: Params | None = None,
) -> Params:
    """g_i = ∇_θ f_i for each example, by torch.func (vmap of grad of functional_call).

    Cost: a batched forward and backward that holds N copies of every gradient (N·d floats);
    pass small chunks of examples.

    Args:
        model: the architecture (its own parameters are ignored).
        x, y: N examples and labels.
        params: name -> tensor for the trainable parameters; buffers: everything else.
        names: differentiate only these parameters (default: all of ``params``).
        weight_masks: name -> (N, *shape) per-example masks M_i; f_i is then evaluated at
            M_i ∘ θ and g_i = M_i ∘ ∇f_i(M_i ∘ θ) (DropConnect's surrogate).

    Returns:
        name -> (N, *shape) per-example gradients, in ``params`` order.
    """
    names = list(params) if names is None else list(names)
    diff = {n: params[n].detach() for n in names}
    fixed = {n: t.detach() for n, t in params.items() if n not in diff}

    def loss_one(diff: Params, masks: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        full = {**fixed, **diff}
        full = {n: t * masks[n] if n in masks else t for n, t in full.items()}
        return summed_loss(functional_call(model, (full, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")(diff, weight_masks or {}, x, y)


def _flat(grads: Params, n: int) -> torch.Tensor:
    """(N, d): per-example gradients concatenated in parameter order."""
    return torch.cat([g.reshape(n, -1) for g in grads.values()], 1)


def _func_sq_norms(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params, buffers: Params, names: Sequence[str]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Σ over ``names`` of ‖g_i‖² per example, Σ_i g_i per name) by torch.func in memory-bounded chunks."""
    d = sum(params[n].numel() for n in names)
    c = max(1, FUNC_CHUNK_BYTES // (d * params[names[0]].element_size()))
    sq, summed = [], None
    for s in range(0, x.shape[0], c):
        grads = per_example_grads(model, x[s : s + c], y[s : s + c], params, buffers, names)
        sq.append(_row_sq_norms(_flat(grads, x[s : s + c].shape[0])).to(torch.float64))
        part = [g.sum(0) for g in grads.values()]
        summed = part if summed is None else [a + b for a, b in zip(summed, part, strict=True)]
    assert summed is not None, "x has no examples"
    return torch.cat(sq), summed


def linear_softmax_sq_norms(
    found: LinearSoftmax, x: torch.Tensor, y: torch.Tensor, params: Params, buffers: Params
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Closed-form s_i = ‖∇f_i‖² and G = Σ_i ∇f_i of a ``linear_softmax`` model, f_i its cross entropy.

    With a_i = x_i flattened, z_i = W a_i + b, p_i = softmax(z_i) and δ_i = p_i − e_{y_i} = ∂f_i/∂z_i:
    ∇_W f_i = δ_i a_iᵀ and ∇_b f_i = δ_i, so s_i = ‖δ_i‖²(‖a_i‖² + 1) (no +1 without a trainable
    bias, no ‖a_i‖² with a frozen weight) and G = (δᵀA, Σ_i δ_i). Binary model, logits [0, z_i]
    with z_i = w·a_i + b: f_i = log(1 + e^{z_i}) − y_i z_i, so δ_i = σ(z_i) − y_i (y_i ∈ {0, 1}), a
    scalar, and s_i = (σ(z_i) − y_i)²(‖a_i‖² + 1), half of ‖p_i − e_{y_i}‖²(‖a_i‖² + 1) over its two
    logits. One forward, no backward.

    Args:
        found: ``linear_softmax(model)``.
        x, y: N examples and labels; params, buffers: as from ``functional_state``.

    Returns:
        (s, G) as ``per_example_sq_norms``.
    """
    a, delta = linear_softmax_deltas(found, x, y, params, buffers)
    return linear_softmax_sums(found, a, delta, params)


def linear_softmax_deltas(
    found: LinearSoftmax, x: torch.Tensor, y: torch.Tensor, params: Params, buffers: Params
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, δ) of a ``linear_softmax`` model: the flattened inputs a_i and δ_i = ∂f_i/∂z_i (see
    ``linear_softmax_sq_norms``); ∇f_i is linear in δ_i, so differences of gradients are those of δ."""
    prefix = f"{found.name}." if found.name else ""
    weight = params.get(f"{prefix}weight", buffers.get(f"{prefix}weight"))
    bias = params.get(f"{prefix}bias", buffers.get(f"{prefix}bias"))
    assert weight is not None, "linear_softmax found the layer, so its weight is a parameter or a buffer"
    with torch.no_grad():
        a = x.flatten(1).to(weight.dtype)
        z = F.linear(a, weight, bias)
        if found.binary:
            if bool(((y != 0) & (y != 1)).any()):
                raise ValueError("binary logistic regression needs labels in {0, 1}.")
            delta = torch.sigmoid(z) - y.unsqueeze(1).to(z.dtype)
        else:
            delta = torch.softmax(z, 1)
            delta[torch.arange(z.shape[0], device=z.device), y] -= 1
    return a, delta


def linear_softmax_sums(
    found: LinearSoftmax, a: torch.Tensor, delta: torch.Tensor, params: Params
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(s, G) from (A, δ): s_i = ‖δ_i‖²(‖a_i‖² + 1), G = (δᵀA, Σ_i δ_i), in ``params`` order."""
    prefix = f"{found.name}." if found.name else ""
    with torch.no_grad():
        sq = _linear_sq_norms(a, delta, f"{prefix}weight" in params, f"{prefix}bias" in params)
        grads = {f"{prefix}weight": delta.T @ a, f"{prefix}bias": delta.sum(0)}
    return sq.to(torch.float64), [grads[n] for n in params]


def per_example_sq_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    params: Params | None = None,
    buffers: Params | None = None,
    method: str = "ghost",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """s_i = ‖∇f_i(w)‖² for each example and the summed gradient G = Σ_i ∇f_i(w).

    ``method="ghost"``: one forward and one backward of Σ_i f_i with ``GhostNorms`` give G and
    the norms of the layers with a norm rule (``norm_routes``); the other trainable parameters
    (``GhostNorms.fallback_parameters``: layers without a rule such as GroupNorm, parameters shared
    by two layers, layers that could not be measured in this forward, e.g. an Embedding of positions
    shared by the batch) get torch.func per-example gradients, a second batched pass that
    differentiates only those. A ``linear_softmax`` model (logistic regression) takes the closed
    form instead (``linear_softmax_sq_norms``: one forward, no backward).
    ``method="func"``: torch.func for all parameters.

    Args:
        model: maps x to logits [N, C] (or [N, T, C] for a sequence model); f_i as ``raygd.loss``.
        x, y: N examples and labels (on the model's device).
        params, buffers: as from ``functional_state`` (default: the model's own, detached).
        method: "ghost" or "func".

    Returns:
        (s, G): s (N,) float64; G one tensor per trainable parameter, in ``params`` order.
    """
    check_per_example(model)
    if params is None or buffers is None:
        params, buffers = functional_state(model, None)
    if method == "func":
        return _func_sq_norms(model, x, y, params, buffers, list(params))
    if method != "ghost":
        raise ValueError(f"method = {method!r} is invalid: use 'ghost' or 'func'.")
    closed = linear_softmax(model)
    if closed is not None and (closed.name or x.dim() == 2):
        return linear_softmax_sq_norms(closed, x, y, params, buffers)
    ghost = GhostNorms(model, on_unsupported="fallback")
    with ghost:
        loss = summed_loss(functional_call(model, (params, buffers), (x,)), y)
        summed = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    sq = ghost.sq_norms()
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) if sq is None else sq
    fallback = set(ghost.fallback_parameters())
    rest = [n for n, g in zip(params, summed, strict=True) if n in fallback and g is not None]
    if rest:  # a parameter with no gradient has zero per-example gradients
        sq = sq + _func_sq_norms(model, x, y, params, buffers, rest)[0]
    return sq, [torch.zeros_like(p) if g is None else g for g, p in zip(summed, params.values(), strict=True)]


def _dot(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² in t's dtype without temporaries (a fresh float64 copy costs page faults on CPU)."""
    flat = t.detach().reshape(-1)
    return torch.dot(flat, flat)


def _sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    return sum(float(_dot(t)) for t in tensors)


def _batches(
    x: torch.Tensor, y: torch.Tensor, size: int, device: torch.device, dtype: torch.dtype | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, x.shape[0], size):
        xb = x[s : s + size].to(device)
        yield (xb.to(dtype) if dtype is not None and xb.is_floating_point() else xb), y[s : s + size].to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _flat_grad_chunks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params,
    buffers: Params,
    chunk_size: int,
    dtype: torch.dtype | None,
    masks: Callable[[int], Params] | None = None,
) -> Iterator[torch.Tensor]:
    """(c, d) per-example gradients (torch.func) of successive chunks of c <= chunk_size examples."""
    check_per_example(model)
    for xb, yb in _batches(x, y, chunk_size, _device(model), dtype):
        grads = per_example_grads(model, xb, yb, params, buffers, weight_masks=masks(xb.shape[0]) if masks else None)
        yield _flat(grads, xb.shape[0])
