"""Run a function on a real local gloo process group (torch.multiprocessing, no Ray)."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out[rank] = fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_group(fn, world_size: int, *args, attempts: int = 3) -> list:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return their results by rank.

    A free port can be taken by another process between choosing and binding it; such a
    start-up failure (and only that) is retried on a new port.
    """
    for attempt in range(attempts):
        with mp.Manager() as manager:
            out = manager.dict()
            try:
                mp.spawn(_entry, args=(world_size, free_port(), fn, args, out), nprocs=world_size, join=True)
            except mp.ProcessRaisedException as err:
                if "address already in use" not in str(err).lower() or attempt == attempts - 1:
                    raise
                continue
            return [out[r] for r in range(world_size)]
    raise AssertionError("unreachable")
