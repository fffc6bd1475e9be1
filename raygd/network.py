"""An emulated network: each rank waits out the modelled transfer, then DDP's collective runs for real.

On one machine communication is almost free, so the communication-bound regime of a cluster (the
paper's EC2 runs) never shows. ``install_network(ddp, network_cfg, world_size)`` puts a DDP
communication hook in front of whatever hook the mechanism registers (QSGD's int8 all_gather) or of
DDP's own all-reduce: the rank sleeps, then the real collective runs unchanged (so the weights are
bitwise those of a run without the hook, and the collective lines the ranks up after the sleep); the sleep is

    wait = t_comm(bucket) − overlap · min(t_comm(bucket), t_compute so far)

where t_comm comes from ``raygd.costmodel.comm_time`` for the bucket's payload on the configured
link and topology (QSGD's payload is its int8 levels plus norms, so it waits less), and t_compute
so far is the time since this step's forward began. Buckets share one link: a bucket's transfer
starts when the previous one's ends. The hook changes time only; runs that use it are tagged
``raygd.network = emulated`` (``NETWORK_TAG``) and carry ``train.network.*`` params.

A *shaped* link is real: two Ray nodes on one machine joined by a veth pair that ``tc tbf`` limits
(``tests/netlink.py``), so DDP's gloo all-reduce crosses it over TCP and no hook is installed. The process
that opens a run (the driver of ``raygd train``, a Tune trial on a node in a sweep) learns of it from
``$RAYGD_SHAPED_LINK`` (the rate in Mbit/s, set on the driver and every node by whoever shaped the link) and tags
its runs ``raygd.network = shaped`` and ``raygd.network_rate_mbit`` (``network_tags``): their times were
measured over a link of that rate on one machine, never on a cluster, and ``raygd project`` takes the
modelled transfer over that link (``raygd.costmodel.shaped_link``) out of their step times as it takes
the emulated wait out of emulated runs.

Order: DDP takes one comm hook and cannot swap it, so ``install_network`` runs after DDP wrapping and
*before* ``mechanism.attach_ddp``: it wraps ``ddp.register_comm_hook`` so that the mechanism's hook
is registered inside the emulation, and if none is registered by the first forward it registers
DDP's own all-reduce arithmetic (each rank's gradient / P, then SUM) inside it.
Collectives outside DDP's hook (evaluation, the free diversity estimator's extra all-reduce) are
not delayed.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from raygd import costmodel

if TYPE_CHECKING:
    from raygd.config import NetworkConfig

NETWORK_TAG = "raygd.network"
"""Tag of runs whose communication time is emulated: ``EMULATED``."""
EMULATED = "emulated"
SHAPED = "shaped"
"""``NETWORK_TAG`` of runs whose collectives crossed a real link shaped by ``tc tbf`` on one machine."""
SHAPED_ENV = "RAYGD_SHAPED_LINK"
"""The driver's environment variable naming a shaped link's rate in Mbit/s (``tests/netlink.py`` sets it)."""
RATE_TAG = "raygd.network_rate_mbit"
"""Tag: the shaped link's ``tbf`` rate in Mbit/s."""
SPIN_S = 1e-3
"""The last part of a wait is spun, not slept (see ``_sleep_until``)."""


@dataclass
class EmulatedLink:
    """The link every bucket of one rank shares, and what it has waited so far."""

    link: costmodel.Link
    topology: str
    overlap: float
    world_size: int
    step_started: float = 0.0
    free_at: float = 0.0
    waited_s: float = 0.0
    """Seconds slept in total (the time this emulation added)."""
    modelled_s: float = 0.0
    """Modelled transfer seconds in total (before overlap)."""
    exposed_s: float = 0.0
    """Modelled seconds not hidden by overlap: what the waits add up to, plus the sleeps' overshoot."""
    collectives: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transfer_s(self, payload: int, collective: str) -> float:
        """t_comm of one bucket of ``payload`` bytes per rank."""
        return costmodel.comm_time(payload, self.world_size, self.link, self.topology, collective)

    def wait(self, payload: int, collective: str) -> float:
        """Sleep out one bucket's exposed transfer time, after the link's previous transfer; returns the wait.

        Every rank sleeps the same modelled time before the real collective, which then lines the ranks up
        again, so a late wake-up on one rank is not carried into the next step.
        """
        t_comm = self.transfer_s(payload, collective)
        with self.lock:
            now = time.perf_counter()
            exposed = costmodel.exposed_comm(t_comm, max(0.0, now - self.step_started), self.overlap)
            self.free_at = max(now, self.free_at) + exposed
            self.modelled_s += t_comm
            self.exposed_s += exposed
            self.collectives += 1
            until = self.free_at
        _sleep_until(until)
        waited = time.perf_counter() - now
        with self.lock:
            self.waited_s += waited
        return waited


