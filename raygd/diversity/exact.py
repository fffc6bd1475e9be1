"""Exact gradient diversity Δ_D and B_D = nΔ_D over a data set, with and without mechanisms.

Δ_D(w) = Σ_i ‖g_i‖² / ‖Σ_i g_i‖² (Yin et al., Definition 1), measured in one pass
(``gradient_diversity``); B_D^DIM under the per-example surrogates of ``raygd.mechanisms``
(``sgld_diversity`` closed form, ``quantized_diversity`` exact QSGD variance,
``dropconnect_diversity`` Monte Carlo over masks); and Definition 2 between two parameter
vectors (``differential_diversity``). Written here because these are the paper's quantities:
no library measures them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from raygd.diversity.checks import LinearSoftmax, linear_softmax
from raygd.diversity.ghost import GhostNorms, GhostUnsupported
from raygd.diversity.per_example import (
    Params,
    _batches,
    _device,
    _dot,
    _flat_grad_chunks,
    _sq_norm,
    functional_state,
    linear_softmax_deltas,
    linear_softmax_sums,
    per_example_sq_norms,
)
from raygd.loss import summed_loss
from raygd.mechanisms.dropconnect_linear import dropconnect_masks


@dataclass(frozen=True)
class Diversity:
    """Δ = sum_sq_norms / sum_grad_sq_norm over n examples, and B = nΔ.

    For a mechanism both sums are expectations over its randomness:
    sum_sq_norms = Σ_i E‖g_i^DIM‖², sum_grad_sq_norm = E‖Σ_i g_i^DIM‖².
    """

    n: int
    sum_sq_norms: float
    sum_grad_sq_norm: float
    batch_bound_se: float = 0.0
    """Monte Carlo standard error of ``batch_bound`` (0 where both sums are exact)."""

    @property
    def delta(self) -> float:
        """Δ_D = Σ‖g_i‖² / ‖Σ g_i‖² (inf when the summed gradient is zero)."""
        return self.sum_sq_norms / self.sum_grad_sq_norm if self.sum_grad_sq_norm > 0 else math.inf

    @property
    def batch_bound(self) -> float:
        """B_D = n Δ_D."""
        return self.n * self.delta


def gradient_diversity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    method: str = "ghost",
) -> Diversity:
    """Exact Δ_D(w) = Σ_i‖∇f_i(w)‖² / ‖Σ_i ∇f_i(w)‖² and B_D = nΔ_D over (x, y), one pass.

    Cost with ``method="ghost"``: about 1.1-1.3x one forward+backward per batch for Linear/Conv2d
    models, plus a torch.func pass for uncovered layers; about 1.0x for logistic regression
    (closed form, no backward). See bench/diversity_overhead.py.

    Args:
        model: maps x to logits, in eval mode if it has BatchNorm or DropConnect layers.
        x, y: the n examples (a data set or a fixed sample) and labels.
        batch_size: examples per forward/backward.
        dtype: compute in this dtype (e.g. torch.float64); the model is not modified.
        method: "ghost" (fused norms + torch.func for the rest) or "func" (torch.func only).

    Returns:
        ``Diversity`` with n, Σ‖g_i‖² and ‖Σ g_i‖².
    """
    total_sq, summed = gradient_sums(model, x, y, batch_size=batch_size, dtype=dtype, method=method)
    return Diversity(int(x.shape[0]), total_sq, float(summed @ summed))


def gradient_sums(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 256,
    dtype: torch.dtype | None = None,
    method: str = "ghost",
) -> tuple[float, torch.Tensor]:
    """(Σ_i‖∇f_i(w)‖², Σ_i ∇f_i(w)) over (x, y): ``gradient_diversity``'s pass, the summed gradient kept
    (flattened in parameter order, float64) so that sums from several ranks add up (``raygd.bound``)."""
    params, buffers = functional_state(model, dtype)
    total_sq, summed = 0.0, None
    for xb, yb in _batches(x, y, batch_size, _device(model), dtype):
        sq, grads = per_example_sq_norms(model, xb, yb, params=params, buffers=buffers, method=method)
        total_sq += float(sq.sum())
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
        summed = flat if summed is None else summed + flat
    assert summed is not None, "x has no examples"
    return total_sq, summed


def ratio_of_means(n: int, sum_sq: list[float], grad_sq: list[float]) -> Diversity:
    """B = n ā / b̄ from K Monte Carlo draws a_k = Σ_i‖g_ik‖², b_k = ‖Σ_i g_ik‖², with its standard error.

    Delta method for a ratio of means: SE(B) = (n / b̄) · sqrt(s² / K), s² the sample variance (K − 1) of
    the residuals a_k − (ā/b̄) b_k; it shrinks as 1/√K. One draw (an exact value) has SE 0.
    """
    k = len(sum_sq)
    a, b = torch.tensor(sum_sq, dtype=torch.float64), torch.tensor(grad_sq, dtype=torch.float64)
    a_mean, b_mean = float(a.mean()), float(b.mean())
    se = 0.0
    if k > 1 and b_mean > 0:
        residual = a - (a_mean / b_mean) * b
        se = n / b_mean * math.sqrt(float(residual.var(correction=1)) / k)
    return Diversity(n, a_mean, b_mean, se)


# --------------------------------------------------------------------------- mechanisms


def sgld_diversity(base: Diversity, sigma: float, num_params: int) -> Diversity:
    """B_D^SGLD for surrogates g_i + ξ_i, ξ_i ~ N(0, σ²I_d) independent (closed form).

    Σ_i E‖g_i + ξ_i‖² = Σ_i‖g_i‖² + n d σ²;  E‖Σ_i (g_i + ξ_i)‖² = ‖Σ_i g_i‖² + n d σ².
    B^SGLD = n (Σ‖g_i‖² + ndσ²) / (‖Σg_i‖² + ndσ²) ≥ B_D exactly when B_D ≤ n.

    Args:
        base: ``gradient_diversity`` at w.
        sigma: per-example noise standard deviation σ.
        num_params: d, the number of trainable parameters.
    """
    noise = base.n * num_params * sigma**2
    return Diversity(base.n, base.sum_sq_norms + noise, base.sum_grad_sq_norm + noise)


def qsgd_variance(v: torch.Tensor, levels: int, bucket_size: int) -> torch.Tensor:
    """E‖Q(v)‖² − ‖v‖² of QSGD for each row of v (N, d), buckets of ``bucket_size`` entries.

    Per bucket b and entry j: r_j = |v_j| s / ‖v_b‖, p_j = r_j − ⌊r_j⌋;
    Var Q(v)_j = (‖v_b‖/s)² p_j (1 − p_j). A zero bucket has no variance.
    """
    n, d = v.shape
    rows = F.pad(v, (0, -d % bucket_size)).view(n, -1, bucket_size)
    norms = torch.linalg.vector_norm(rows, dim=2, keepdim=True)
    scaled = rows.abs() * levels / norms.clamp_min(torch.finfo(v.dtype).tiny)
    frac = scaled - scaled.floor()
    return ((norms.squeeze(2) / levels) ** 2 * (frac * (1 - frac)).sum(2)).sum(1)


def quantized_diversity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    levels: int,
    bucket_size: int,
    *,
    chunk_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Diversity:
    """B_D^Quant for per-example QSGD surrogates Q(g_i) (exact, no sampling).

    Q is unbiased and independent across examples, so with V = Σ_i E‖Q(g_i) − g_i‖²
    (``qsgd_variance``): Σ_i E‖Q(g_i)‖² = Σ‖g_i‖² + V and E‖Σ Q(g_i)‖² = ‖Σ g_i‖² + V.
    Buckets run over the per-example gradient flattened in parameter order, as
    ``raygd.mechanisms.Quantize`` does for the concatenated gradient (per example here: the
    paper's surrogate, not the per-worker granularity that training uses).
    Cost: per-example gradients by torch.func, chunk_size·d floats at a time.
    """
    params, buffers = functional_state(model, dtype)
    total_sq = variance = 0.0
    summed = None
    for g in _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype):
        total_sq += float(_dot(g))
        variance += float(qsgd_variance(g, levels, bucket_size).sum())
        summed = g.sum(0) if summed is None else summed + g.sum(0)
    assert summed is not None, "x has no examples"
    return Diversity(int(x.shape[0]), total_sq + variance, _sq_norm([summed]) + variance)


def dropconnect_diversity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    p: float,
    *,
    num_draws: int = 8,
    examples_per_mask: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 8,
    dtype: torch.dtype | None = None,
    layers: list[str] | None = None,
) -> Diversity:
    """B_D^DC for DropConnect surrogates, by Monte Carlo over the masks, with its standard error.

    g_i^DC = M_{k(i)} ∘ ∇f_i(M_{k(i)} ∘ W) with masks M = Bernoulli(1−p)/(1−p) on the weight of
    every nn.Linear (biases unmasked), as ``raygd.mechanisms.DropConnect``; k(i) is example i's
    group: consecutive runs of ``examples_per_mask`` examples share one mask (1: the paper's
    per-example masks; a training group size or the worker batch B/P: the surrogate as trained).
    No closed form exists for cross entropy (the loss derivative depends on M through the
    logits, even for logistic regression), and E g_i^DC ≠ g_i in general. Each draw gives every
    group its own mask (``dropconnect_draw``); the estimate is the ratio of the two unbiased means
    (1/K)Σ_k Σ_i‖g_ik‖² → Σ_i E‖g_i^DC‖² and (1/K)Σ_k ‖Σ_i g_ik‖² → E‖Σ_i g_i^DC‖², consistent
    as K grows, with the delta-method standard error of ``ratio_of_means``. Shared masks correlate
    the examples of a group, which raises E‖Σ_i g_i^DC‖² and so lowers the bound.
    Cost: K torch.func passes over the data.
    """
    if generator is None:
        generator = torch.Generator(device=_device(model)).manual_seed(0)
    sum_sq, grad_sq = [], []
    for _ in range(num_draws):
        sq, summed = dropconnect_draw(
            model, x, y, p, examples_per_mask, generator, chunk_size=chunk_size, dtype=dtype, layers=layers
        )
        sum_sq.append(sq)
        grad_sq.append(float(summed @ summed))
    return ratio_of_means(int(x.shape[0]), sum_sq, grad_sq)


def masked_linear_names(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """The nn.Linear layers DropConnect masks: the model's ``DropConnectLinear`` layers when it has any (a
    model set up by the mechanism), else those whose names match a glob of ``layers``
    (``mechanism.dropconnect_layers``; None: every nn.Linear)."""
    from fnmatch import fnmatchcase

    from raygd.mechanisms.dropconnect_linear import DropConnectLinear

    found = [n for n, m in model.named_modules() if isinstance(m, DropConnectLinear)]
    if found:
        return found
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in linear if layers is None or any(fnmatchcase(n, pat) for pat in layers)]


def dropconnect_draw(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    p: float,
    examples_per_mask: int,
    generator: torch.Generator,
    *,
    chunk_size: int = 8,
    dtype: torch.dtype | None = None,
    layers: list[str] | None = None,
) -> tuple[float, torch.Tensor]:
    """One mask draw: (Σ_i‖g_i^DC‖², Σ_i g_i^DC flattened in parameter order, float64) over (x, y).

    Groups are consecutive runs of ``examples_per_mask`` examples (the last may be shorter); an example's
    mask applies to all its positions (inputs (N, T, d)). Models whose trainable layers all have ghost
    norms (masked Linear layers in raygd's fused kernel) take ``_dropconnect_draw_ghost`` (ordinary
    backwards, masked norms in closed form; its docstring gives the order masks are drawn in); others,
    or a forward that ghost norms cannot measure, torch.func's per-example gradients at the masked
    weights, masks drawn per chunk of ``chunk_size`` examples (per example) or per group, in parameter order.
    """
    params, buffers = functional_state(model, dtype)
    linear = {f"{n}.weight" if n else "weight" for n in masked_linear_names(model, layers)}
    masked = [n for n in params if n in linear]
    ghost = GhostNorms(model)
    if not ghost.uncovered and all(n.removesuffix("weight").removesuffix(".") in ghost.fused for n in masked):
        try:
            return _dropconnect_draw_ghost(model, ghost, x, y, p, examples_per_mask, generator, masked, dtype)
        except GhostUnsupported:  # e.g. a layer called twice: the masks drawn so far are discarded
            ghost.weight_masks = {}
    masks = _group_masks({n: params[n] for n in masked}, p, max(1, examples_per_mask), generator)
    total_sq, summed = 0.0, None
    for g in _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype, masks):
        total_sq += float(_dot(g))
        part = g.sum(0).to(torch.float64)
        summed = part if summed is None else summed + part
    assert summed is not None, "x has no examples"
    return total_sq, summed


GROUP_BATCH = 256
"""Most examples of one mask group in one forward/backward of ``_dropconnect_draw_ghost``."""
MASK_BYTES = 64 * 2**20
"""Per-example masks (examples_per_mask = 1): examples per forward so that their masks fit in this."""


def _dropconnect_draw_ghost(
    model: nn.Module,
    ghost: GhostNorms,
    x: torch.Tensor,
    y: torch.Tensor,
    p: float,
    group: int,
    generator: torch.Generator,
    masked: list[str],
    dtype: torch.dtype | None,
) -> tuple[float, torch.Tensor]:
    """``dropconnect_draw`` by ordinary forwards and backwards at W, the masks applied inside the Linear
    layers (``_GhostMaskedLinear``: masked norms as cheap as the forward), ghost norms for the rest; no
    torch.func. Chunks of G whole groups (G·group <= ``GROUP_BATCH`` examples unless one group is larger,
    G masks of the largest masked weight <= ``MASK_BYTES``); masks come from ``generator`` as one
    (G, *shape) draw per masked weight (parameter order) per chunk: with every group in one chunk, group k
    of the whole draw has row k."""
    params, buffers = functional_state(model, dtype)
    device = _device(model)
    layer = {n: n.removesuffix("weight").removesuffix(".") for n in masked}
    total_sq, summed = 0.0, torch.zeros(sum(t.numel() for t in params.values()), dtype=torch.float64, device=device)
    largest = max((params[n].numel() * params[n].element_size() for n in masked), default=1)
    per_chunk = max(1, min(MASK_BYTES // largest, GROUP_BATCH // group))
    n = x.shape[0]
    for start in range(0, n, per_chunk * group):
        stop = min(start + per_chunk * group, n)
        count = -(-(stop - start) // group)
        drawn = {layer[m]: dropconnect_masks((count, *params[m].shape), p, generator, params[m].dtype) for m in masked}
        full = (stop - start) // group
        if group > GROUP_BATCH:  # one group per chunk, in forwards of GROUP_BATCH examples sharing its mask
            pieces = [(t, min(t + GROUP_BATCH, stop), slice(0, 1)) for t in range(start, stop, GROUP_BATCH)]
        else:  # the full groups in one forward, a shorter last group in its own (its mask is the last row)
            pieces = [(start, start + full * group, slice(0, full)), (start + full * group, stop, slice(full, count))]
        for t, u, rows in pieces:
            if u <= t:
                continue
            ghost.weight_masks = {k: m[rows] for k, m in drawn.items()}
            ((xb, yb),) = _batches(x[t:u], y[t:u], u - t, device, dtype)
            with ghost:
                loss = summed_loss(functional_call(model, (params, buffers), (xb,)), yb)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            sq = ghost.sq_norms()
            total_sq += float(sq.sum()) if sq is not None else 0.0
            flat = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, params.values(), strict=True)]
            summed += torch.cat([g.reshape(-1).to(torch.float64) for g in flat])
    ghost.weight_masks = {}
    return total_sq, summed


def _group_masks(weights: Params, p: float, group: int, generator: torch.Generator):
    """masks(c): the per-example masks of the next c examples, consecutive groups of ``group`` sharing one."""
    position, current = 0, {}

    def masks(c: int) -> Params:
        nonlocal position, current
        if group == 1:
            position += c
            return {n: dropconnect_masks((c, *w.shape), p, generator, w.dtype) for n, w in weights.items()}
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in weights}
        i, end = position, position + c
        while i < end:
            if i % group == 0 or not current:
                current = {n: dropconnect_masks((1, *w.shape), p, generator, w.dtype) for n, w in weights.items()}
            stop = min(end, (i // group + 1) * group)
            for n, w in weights.items():
                parts[n].append(current[n].expand(stop - i, *w.shape))
            i = stop
        position = end
        return {n: torch.cat(v) for n, v in parts.items()}

    return masks


# --------------------------------------------------------------------------- differential diversity


def differential_diversity(
    model: nn.Module,
    other: nn.Module | Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk_size: int = 16,
    dtype: torch.dtype | None = None,
) -> Diversity:
    """Definition 2: Δ̄(w, w′) = Σ_i‖∇f_i(w) − ∇f_i(w′)‖² / ‖Σ_i (∇f_i(w) − ∇f_i(w′))‖², B̄ = nΔ̄.

    Per-example gradients by torch.func at both points; logistic regression (``linear_softmax``) in
    closed form: ∇f_i is linear in δ_i = ∂f_i/∂z_i, so ‖Δg_i‖² = ‖δ_i(w) − δ_i(w′)‖²(‖a_i‖² + 1).

    Args:
        model: the architecture with parameters w.
        other: a model of the same architecture, or a name -> tensor mapping, holding w′.
        x, y: the sample; chunk_size: examples per torch.func pass (two passes per chunk).
        dtype: compute dtype.

    Returns:
        ``Diversity`` with n, Σ‖Δg_i‖² and ‖Σ Δg_i‖².
    """
    params, buffers = functional_state(model, dtype)
    theirs = dict(other.named_parameters()) if isinstance(other, nn.Module) else dict(other)
    missing = [n for n in params if n not in theirs]
    if missing:
        raise ValueError(f"other has no parameters named {missing[:3]}: it must share model's architecture.")
    other_params = {n: theirs[n].detach().to(params[n].dtype) for n in params}
    closed = linear_softmax(model)
    if closed is not None and (closed.name or x.dim() == 2):
        return _differential_linear_softmax(closed, x, y, params, other_params, buffers, dtype)
    total_sq, summed = 0.0, None
    chunks = zip(
        _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype),
        _flat_grad_chunks(model, x, y, other_params, buffers, chunk_size, dtype),
        strict=True,
    )
    for mine, others in chunks:
        diff = mine - others
        total_sq += float(_dot(diff))
        summed = diff.sum(0) if summed is None else summed + diff.sum(0)
    assert summed is not None, "x has no examples"
    return Diversity(int(x.shape[0]), total_sq, _sq_norm([summed]))


def _differential_linear_softmax(
    found: LinearSoftmax,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Params,
    other_params: Params,
    buffers: Params,
    dtype: torch.dtype | None,
    batch_size: int = 4096,
) -> Diversity:
    """``differential_diversity`` of a logistic regression from δ(w) − δ(w′), one forward per point."""
    total_sq, summed = 0.0, None
    for xb, yb in _batches(x, y, batch_size, _device(found.layer), dtype):
        a, mine = linear_softmax_deltas(found, xb, yb, params, buffers)
        _, theirs = linear_softmax_deltas(found, xb, yb, other_params, buffers)
        sq, grads = linear_softmax_sums(found, a, mine - theirs, params)
        total_sq += float(sq.sum())
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
        summed = flat if summed is None else summed + flat
    assert summed is not None, "x has no examples"
    return Diversity(int(x.shape[0]), total_sq, float(summed @ summed))
