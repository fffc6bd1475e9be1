"""The queue between a sweep's thin trials and its warm pools (``raygd.pool``), and each trial's channel back.

One named async actor per sweep (``coordinator_name``): a thin trial submits its request and polls for its
evaluations and result; a pool's rank 0 takes the next request (the one in flight again after a restart), reports
evaluations and finishes it; a Tune scheduler's stop cancels it. Its process imports only this module and Ray.
"""

from __future__ import annotations

import asyncio
import collections

import ray


def coordinator_name(sweep_id: str) -> str:
    return f"raygd-pools-{sweep_id}"


@ray.remote(num_cpus=0)
class Coordinator:
    """The queue between thin trials and pools, and each trial's channel back (evaluations, result).

    An async actor: trials and pools wait on it concurrently without holding a thread each.
    """

    def __init__(self) -> None:
        self.pending: collections.deque[dict] = collections.deque()
        self.in_flight: dict[int, dict] = {}
        self.started: collections.Counter[int] = collections.Counter()
        self.reports: dict[str, list[dict]] = {}
        self.results: dict[str, dict] = {}
        self.cancelled: set[str] = set()
        self.walls: dict[int, dict[str, float]] = collections.defaultdict(dict)
        self.closed = False
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _wait(self, ready, timeout_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    async def submit(self, request: dict) -> None:
        run_id = request["run_id"]
        self.reports[run_id], _ = [], self.results.pop(run_id, None)
        self.cancelled.discard(run_id)
        self.pending.append(request)
        await self._notify()

    async def next_trial(self, pool_id: int, timeout_s: float) -> dict | None:
        """The trial pool ``pool_id`` runs next: the one in flight after a restart, else the oldest pending.
        ``{"idle": True}`` after ``timeout_s`` without one; None once closed."""
        if pool_id in self.in_flight:
            return dict(self.in_flight[pool_id], restarted=True)
        await self._wait(lambda: self.pending or self.closed, timeout_s)
        if not self.pending:
            return None if self.closed else {"idle": True}
        request = self.pending.popleft()
        self.started[pool_id] += 1
        request = dict(request, pool_id=pool_id, position=self.started[pool_id])
        self.in_flight[pool_id] = request
        return request

    def current(self, pool_id: int) -> dict:
        """The request pool ``pool_id`` is running (for its ranks other than 0)."""
        return self.in_flight[pool_id]

    async def report(self, run_id: str, metrics: dict) -> None:
        self.reports.setdefault(run_id, []).append(metrics)
        await self._notify()

    async def finish(self, pool_id: int, run_id: str, result: dict) -> None:
        if self.in_flight.get(pool_id, {}).get("run_id") == run_id:
            del self.in_flight[pool_id]
        self.results[run_id] = result
        await self._notify()

    async def poll(self, run_id: str, cursor: int, timeout_s: float) -> tuple[list[dict], dict | None]:
        """Evaluations of ``run_id`` after the first ``cursor``, and its result once there is one."""
        await self._wait(lambda: len(self.reports.get(run_id, ())) > cursor or run_id in self.results, timeout_s)
        return self.reports.get(run_id, [])[cursor:], self.results.get(run_id)

    async def cancel(self, run_id: str) -> None:
        """Abandon a trial: dropped if it has not started, stopped at its next evaluation if it has."""
        self.cancelled.add(run_id)
        before = len(self.pending)
        self.pending = collections.deque(r for r in self.pending if r["run_id"] != run_id)
        if len(self.pending) < before:
            self.results[run_id] = {"cancelled": True}
        await self._notify()

    def is_cancelled(self, run_id: str) -> bool:
        return run_id in self.cancelled

    def pool_event(self, pool_id: int, event: str, wall: float) -> None:
        self.walls[pool_id].setdefault(event, wall)

    async def pool_failed(self, pool_id: int, error: str) -> None:
        request = self.in_flight.pop(pool_id, None)
        if request is not None:
            self.results[request["run_id"]] = {"error": error}
        await self._notify()

    async def close(self) -> None:
        self.closed = True
        await self._notify()

    def pool_walls(self) -> dict[int, dict[str, float]]:
        return dict(self.walls)
