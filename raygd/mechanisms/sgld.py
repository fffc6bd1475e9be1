"""SGLD (Welling and Teh; the paper's Section 3.2): Gaussian noise on every per-example gradient.

With the mean loss the applied update carries (1/B) Σ_i ξ_i ~ N(0, σ²/B I), so the mechanism
draws that once on the averaged gradient: the per-example law without per-example work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from raygd.mechanisms.base import Mechanism, make_generator

if TYPE_CHECKING:
    import torch
    from torch import nn

    from raygd.config import MechanismConfig
    from raygd.diversity.exact import Diversity


def sgld_noise_like(
    tensors: Sequence[torch.Tensor], sigma: float, global_batch_size: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Langevin noise for the mean gradient: xi ~ N(0, sigma^2 / B * I), one tensor per input.

    (1/B) sum_{i<=B} xi_i with xi_i ~ N(0, sigma^2 I) has exactly this law.

    Args:
        tensors: shapes/dtypes/devices to match (e.g. the gradients, in parameter order).
        sigma: per-example noise standard deviation.
        global_batch_size: B, the examples averaged in one update.
        generator: source of randomness (one flat draw, split in order).

    Returns:
        A list of noise tensors shaped like ``tensors``.
    """
    import torch

    total = sum(t.numel() for t in tensors)
    flat = torch.randn(total, generator=generator, device=generator.device)
    flat.mul_(sigma / math.sqrt(global_batch_size))
    return [
        part.view_as(t).to(t.device, t.dtype)
        for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


class SGLD(Mechanism):
    """SGLD(sigma): each per-example gradient gets + N(0, sigma^2 I).

    Granularity ``per_example`` in distribution, implemented as one N(0, sigma^2/B I) draw on
    the averaged gradient after DDP's all-reduce. The draw is seeded from (seed, step) only, so
    every rank adds the same noise and the replicas stay equal (no generator state to checkpoint).
    """

    name = "sgld"
    granularity = "per_example"
    implementation = "one N(0, sigma^2/B I) draw on the averaged gradient, same on every rank"
    label_fields = (("sgld_sigma", "sigma"),)
    estimator = "exact (closed form)"
    bound_of = "surrogate"

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    @classmethod
    def from_config(cls, cfg: MechanismConfig) -> SGLD:
        return cls(cfg.sgld_sigma)

    def surrogate_diversity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
        dtype: torch.dtype | None = None,
    ) -> Diversity:
        """Closed form from the exact B_D at w (``raygd.diversity.sgld_diversity``), d = all parameters."""
        from raygd.diversity.exact import gradient_diversity, sgld_diversity

        base = gradient_diversity(model, x, y, dtype=dtype)
        return sgld_diversity(base, self.sigma, sum(p.numel() for p in model.parameters()))

    def surrogate_moments(
        self, expected_sq_norm: float, sq_norm_of_mean: float, *, n: int, num_params: int
    ) -> tuple[float, float]:
        """E‖g_i + ξ_i‖² = E‖g‖² + dσ² and ‖E(g + ξ)‖²'s counterpart in B_D^SGLD = n(Σ‖g_i‖² + ndσ²) /
        (‖Σg_i‖² + ndσ²), ``raygd.diversity.sgld_diversity``: ‖μ‖² + dσ²/n (d = ``num_params``)."""
        noise = num_params * self.sigma**2
        return expected_sq_norm + noise, sq_norm_of_mean + noise / n

    def after_backward(self, model: nn.Module, step: int) -> None:
        import torch

        if self.sigma == 0.0:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        generator = make_generator(self.device, self.seed, "sgld", step)
        with torch.no_grad():
            for grad, noise in zip(
                grads, sgld_noise_like(grads, self.sigma, self.global_batch_size, generator), strict=True
            ):
                grad.add_(noise)
