"""QSGD's torch kernels: stochastic quantization of a gradient and the DDP communication hook.

Hand-written because torch ships fp16/bf16 compression and PowerSGD hooks only: here each rank
sends its mean gradient as int8 levels plus one float32 norm per bucket through ``all_gather``,
and every rank decodes and averages the P gradients (``raygd.mechanisms.Quantize``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F


class HookState(Protocol):
    """What ``qsgd_comm_hook`` reads and updates on its state (``raygd.mechanisms.Quantize`` is one): a protocol,
    so that this kernel module does not import the mechanism that registers it."""

    generator: torch.Generator | None
    noise_measured: bool
    rounding_sq: float
    levels: int
    bucket_size: int
    world_size: int
    process_group: Any

    def count_bytes(self, sent: int, dense: int) -> None: ...


def _buckets(v: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """v (1-D) zero-padded to a whole number of buckets, shaped (buckets, bucket_size)."""
    n = v.numel()
    num_buckets = max(1, math.ceil(n / bucket_size))
    return F.pad(v.reshape(-1), (0, num_buckets * bucket_size - n)).view(num_buckets, bucket_size)


def qsgd_encode(
    v: torch.Tensor, levels: int, bucket_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """QSGD stochastic quantization of v in buckets b of ``bucket_size`` entries (last may be shorter).

    r_j = |v_j| s / ||v_b||, l = floor(r_j); level_j = l + 1 with probability r_j - l, else l;
    q_j = sign(v_j) level_j in [-s, s]. A zero-norm bucket encodes to zeros.

    Args:
        v: 1-D float tensor (computed in float32).
        levels: s in 1..127.
        bucket_size: d >= 1.
        generator: source of the uniform draws (on v's device).

    Returns:
        (q, norms): int8 levels with v's numel, float32 norms with one entry per bucket.
    """
    rows = _buckets(v.float(), bucket_size)
    norms = torch.linalg.vector_norm(rows, dim=1)
    scaled = rows.abs() * (levels / norms.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(1)
    lower = scaled.floor()
    uniform = torch.rand(rows.shape, generator=generator, device=rows.device)
    level = (lower + (uniform < scaled - lower).float()).clamp_(max=levels)
    q = (rows.sign() * level).to(torch.int8).view(-1)[: v.numel()]
    return q, norms


def qsgd_rounding_variance(v: torch.Tensor, levels: int, bucket_size: int) -> float:
    """E‖Q(v) − v‖² of ``qsgd_quantize``, exactly, given v: each entry rounds r_j = |v_j| s / ‖v_b‖ up with
    probability f_j = r_j − ⌊r_j⌋, so its variance is (‖v_b‖/s)² f_j (1 − f_j); summed in float64."""
    rows = _buckets(v.double(), bucket_size)
    unit = (torch.linalg.vector_norm(rows, dim=1) / levels).unsqueeze(1)  # one level's step per bucket
    scaled = torch.where(unit > 0, rows.abs() / unit.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    frac = scaled - scaled.floor()
    return float((frac * (1 - frac) * unit**2).sum())


def qsgd_decode(q: torch.Tensor, norms: torch.Tensor, levels: int, bucket_size: int) -> torch.Tensor:
    """Q(v)_j = ||v_b|| q_j / s for entry j of bucket b; float32 with q's numel."""
    rows = _buckets(q.float(), bucket_size)
    return (rows * (norms.float() / levels).unsqueeze(1)).view(-1)[: q.numel()]


def qsgd_quantize(v: torch.Tensor, levels: int, bucket_size: int, generator: torch.Generator) -> torch.Tensor:
    """decode(encode(v)): unbiased, E Q(v) = v, with E||Q(v_b) - v_b||^2 <= min(d/s^2, sqrt(d)/s) ||v_b||^2."""
    q, norms = qsgd_encode(v, levels, bucket_size, generator)
    return qsgd_decode(q, norms, levels, bucket_size).to(v.dtype)


def qsgd_comm_hook(state: HookState, bucket):
    """DDP hook: all_gather this rank's int8 levels + float32 norms, decode all, average.

    ``bucket`` is a ``dist.GradBucket``; the result a ``Future[Tensor]``. They are left
    unannotated because DDP compares annotations with the real classes, and this module's
    postponed annotations are strings.
    """
    buffer = bucket.buffer()
    assert state.generator is not None, "setup() makes the generator"
    if state.noise_measured:  # the online estimator reads this update's reduced gradient (in_step)
        state.rounding_sq += qsgd_rounding_variance(buffer, state.levels, state.bucket_size)
    q, norms = qsgd_encode(buffer, state.levels, state.bucket_size, state.generator)
    payload = torch.cat([norms.view(torch.int8), q])  # norms first: their bytes stay 4-aligned
    state.count_bytes(payload.numel(), buffer.numel() * buffer.element_size())
    gathered = [torch.empty_like(payload) for _ in range(state.world_size)]
    work = dist.all_gather(gathered, payload, group=state.process_group, async_op=True)
    norm_bytes = norms.numel() * 4

    def average(_: torch.futures.Future) -> torch.Tensor:
        total = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        for got in gathered:
            total += qsgd_decode(
                got[norm_bytes:], got[:norm_bytes].view(torch.float32), state.levels, state.bucket_size
            )
        return buffer.copy_(total.div_(state.world_size).view_as(buffer))

    return work.get_future().then(average)


def quantize_grads(
    grads: list[torch.Tensor], levels: int, bucket_size: int, generator: torch.Generator
) -> tuple[int, int]:
    """grads <- Q(concatenated grads) in place (one worker, no DDP hook); returns (bytes that Q's
    int8 levels and float32 norms take, float bytes of the gradients)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    q, norms = qsgd_encode(flat, levels, bucket_size, generator)
    quantized = qsgd_decode(q, norms, levels, bucket_size)
    with torch.no_grad():
        for grad, part in zip(grads, quantized.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))
    return q.numel() + 4 * norms.numel(), flat.numel() * flat.element_size()