def _sleep_until(deadline: float) -> None:
    """Sleep to ~1 ms before the deadline, then spin: a short sleep on a busy machine wakes up late by a
    scheduler slice (measured here: 2.7 ms late on a 0.7 ms sleep at load 6 on 2 cores, 0.2 ms on 6 ms)."""
    remaining = deadline - time.perf_counter()
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while time.perf_counter() < deadline:
        pass


def _allreduce_hook(process_group, bucket):
    """DDP's own arithmetic (each rank's gradient / P, then a SUM all-reduce), as a hook."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(process_group))
    work = dist.all_reduce(buffer, group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _payload(hook, state: Any, numel: int, element_size: int) -> tuple[int, str]:
    """(bytes this rank contributes, collective) for a bucket of ``numel`` gradients under ``hook``."""
    from raygd.mechanisms.qsgd import qsgd_comm_hook

    if hook is qsgd_comm_hook:
        return costmodel.payload_bytes(numel, "quantize", state.bucket_size), "all_gather"
    return numel * element_size, "all_reduce"


def _emulated(emulation: EmulatedLink, inner_state: Any, inner_hook):
    """The hook that waits out the modelled transfer, then runs ``inner_hook`` (the real collective)."""

    def hook(state, bucket):
        buffer = bucket.buffer()
        payload, collective = _payload(inner_hook, inner_state, buffer.numel(), buffer.element_size())
        emulation.wait(payload, collective)
        return inner_hook(inner_state, bucket)

    return hook


def install_network(ddp: torch.nn.parallel.DistributedDataParallel, network_cfg: NetworkConfig | None, world_size: int):
    """Emulate ``network_cfg``'s link on ``ddp``'s gradient collectives; returns the ``EmulatedLink`` (or None).

    Call before ``mechanism.attach_ddp(ddp)``: a hook the mechanism registers later is wrapped; if none is
    registered by the first forward, DDP's all-reduce is. A hook registered before this call cannot be
    wrapped (DDP accepts one) and raises. Nothing happens when ``network_cfg`` is None or world_size is 1.
    """
    if network_cfg is None or world_size < 2:
        return None
    if ddp._comm_hooks:
        raise RuntimeError("install_network must run before mechanism.attach_ddp: DDP takes one comm hook.")
    emulation = EmulatedLink(
        costmodel.Link.from_gbps_us(network_cfg.bandwidth_gbps, network_cfg.latency_us),
        network_cfg.topology,
        network_cfg.overlap,
        world_size,
    )
    register = ddp.register_comm_hook

    def register_wrapped(state: object, hook) -> None:
        register(None, _emulated(emulation, state, hook))

    ddp.register_comm_hook = register_wrapped  # type: ignore[method-assign]

    def step_start(module, args) -> None:
        if not ddp._comm_hooks:  # no mechanism hook: emulate DDP's own all-reduce
            register(None, _emulated(emulation, ddp.process_group, _allreduce_hook))
        emulation.step_started = time.perf_counter()
        emulation.free_at = 0.0

    ddp.register_forward_pre_hook(step_start)
    ddp.emulated_link = emulation  # type: ignore[attr-defined]
    return emulation


def shaped_rate_mbit(environ: Mapping[str, str] | None = None) -> float | None:
    """The rate in Mbit/s of the shaped link this process's runs cross (``$RAYGD_SHAPED_LINK``), or None.

    Raises:
        raygd.config.ConfigError: the variable is set but not a finite number > 0.
    """
    value = (os.environ if environ is None else environ).get(SHAPED_ENV, "").strip()
    if not value:
        return None
    try:
        rate = float(value)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        from raygd.config import ConfigError

        raise ConfigError(f"${SHAPED_ENV} = {value!r} is invalid: the shaped link's rate in Mbit/s, a number > 0.")
    return rate


def network_tags(
    network_cfg: NetworkConfig | None, world_size: int, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The run's network tags (P > 1 only): ``raygd.network = emulated`` when ``network_cfg`` delays its
    collectives, ``shaped`` with ``raygd.network_rate_mbit`` when ``$RAYGD_SHAPED_LINK`` names a shaped link
    (both: ``emulated`` and the rate tag, since the wait comes on top of the real link), else nothing."""
    if world_size < 2:
        return {}
    tags = {NETWORK_TAG: EMULATED} if network_cfg is not None else {}
    rate = shaped_rate_mbit(environ)
    if rate is not None:
        tags.setdefault(NETWORK_TAG, SHAPED)
        tags[RATE_TAG] = f"{rate:g}"
    return tags


emulation_tags = network_tags
"""The name ``raygd.train`` imports (``network_tags`` from before shaped links)."""
