"""Diversity-inducing mechanisms: each per-example gradient g_i is replaced by a random surrogate.

The paper (Yin et al., "Gradient Diversity", Section 3) shows that DropConnect, Langevin
noise (SGLD) and stochastic quantization do not lower the batch-size bound B_D. This module
implements them for the data-parallel loop in ``raygd.train``; every mechanism states its
granularity (whose randomness is independent of whose) in ``granularity`` and in
``log_params()``:

- ``vanilla``: no surrogate; granularity ``none``.
- ``dropconnect``: Bernoulli(1-p) masks on the weights of every ``nn.Linear``, kept weights
  scaled by 1/(1-p). Granularity ``per_example`` (the paper: one mask per example),
  ``per_group`` (one mask per group of examples) or ``per_worker`` (one mask per worker batch).
- ``sgld``: N(0, sigma^2 I) per example. Granularity ``per_example`` *in distribution*: with
  the mean loss the applied update carries (1/B) sum_i xi_i ~ N(0, sigma^2/B I), so it is
  implemented as one such draw added after the all-reduce (identical on every rank).
- ``quantize``: QSGD's unbiased stochastic quantization with s levels and buckets of d entries.
  Granularity ``per_worker``: each worker's mean gradient is quantized, sent as int8 levels plus
  one float32 norm per bucket through a real DDP communication hook, and the P decoded
  gradients are averaged.

Why hand-written: no library provides per-example DropConnect (``torch.nn.functional.dropout``
drops activations, and per-example weight masks need a batched matmul), nor a QSGD hook for
DDP (torch ships fp16/bf16 compression and PowerSGD hooks only).

    mech = build_mechanism(cfg.mechanism)
    model = mech.setup(model, seed=0, rank=rank, world_size=P, global_batch_size=B, device=dev)
    ddp = DistributedDataParallel(model); mech.attach_ddp(ddp)    # when P > 1
    loss.backward(); mech.after_backward(model, step); optimizer.step()
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raygd.config import MechanismConfig

MASK_BUDGET_BYTES = 64 * 2**20
"""Largest block of DropConnect masks alive at once (the rest is redrawn, not stored)."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, "dropconnect", rank); stable across runs and hosts."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(device: torch.device | str, *parts: int | str) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(*parts))


class Mechanism:
    """Vanilla SGD: the base class, a no-op at every hook of the training loop."""

    name: str = "vanilla"
    granularity: str = "none"
    implementation: str = "plain gradients"

    def __init__(self) -> None:
        self.seed, self.rank, self.world_size, self.global_batch_size = 0, 0, 1, 1
        self.device = torch.device("cpu")

    def log_params(self) -> dict[str, str | float | int]:
        """Params that say how the mechanism ran (none duplicate a config key)."""
        return {"mechanism.granularity": self.granularity, "mechanism.implementation": self.implementation}

    def setup(self, model: nn.Module, *, seed: int, rank: int, world_size: int,
              global_batch_size: int, device: torch.device) -> nn.Module:
        """Remember the worker's place and return the (possibly modified) model; call before DDP."""
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch_size, self.device = global_batch_size, torch.device(device)
        return model

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Hook into the DDP wrapper (world size > 1); default: nothing."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Edit ``.grad`` after backward (and DDP's all-reduce), before the optimizer step."""

    def metrics(self) -> dict[str, float]:
        """Extra metrics with slash names; default: none."""
        return {}


class Vanilla(Mechanism):
    """Vanilla mini-batch SGD (granularity ``none``): the gradients are used as computed."""


# --------------------------------------------------------------------------- DropConnect


