"""Stochastic quantization (QSGD, Alistarh et al.; the paper's Section 3.3) of each worker's gradient.

The class is what raygd knows of the mechanism (config, label, logged params, surrogate
diversity, excluded estimator, RNG state, metrics); the codec and the DDP communication hook
are in ``qsgd.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raygd.mechanisms.base import Mechanism
from raygd.mechanisms.names import EXCLUDED_ESTIMATORS

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist
    from torch import nn

    from raygd.config import MechanismConfig
    from raygd.diversity.exact import Diversity


class Quantize(Mechanism):
    """Quant(s): QSGD quantization of each worker's mean gradient; the decoded gradients are averaged.

    Granularity ``per_worker``. With P > 1, ``attach_ddp`` registers a DDP communication hook
    that all_gathers int8 levels and float32 bucket norms (gloo and NCCL both gather int8), so
    each rank contributes n + 4 ceil(n/d) bytes instead of 4n. With P = 1 there is no DDP and
    ``after_backward`` quantizes the concatenated gradient with the same arithmetic.
    The uniform draws come from this rank's generator, seeded from (seed, rank).

    Metrics: ``comm/bytes_ratio`` = bytes this rank contributed / float32 bytes of the same
    gradients (about 1/4 + 1/d); ``comm/wire_ratio`` = (P/2) * bytes_ratio estimates bytes on the
    wire per rank versus a ring all-reduce (all_gather sends (P-1) payloads, a ring all-reduce
    2(P-1)/P float32 copies), so beyond P = 8 the gather costs more than a plain all-reduce.
    """

    name = "quantize"
    per_rank_generator = True
    granularity = "per_worker"
    implementation = "QSGD int8 levels + float32 bucket norms, all_gather DDP comm hook"
    label_fields = (("quant_levels", "s"),)
    excluded_estimators = EXCLUDED_ESTIMATORS["quantize"]
    estimator = "exact (QSGD variance)"
    bound_of = "plain_gradient"
    """Training quantizes each worker's mean gradient, which has no per-example surrogate: a trial's B_D
    is the plain gradient's (``raygd diversity`` reports the paper's per-example QSGD surrogate). At P > 1
    the in_step estimate reads the hook's quantized mean, less its known rounding variance
    (``reduction_noise_sq``), an unbiased estimate of the plain mean's squared norm."""

    def __init__(self, levels: int, bucket_size: int) -> None:
        super().__init__()
        self.levels, self.bucket_size = levels, bucket_size
        self.process_group: dist.ProcessGroup | None = None
        self.hook_attached = False
        self.bytes_sent, self.bytes_plain = 0, 0
        self.noise_measured, self.rounding_sq = False, 0.0
        """Set around a measured backward: the hook sums its buckets' QSGD rounding variance here."""

    @classmethod
    def from_config(cls, cfg: MechanismConfig) -> Quantize:
        return cls(cfg.quant_levels, cfg.quant_bucket_size)

    def surrogate_diversity(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        generator: torch.Generator,
        dtype: torch.dtype | None = None,
    ) -> Diversity:
        """Per-example QSGD surrogates, exact variance (``raygd.diversity.quantized_diversity``)."""
        from raygd.diversity.exact import quantized_diversity

        return quantized_diversity(model, x, y, self.levels, self.bucket_size, dtype=dtype)

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Register the QSGD all_gather communication hook on ``ddp_model``."""
        from raygd.mechanisms.qsgd import qsgd_comm_hook

        self.process_group = ddp_model.process_group
        ddp_model.register_comm_hook(self, qsgd_comm_hook)
        self.hook_attached = True

    def measure_reduction_noise(self, on: bool) -> None:
        """On: the hook sums its rounding variance from zero; off: it stops (the sum is kept to be read)."""
        self.noise_measured = on
        if on:
            self.rounding_sq = 0.0

    def reduction_noise_sq(self) -> float:
        """P > 1: the rounding variance of this rank's quantized gradient, E‖Q(G_w) − G_w‖² (exact, from
        G_w: ``qsgd_rounding_variance``), over P²: its share of E‖R − Ḡ‖² for R = (1/P) Σ_w Q(G_w), the
        draws independent across ranks. P = 1: 0 (the estimator reads the gradient before it is quantized)."""
        return self.rounding_sq / self.world_size**2 if self.world_size > 1 else 0.0

    def count_bytes(self, sent: int, plain: int) -> None:
        self.bytes_sent += sent
        self.bytes_plain += plain

    def after_backward(self, model: nn.Module, step: int) -> None:
        """P = 1: grad <- Q(concatenated grads). P > 1: nothing (the hook quantized)."""
        from raygd.mechanisms.qsgd import quantize_grads

        if self.world_size > 1:
            if not self.hook_attached:
                raise RuntimeError("quantize with world_size > 1 needs attach_ddp(ddp_model) after DDP wrapping.")
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:
            assert self.generator is not None, "setup() makes the generator"
            self.count_bytes(*quantize_grads(grads, self.levels, self.bucket_size, self.generator))

    def metrics(self) -> dict[str, float]:
        if self.bytes_plain == 0:
            return {}
        ratio = self.bytes_sent / self.bytes_plain
        return {"comm/bytes_ratio": ratio, "comm/wire_ratio": ratio * max(self.world_size, 2) / 2}
