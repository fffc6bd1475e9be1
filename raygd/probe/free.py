"""The free estimator at P > 1: each bucket's local and all-reduced gradient, read inside DDP's comm hook.

DDP hands a communication hook every bucket of the local gradient before its collective (not divided by
P) and takes back the reduced one, so a hook sees both norms of McCandlish et al.'s two-batch estimator
(``raygd.diversity.two_batch_moments``): ‖G_b‖² of this worker's b = B/P examples and ‖G_B‖² of all B,
with no extra backward and no extra pass over the gradient. On a measured update the hook adds, per
bucket, one norm before and one after the collective, and after the last bucket one all-reduce of three
float64 numbers (Σ_ranks ‖G_b‖², the examples counted, the noise a compressing hook reports), started
asynchronously behind the gradient's own collective and read when the metrics are asked for.

DDP takes one hook and has no way to remove it (``register_comm_hook`` raises the second time), so
``HookSlot`` registers one hook for good and composes: it runs the user's hook if one was passed
(``raygd.attach(..., comm_hook=(state, hook))``) or registered after attach (the slot takes over
``ddp.register_comm_hook``, as ``raygd.network`` does), else DDP's own all-reduce arithmetic (each
rank's gradient / P, then a SUM; torch's ``default_hooks.allreduce_hook``). ``detach`` unplugs the
reader; the slot stays a pass-through to that inner hook, which a later ``attach`` reuses.

Whose gradient: the reduced bucket is what the inner hook returns, so under a compressing hook the bound
is that of the gradient the optimizer receives, except where the hook's state is a raygd ``Mechanism``
that reports its noise (QSGD: ``measure_reduction_noise`` / ``reduction_noise_sq``, its exact rounding
variance), which is subtracted: the bound is then the plain gradient's, as ``raygd.loop`` measures it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from raygd.diversity.online import two_batch_moments
from raygd.mechanisms.base import Mechanism
from raygd.probe.smoothing import SmoothedBound

CommHook = Callable[[Any, Any], torch.futures.Future]
"""DDP's hook(state, bucket) -> Future[Tensor] (unannotated: DDP compares annotations with its classes)."""

_SLOTS: weakref.WeakKeyDictionary[DistributedDataParallel, HookSlot] = weakref.WeakKeyDictionary()

HOW_TO_COMPOSE = (
    "call raygd.attach(model, ...) first and register your hook after it (attach composes it), or pass "
    "raygd.attach(model, comm_hook=(state, hook)) and do not register it yourself"
)


class CommHookConflict(RuntimeError):
    """A communication hook the probe cannot compose with (DDP takes one and cannot replace it)."""


def raygd_probe_hook(state, bucket):
    """The hook DDP runs for every bucket: the slot's reader around its inner hook (``state``: the slot)."""
    reader = state.reader
    if reader is None:
        return state.hook(state.state, bucket)
    return reader.on_bucket(state, bucket)


class HookSlot:
    """The one comm hook raygd registers on a DDP module, and the hook it composes with."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        self.ddp = ddp
        self.state: Any = ddp.process_group
        self.hook: CommHook = allreduce_hook
        self.composed: str | None = None
        """The name of the user's hook inside the slot (None: DDP's own all-reduce)."""
        self.reader: FreeEstimator | None = None
        ddp.register_comm_hook(self, raygd_probe_hook)
        # From now on a hook registered on the module is composed inside this one, not refused by C++.
        ddp.register_comm_hook = self.compose  # type: ignore[method-assign]
        ddp._register_builtin_comm_hook = partial(_refuse_builtin, self)  # type: ignore[method-assign]

    @classmethod
    def of(cls, ddp: DistributedDataParallel) -> HookSlot:
        """The module's slot, registered on first use; refuses a module whose hook someone else registered."""
        slot = _SLOTS.get(ddp)
        if slot is not None:
            return slot
        existing = ddp._get_ddp_logging_data().get("comm_hook")
        if existing:
            raise CommHookConflict(
                f"raygd.attach: this DistributedDataParallel module already has a communication hook "
                f"({existing}), registered before attach. DDP takes one hook and cannot remove or replace it, so "
                f"the probe cannot read the gradients around it. Register it through the probe instead: "
                f"{HOW_TO_COMPOSE}."
            )
        slot = _SLOTS[ddp] = cls(ddp)
        return slot

    def compose(self, state: object, hook: CommHook) -> None:
        """Run ``hook(state, bucket)`` inside the probe's hook (what ``ddp.register_comm_hook`` does after attach)."""
        name = getattr(hook, "__qualname__", repr(hook))
        if self.composed is not None and (state, hook) == (self.state, self.hook):
            return  # the same hook again (a second attach after detach)
        if self.composed is not None:
            raise CommHookConflict(
                f"DDP takes one communication hook: {self.composed} already runs inside raygd's probe hook, so "
                f"{name} cannot be added. Combine the two into one hook and pass that."
            )
        if not callable(hook):
            raise TypeError(f"comm_hook = {hook!r}: a hook is a callable hook(state, bucket) -> Future[Tensor].")
        self.state, self.hook, self.composed = state, hook, name
        if self.ddp.logger is not None:  # what DDP's logging data names
            self.ddp.logger._set_comm_hook_name(f"raygd_probe_hook({name})")

    def noise_source(self) -> Mechanism | None:
        """The inner hook's state when it is a raygd mechanism that reports the noise its communication adds."""
        return self.state if isinstance(self.state, Mechanism) else None