def dropconnect_masks(shape: Sequence[int], p: float, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
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


def _mask_chunks(weight: torch.Tensor, num_groups: int, p: float, generator: torch.Generator,
                 groups_per_chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
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
    def forward(ctx, x, weight, p, generator, groups_per_chunk):  # noqa: ANN001, ANN205
        ctx.rng_state, ctx.rng_device = generator.get_state(), generator.device
        ctx.p, ctx.groups_per_chunk = p, groups_per_chunk
        ctx.save_for_backward(x, weight)
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
        for start, stop, masks in _mask_chunks(weight, x.shape[0], p, generator, groups_per_chunk):
            torch.bmm(x[start:stop], masks.mul_(weight).transpose(1, 2), out=out[start:stop])
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, p: float = 0.5,
                 group_size: int | None = 1, generator: torch.Generator | None = None,
                 mask_budget_bytes: int = MASK_BUDGET_BYTES, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.p, self.group_size, self.mask_budget_bytes = p, group_size, mask_budget_bytes
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: object) -> DropConnectLinear:
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
        parts = [_GroupMaskedLinear.apply(rows[: g * full].reshape(full, -1, self.in_features),
                                          self.weight, self.p, self.generator, chunk)]
        if g * full < n:  # the shorter last group gets its own mask, drawn after the others
            parts.append(_GroupMaskedLinear.apply(rows[g * full:].reshape(1, -1, self.in_features),
                                                  self.weight, self.p, self.generator, chunk))
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


class DropConnect(Mechanism):
    """DropConnect(p): Bernoulli(1-p) masks on every ``nn.Linear`` weight, one per example/group/worker batch.

    The surrogate of example i is g_i = grad of f_i at (M_i * W) for the masked layers, with
    E[M_i] = 1. Masks come from this rank's generator, seeded from (seed, rank): workers draw
    independent masks and a run is reproducible.
    """

    name = "dropconnect"
    implementation = "masked nn.Linear weights, batched matmul per mask group, masks redrawn in backward"

    def __init__(self, p: float, granularity: str = "per_example", group_size: int = 8) -> None:
        super().__init__()
        self.p, self.granularity, self.group_size = p, granularity, group_size
        self.generator: torch.Generator | None = None

    @property
    def examples_per_mask(self) -> int | None:
        """1 (per example), group_size (per group) or None (the whole worker batch)."""
        return {"per_example": 1, "per_group": self.group_size}.get(self.granularity)

    def log_params(self) -> dict[str, str | float | int]:
        per_mask = self.examples_per_mask
        return {**super().log_params(), "mechanism.examples_per_mask": per_mask or "worker_batch"}

    def setup(self, model: nn.Module, *, seed: int, rank: int, world_size: int,
              global_batch_size: int, device: torch.device) -> nn.Module:
        """Replace every ``nn.Linear`` (recursively, or the model itself) by a ``DropConnectLinear``."""
        super().setup(model, seed=seed, rank=rank, world_size=world_size,
                      global_batch_size=global_batch_size, device=device)
        self.generator = make_generator(device, seed, "dropconnect", rank)
        return self._replace(model)

    def _replace(self, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear) and not isinstance(module, DropConnectLinear):
            return DropConnectLinear.from_linear(module, p=self.p, group_size=self.examples_per_mask,
                                                 generator=self.generator)
        for child_name, child in module.named_children():
            new_child = self._replace(child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module


# --------------------------------------------------------------------------- SGLD


def sgld_noise_like(tensors: Sequence[torch.Tensor], sigma: float, global_batch_size: int,
                    generator: torch.Generator) -> list[torch.Tensor]:
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
    total = sum(t.numel() for t in tensors)
    flat = torch.randn(total, generator=generator, device=generator.device)
    flat.mul_(sigma / math.sqrt(global_batch_size))
    return [part.view_as(t).to(t.device, t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class SGLD(Mechanism):
    """SGLD(sigma): each per-example gradient gets + N(0, sigma^2 I).

    Granularity ``per_example`` in distribution, implemented as one N(0, sigma^2/B I) draw on
    the averaged gradient after DDP's all-reduce. The draw is seeded from (seed, step) only, so
    every rank adds the same noise and the replicas stay equal.
    """

    name = "sgld"
    granularity = "per_example"
    implementation = "one N(0, sigma^2/B I) draw on the averaged gradient, same on every rank"

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.sigma == 0.0:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        generator = make_generator(self.device, self.seed, "sgld", step)
        with torch.no_grad():
            for grad, noise in zip(grads, sgld_noise_like(grads, self.sigma, self.global_batch_size, generator)):
                grad.add_(noise)


# --------------------------------------------------------------------------- QSGD


def _buckets(v: torch.Tensor, bucket_size: int) -> torch.Tensor:
    """v (1-D) zero-padded to a whole number of buckets, shaped (buckets, bucket_size)."""
    n = v.numel()
    num_buckets = max(1, math.ceil(n / bucket_size))
    return F.pad(v.reshape(-1), (0, num_buckets * bucket_size - n)).view(num_buckets, bucket_size)


def qsgd_encode(v: torch.Tensor, levels: int, bucket_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


def qsgd_decode(q: torch.Tensor, norms: torch.Tensor, levels: int, bucket_size: int) -> torch.Tensor:
    """Q(v)_j = ||v_b|| q_j / s for entry j of bucket b; float32 with q's numel."""
    rows = _buckets(q.float(), bucket_size)
    return (rows * (norms.float() / levels).unsqueeze(1)).view(-1)[: q.numel()]


def qsgd_quantize(v: torch.Tensor, levels: int, bucket_size: int, generator: torch.Generator) -> torch.Tensor:
    """decode(encode(v)): unbiased, E Q(v) = v, with E||Q(v_b) - v_b||^2 <= min(d/s^2, sqrt(d)/s) ||v_b||^2."""
    q, norms = qsgd_encode(v, levels, bucket_size, generator)
    return qsgd_decode(q, norms, levels, bucket_size).to(v.dtype)


def _qsgd_comm_hook(state: Quantize, bucket):  # noqa: ANN001, ANN202
    """DDP hook: all_gather this rank's int8 levels + float32 norms, decode all, average.

    ``bucket`` is a ``dist.GradBucket``; the result a ``Future[Tensor]``. They are left
    unannotated because DDP compares annotations with the real classes, and this module's
    postponed annotations are strings.
    """
    buffer = bucket.buffer()
    q, norms = qsgd_encode(buffer, state.levels, state.bucket_size, state.generator)
    payload = torch.cat([norms.view(torch.int8), q])  # norms first: their bytes stay 4-aligned
    state.count_bytes(payload.numel(), buffer.numel() * buffer.element_size())
    gathered = [torch.empty_like(payload) for _ in range(state.world_size)]
    work = dist.all_gather(gathered, payload, group=state.process_group, async_op=True)
    norm_bytes = norms.numel() * 4

    def average(_: torch.futures.Future) -> torch.Tensor:
        total = torch.zeros(buffer.numel(), dtype=torch.float32, device=buffer.device)
        for got in gathered:
            total += qsgd_decode(got[norm_bytes:], got[:norm_bytes].view(torch.float32),
                                 state.levels, state.bucket_size)
        return buffer.copy_(total.div_(state.world_size).view_as(buffer))

    return work.get_future().then(average)


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
    granularity = "per_worker"
    implementation = "QSGD int8 levels + float32 bucket norms, all_gather DDP comm hook"

    def __init__(self, levels: int, bucket_size: int) -> None:
        super().__init__()
        self.levels, self.bucket_size = levels, bucket_size
        self.generator: torch.Generator | None = None
        self.process_group: dist.ProcessGroup | None = None
        self.hook_attached = False
        self.bytes_sent, self.bytes_plain = 0, 0

    def setup(self, model: nn.Module, *, seed: int, rank: int, world_size: int,
              global_batch_size: int, device: torch.device) -> nn.Module:
        super().setup(model, seed=seed, rank=rank, world_size=world_size,
                      global_batch_size=global_batch_size, device=device)
        self.generator = make_generator(device, seed, "quantize", rank)
        return model

    def attach_ddp(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Register the QSGD all_gather communication hook on ``ddp_model``."""
        self.process_group = ddp_model.process_group
        ddp_model.register_comm_hook(self, _qsgd_comm_hook)
        self.hook_attached = True

    def count_bytes(self, sent: int, plain: int) -> None:
        self.bytes_sent += sent
        self.bytes_plain += plain

    def after_backward(self, model: nn.Module, step: int) -> None:
        """P = 1: grad <- Q(concatenated grads). P > 1: nothing (the hook quantized)."""
        if self.world_size > 1:
            if not self.hook_attached:
                raise RuntimeError("quantize with world_size > 1 needs attach_ddp(ddp_model) after DDP wrapping.")
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        q, norms = qsgd_encode(flat, self.levels, self.bucket_size, self.generator)
        self.count_bytes(q.numel() + 4 * norms.numel(), flat.numel() * flat.element_size())
        quantized = qsgd_decode(q, norms, self.levels, self.bucket_size)
        with torch.no_grad():
            for grad, part in zip(grads, quantized.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))

    def metrics(self) -> dict[str, float]:
        if self.bytes_plain == 0:
            return {}
        ratio = self.bytes_sent / self.bytes_plain
        return {"comm/bytes_ratio": ratio, "comm/wire_ratio": ratio * max(self.world_size, 2) / 2}


# --------------------------------------------------------------------------- factory


def build_mechanism(cfg: MechanismConfig) -> Mechanism:
    """The mechanism named by ``cfg.name``, configured from ``cfg``."""
    if cfg.name == "vanilla":
        return Vanilla()
    if cfg.name == "dropconnect":
        return DropConnect(cfg.drop_prob, cfg.dropconnect_granularity, cfg.dropconnect_group_size)
    if cfg.name == "sgld":
        return SGLD(cfg.sgld_sigma)
    if cfg.name == "quantize":
        return Quantize(cfg.quant_levels, cfg.quant_bucket_size)
    raise ValueError(f"mechanism.name = {cfg.name!r} is invalid: allowed values are "
                     "vanilla, dropconnect, sgld, quantize.")
