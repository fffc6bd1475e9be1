"""The ``Mechanism`` base class: everything the rest of raygd asks of a diversity-inducing mechanism.

A mechanism is one class. What it declares as class attributes (name, label fields, excluded
online estimators, the surrogate estimator's description) is read by ``raygd.config`` and the
sweep specs without torch: this module and the mechanism classes import torch only inside the
methods that run training (their kernels live in ``dropconnect_linear.py`` and ``qsgd.py``), so
``import raygd.config`` stays fast. ``Vanilla`` is the base class itself: a no-op at every hook.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from raygd.config import MechanismConfig
    from raygd.diversity.exact import Diversity

PAPER_GRANULARITY = "per_example"
"""The paper's surrogates are per example; a label names any other granularity."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "dropconnect", rank); stable across runs and hosts."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(device: torch.device | str, *parts: int | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    import torch

    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(*parts))


class Mechanism:
    """Vanilla SGD: the base class, a no-op at every hook of the training loop.

    A subclass sets ``name`` (its ``mechanism.name``), builds itself from the config in
    ``from_config``, and overrides the hooks it needs. Class attributes describe it to the parts
    of raygd that never build it: the label's fields, the online estimators it excludes and how
    ``surrogate_diversity`` measures B_D.
    """

    name: ClassVar[str] = "vanilla"
    granularity: str = "none"
    implementation: str = "plain gradients"
    label_fields: ClassVar[tuple[tuple[str, str], ...]] = ()
    """(config field, short name) pairs the display label shows as ``short=value``."""
    granularity_field: ClassVar[str | None] = None
    """The config field holding the granularity; the label names it when not per_example."""
    excluded_estimators: ClassVar[Mapping[str, str]] = {}
    """Online estimator (``train.diversity_estimator``) -> why it cannot run with this mechanism."""
    estimator: ClassVar[str] = "exact (ghost norms)"
    """How ``surrogate_diversity`` computes B_D (the ``raygd diversity`` table's estimator column)."""
    bound_of: ClassVar[str] = "gradient"
    """Whose diversity a trial's B_D (``raygd.bound`` at w0, the online estimate) measures, the
    ``raygd.records.BOUND_OF_TAG``: gradient (no surrogate), surrogate (the gradient as trained) or
    plain_gradient (the mechanism's surrogate is not estimated: the value is the plain gradient's)."""
    per_rank_generator: ClassVar[bool] = False
    """True: ``setup`` gives the mechanism ``self.generator``, seeded by (seed, name, rank), which the base
    ``state_dict()`` checkpoints."""

    def __init__(self) -> None:
        self.seed, self.rank, self.world_size, self.global_batch_size = 0, 0, 1, 1
        self.device: torch.device | str = "cpu"
        self.generator: torch.Generator | None = None

    @classmethod
    def from_config(cls, cfg: MechanismConfig) -> Mechanism:
        """The mechanism configured by ``cfg`` (whose name is ``cls.name``)."""
        return cls()

    @classmethod
    def label(cls, cfg: Mapping[str, Any]) -> str:
        """Display label from a full mechanism config mapping: ``name`` or ``name(short=value, ...)``."""
        parts = [f"{short}={cfg[field]:g}" for field, short in cls.label_fields]
        if cls.granularity_field and cfg[cls.granularity_field] != PAPER_GRANULARITY:
            parts.append(cfg[cls.granularity_field])
        return f"{cls.name}({', '.join(parts)})" if parts else cls.name

    def log_params(self) -> dict[str, str | float | int]:
        """Params that say how the mechanism ran (none duplicate a config key)."""
        return {"mechanism.granularity": self.granularity, "mechanism.implementation": self.implementation}

    def surrogate_diversity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
        dtype: torch.dtype | None = None,
    ) -> Diversity:
        """B_D of ``model`` on (x, y) with the paper's per-example surrogates, whatever granularity
        training uses (``estimator`` says how); vanilla: the exact ``gradient_diversity``."""
        from raygd.diversity.exact import gradient_diversity

        return gradient_diversity(model, x, y, dtype=dtype)

    def surrogate_moments(
        self, expected_sq_norm: float, sq_norm_of_mean: float, *, n: int, num_params: int
    ) -> tuple[float, float]:
        """(E‖g‖², ‖E g‖²) of the surrogate from those of the gradients the training step computed,
        for a mechanism whose surrogate has a closed form in them (SGLD); default: unchanged."""
        return expected_sq_norm, sq_norm_of_mean

    def setup(
        self, model: nn.Module, *, seed: int, rank: int, world_size: int, global_batch_size: int, device: torch.device
    ) -> nn.Module:
        """Remember the worker's place (and make the per-rank generator) and return the (possibly modified)
        model; call before DDP."""
        import torch

        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch_size, self.device = global_batch_size, torch.device(device)
        if self.per_rank_generator:
            self.generator = make_generator(device, seed, self.name, rank)
        return model

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Hook into the DDP wrapper (world size > 1); default: nothing."""

    def measure_reduction_noise(self, on: bool) -> None:
        """Around a backward whose reduced gradient the online estimator reads (``in_step`` at P > 1):
        whether the communication hook should account the noise it adds (``reduction_noise_sq``)."""

    def reduction_noise_sq(self) -> float:
        """E‖R − R₀‖² that this rank's share of the last measured backward's communication added, given
        its local gradient: R the reduced mean gradient the hook produced, R₀ the exact mean. Summed over
        ranks and subtracted from ‖R‖², it leaves an unbiased estimate of ‖R₀‖². Default: 0 (exact)."""
        return 0.0

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Edit ``.grad`` after backward (and DDP's all-reduce), before the optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Extra metrics with slash names; default: none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The random state a restarted worker needs to draw what this one would have drawn next:
        ``{"generator": state}`` for a mechanism with a per-rank ``generator``, else empty."""
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` into a mechanism set up with the same config, seed and rank."""
        if "generator" in state:
            if self.generator is None:
                raise ValueError(f"{self.name}: load_state_dict needs setup() first (no generator yet).")
            self.generator.set_state(state["generator"])


class Vanilla(Mechanism):
    """Vanilla mini-batch SGD (granularity ``none``): the gradients are used as computed."""
