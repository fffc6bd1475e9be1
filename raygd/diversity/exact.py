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

from raygd.diversity.per_example import (
    Params,
    _batches,
    _device,
    _dot,
    _flat_grad_chunks,
    _sq_norm,
    functional_state,
    per_example_sq_norms,
)
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
    params, buffers = functional_state(model, dtype)
    total_sq, summed = 0.0, None
    for xb, yb in _batches(x, y, batch_size, _device(model), dtype):
        sq, grads = per_example_sq_norms(model, xb, yb, params=params, buffers=buffers, method=method)
        total_sq += float(sq.sum())
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads, strict=True)]
    assert summed is not None, "x has no examples"
    return Diversity(int(x.shape[0]), total_sq, _sq_norm(summed))


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
    generator: torch.Generator | None = None,
    chunk_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Diversity:
    """B_D^DC for per-example DropConnect surrogates, by Monte Carlo over the masks.

    g_i^DC = M_i ∘ ∇f_i(M_i ∘ W) with independent masks M_i = Bernoulli(1−p)/(1−p) on the
    weight of every nn.Linear (biases unmasked), as ``raygd.mechanisms.DropConnect``.
    No closed form exists for cross entropy (the loss derivative depends on M_i through
    the logits, even for logistic regression), and E g_i^DC ≠ g_i in general. Each draw k
    gives every example its own mask; the estimate is the ratio of the two unbiased means
    (1/K)Σ_k Σ_i‖g_ik‖² → Σ_i E‖g_i^DC‖² and (1/K)Σ_k ‖Σ_i g_ik‖² → E‖Σ_i g_i^DC‖²,
    consistent as K grows. Cost: K torch.func passes over the data.
    """
    params, buffers = functional_state(model, dtype)
    linear = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    masked = [n for n in params if n in linear]
    if generator is None:
        generator = torch.Generator(device=_device(model)).manual_seed(0)

    def masks(c: int) -> Params:
        return {n: dropconnect_masks((c, *params[n].shape), p, generator, params[n].dtype) for n in masked}

    total_sq = total_grad_sq = 0.0
    for _ in range(num_draws):
        summed = None
        for g in _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype, masks):
            total_sq += float(_dot(g))
            summed = g.sum(0) if summed is None else summed + g.sum(0)
        assert summed is not None, "x has no examples"
        total_grad_sq += _sq_norm([summed])
    return Diversity(int(x.shape[0]), total_sq / num_draws, total_grad_sq / num_draws)


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