def _refuse_builtin(slot: HookSlot, comm_hook_type: object) -> None:
    raise CommHookConflict(
        f"DDP takes one communication hook and raygd's probe holds it, so the built-in {comm_hook_type} cannot be "
        "registered. Register its Python form instead (torch.distributed.algorithms.ddp_comm_hooks.default_hooks, "
        "e.g. fp16_compress_hook), which the probe composes."
    )


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² as a float64 scalar tensor (no host sync; float32 accumulation below float64)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(t, dtype=acc).to(torch.float64).square()


@dataclass
class Measurement:
    """One measured update: per-bucket norms, then the scalars all-reduced after its last bucket."""

    local: list[torch.Tensor] = field(default_factory=list)
    reduced: list[torch.Tensor] = field(default_factory=list)
    scalars: torch.Tensor | None = None
    work: Any = None
    global_batch_size: int | None = None


def _read_reduced(out: list[torch.Tensor], fut: torch.futures.Future) -> Any:
    value = fut.value()
    out.append(_sq_norm(value[0] if isinstance(value, list) else value))
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)


class FreeEstimator:
    """Reads one update in ``every`` from the slot's hook; ``fold`` turns the measured ones into moments."""

    kind = "free"

    def __init__(
        self,
        ddp: DistributedDataParallel,
        slot: HookSlot,
        every: int,
        global_batch_size: int | None,
        population: int | None,
        smoothing: SmoothedBound,
    ) -> None:
        self.world_size = dist.get_world_size(ddp.process_group)
        self.every, self.global_batch_size, self.population = every, global_batch_size, population
        self.smoothing, self.slot = smoothing, slot
        self.updates = 0
        """Synchronised backward passes seen (DDP runs the hook only in those: not under ``no_sync``)."""
        self.examples = 0
        """This rank's examples in the forwards since the last update (with gradient accumulation, several)."""
        self.last_batch: int | None = None
        self.problem: str | None = None
        self._current: Measurement | None = None
        self._pending: list[Measurement] = []
        self._handles = [] if global_batch_size else [ddp.register_forward_pre_hook(self._count, with_kwargs=True)]
        slot.reader = self

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = _first_tensor(args, kwargs) if torch.is_grad_enabled() else None
        if first is not None:
            self.examples += int(first.shape[0])

    def on_bucket(self, slot: HookSlot, bucket: Any) -> torch.futures.Future:
        """The slot's hook on a bucket: its inner hook, with the norms read around it on a measured update."""
        if bucket.index() == 0:  # DDP runs buckets in index order: an update begins
            due = self.every > 0 and self.updates % self.every == 0
            self._current = Measurement() if due else None
            noise = slot.noise_source()
            if due and noise is not None:
                noise.measure_reduction_noise(True)
        m = self._current
        if m is None:
            fut = slot.hook(slot.state, bucket)
        else:
            m.local.append(_sq_norm(bucket.buffer()))  # before the inner hook, which may scale it in place
            fut = slot.hook(slot.state, bucket).then(partial(_read_reduced, m.reduced))
        if bucket.is_last():
            if m is not None:
                self._close(m, slot, bucket.buffer())
            self.updates += 1
            self.examples, self._current = 0, None
        return fut

    def _close(self, m: Measurement, slot: HookSlot, buffer: torch.Tensor) -> None:
        noise = slot.noise_source()
        noise_sq = 0.0
        if noise is not None:
            noise_sq = noise.reduction_noise_sq()
            noise.measure_reduction_noise(False)
        extra = torch.tensor([float(self.examples), noise_sq], dtype=torch.float64, device=buffer.device)
        m.scalars = torch.cat([torch.stack(m.local).sum().view(1), extra])
        m.work = dist.all_reduce(m.scalars, group=slot.ddp.process_group, async_op=True)
        m.global_batch_size = self.global_batch_size
        self._pending.append(m)

    def fold(self) -> None:
        """Fold the measured updates since the last call into the smoothed bound (waits on their scalars)."""
        pending, self._pending = self._pending, []
        P = self.world_size
        for m in pending:
            assert m.scalars is not None and m.work is not None, "closed after its last bucket"
            m.work.wait()
            local, examples, noise = m.scalars.tolist()
            B = m.global_batch_size or round(examples)
            if B < 2 * P or B % P:
                self.problem = (
                    f"the global batch was {B} examples over {P} workers (forward passes counted on dim 0 of the "
                    "first tensor input): pass raygd.attach(..., global_batch_size=B) with equal batches per worker"
                )
                continue
            big = sum(float(r) for r in m.reduced) - noise
            self.smoothing.update(two_batch_moments(local / P, B // P, big, B, self.population))
            self.last_batch = B

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.slot.reader is self:
            self.slot.reader = None
        noise = self.slot.noise_source()
        if noise is not None and self._current is not None:
            noise.measure_reduction_noise(False)
