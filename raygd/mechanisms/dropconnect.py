"""DropConnect (Wan et al.; the paper's Section 3.1): Bernoulli masks on the fully connected weights.

The class is what raygd knows of the mechanism (config, label, logged params, surrogate
diversity, excluded estimator, RNG state); the masked layer it installs is in
``dropconnect_linear.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raygd.mechanisms.base import Mechanism
from raygd.mechanisms.names import EXCLUDED_ESTIMATORS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from raygd.config import MechanismConfig
    from raygd.diversity.exact import Diversity


class DropConnect(Mechanism):
    """DropConnect(p): Bernoulli(1-p) masks on every ``nn.Linear`` weight (or those ``mechanism.dropconnect_layers``
    names), one per example/group/worker batch; on a sequence model one mask serves all positions of an example.

    The surrogate of example i is g_i = grad of f_i at (M_i * W) for the masked layers, with
    E[M_i] = 1. Masks come from this rank's generator, seeded from (seed, rank): workers draw
    independent masks and a run is reproducible.
    """

    name = "dropconnect"
    per_rank_generator = True
    implementation = "masked nn.Linear weights, batched matmul per mask group, masks redrawn in backward"
    label_fields = (("drop_prob", "p"),)
    granularity_field = "dropconnect_granularity"
    excluded_estimators = EXCLUDED_ESTIMATORS["dropconnect"]
    estimator = "Monte Carlo (8 mask draws)"
    bound_of = "surrogate"

    def __init__(
        self, p: float, granularity: str = "per_example", group_size: int = 8, layers: list[str] | None = None
    ) -> None:
        super().__init__()
        self.p, self.granularity, self.group_size, self.layers = p, granularity, group_size, layers

    @classmethod
    def from_config(cls, cfg: MechanismConfig) -> DropConnect:
        return cls(cfg.drop_prob, cfg.dropconnect_granularity, cfg.dropconnect_group_size, cfg.dropconnect_layers)

    @property
    def examples_per_mask(self) -> int | None:
        """1 (per example), group_size (per group) or None (the whole worker batch)."""
        return {"per_example": 1, "per_group": self.group_size}.get(self.granularity)

    def log_params(self) -> dict[str, str | float | int]:
        per_mask = self.examples_per_mask
        return {**super().log_params(), "mechanism.examples_per_mask": per_mask or "worker_batch"}

    def surrogate_diversity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
        dtype: torch.dtype | None = None,
    ) -> Diversity:
        """Per-example masks, Monte Carlo over 8 draws (``raygd.diversity.dropconnect_diversity``)."""
        from raygd.diversity.exact import dropconnect_diversity

        return dropconnect_diversity(model, x, y, self.p, generator=generator, dtype=dtype, layers=self.layers)

    def setup(
        self, model: nn.Module, *, seed: int, rank: int, world_size: int, global_batch_size: int, device: torch.device
    ) -> nn.Module:
        """Replace every ``nn.Linear`` (recursively, or the model itself; only those matching
        ``mechanism.dropconnect_layers`` when set) by a ``DropConnectLinear``."""
        from raygd.mechanisms.dropconnect_linear import replace_linears

        super().setup(
            model, seed=seed, rank=rank, world_size=world_size, global_batch_size=global_batch_size, device=device
        )
        assert self.generator is not None
        return replace_linears(model, self.p, self.examples_per_mask, self.generator, self.layers)
