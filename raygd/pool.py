"""Trial pools: Ray Train worker groups that stay warm across a sweep's trials.

Ray offers no way to keep a worker group alive across Tune trials: every ``TorchTrainer.fit()``
starts a controller, helper actors and fresh workers that import torch and build a process group
(~16 s to the first step on 2 cores). A pool is one long-lived ``TorchTrainer`` whose per-worker
loop (``pool_loop_per_worker``) runs one trial after another. A Tune trial becomes thin
(``fit_in_pool``): it creates its MLflow run, hands its config to the sweep's ``Coordinator``
actor, relays the evaluations to Tune as they arrive (so ASHA and Optuna see what they see with
one fit per trial) and records the summary, through the same functions as ``raygd.train.fit``.

    pools = start_pools(base_cfg, count=spec.max_concurrent_trials, name=..., storage_path=...)
    summary = fit_in_pool(cfg, pools.name, ...)      # inside each Tune trial
    pools.stop()

Written here because neither Ray Train nor Tune keeps a worker group across trials; the pieces
are Ray's own (a Train V2 ``TorchTrainer``, an async actor as the queue, Train checkpoints).

Isolation: each trial rebuilds everything from its config (``raygd.loop.build_state`` seeds
torch's RNG, builds the model, the mechanism and its generators, optimizer, DDP and comm hook);
what is kept is the processes, their imports and the process group. The one module-level cache,
the pool's data set, is keyed by the data config and seed it holds.

Faults: the pool's TorchTrainer has the sweep's ``train.max_failures``. When Ray Train restarts
the group, rank 0 asks the coordinator again and gets the trial that was in flight; it continues
from its last checkpoint (checkpoint folders are named by the trial's MLflow run id) or is redone,
with ``raygd.train``'s restart bookkeeping (attempt tag, no duplicate steps, lost time charged).
A pool whose TorchTrainer fails for good fails its trial in flight and is started again.

Stopping: when Tune stops a trial (ASHA), the sweep's ``TrialRecorder`` cancels it here; the pool
abandons it at its next evaluation and takes the next trial.

Torch and the training loop are imported where they are used: the thin trial imports this module too, and
torch alone costs ~4 CPU s of a pool's start on 2 cores.

The queue between them, the ``Coordinator`` actor, is ``raygd.pool_queue``; the pool's worker loop and the
thin trial that speak to it through the request and result dicts stay together here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import ray

from raygd.config import RunConfig
from raygd.pool_queue import Coordinator, coordinator_name
from raygd.tracking import Tracker, system_metrics

if TYPE_CHECKING:
    import torch

    from raygd.data import Dataset
    from raygd.loop import RunSummary

IDLE_POLL_S = 30.0
"""How long a pool waits for a trial before its ranks meet again (well inside the process group's timeout)."""
POLL_S = 5.0
"""How long a thin trial waits on the coordinator per call for news of its trial."""
MAX_POOL_RESTARTS = 3
"""How often a runner starts its pool again after its TorchTrainer failed for good."""
POOL_TAG, POSITION_TAG = "raygd.pool_id", "raygd.pool_position"


class TrialCancelled(Exception):
    """The coordinator says the trial was stopped (by a Tune scheduler): every rank leaves it together."""


_DATA: dict[str, Dataset] = {}
"""The pool's data set, keyed by the data config and seed it holds (one at a time)."""


def _pool_data(request: dict) -> Dataset:
    key = request["data_key"]
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = ray.get(request["data_ref"])
    return _DATA[key]


def data_key(cfg: RunConfig) -> str:
    return json.dumps([dataclasses.asdict(cfg.data), cfg.train.seed], sort_keys=True, default=str)


def _broadcast(obj: Any, rank: int, world_size: int) -> Any:
    """Rank 0's object on every rank (one ``broadcast_object_list``)."""
    if world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _run_trial(request: dict, rank: int, world_size: int, device: torch.device, coordinator) -> None:
    """One trial in a warm pool, on every rank: the same loop, hooks and records as ``train_loop_per_worker``."""

    import torch

    from raygd.bound import log_initial_bound
    from raygd.checkpoint import report_checkpoint
    from raygd.loop import build_state, run_loop
    from raygd.train import _progress_line, _say, resume_point

    loop_entry_wall = time.time()
    cfg, run_id, relay = RunConfig.from_dict(request["run"]), request["run_id"], request["relay"]
    data = _pool_data(request)
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=rank == 0)
    tracker.set_tags({POOL_TAG: request["pool_id"], POSITION_TAG: request["position"]})
    resume = resume_point(tracker, rank, checkpoint_prefix=f"{run_id}-")

    def evaluation(metrics: dict[str, float], suffix: str = "") -> None:
        if rank == 0 and request.get("progress", True):
            _say(_progress_line(metrics) + suffix)
        if not relay:  # only a scheduler reads evaluations, and only it stops trials
            return
        stop = False
        if rank == 0:
            coordinator.report.remote(run_id, metrics)
            stop = ray.get(coordinator.is_cancelled.remote(run_id))
        if _broadcast(stop, rank, world_size):
            raise TrialCancelled(run_id)

    def checkpoint(metrics: dict[str, float], state: dict[str, Any]) -> None:
        report_checkpoint(metrics, state, f"{run_id}-step_{state['step']:09d}")
        evaluation(metrics, "  [checkpoint]")

    try:
        state = build_state(cfg, data, rank, world_size, device)
        if "model" not in resume:  # B_D at the initial weights, once per trial, outside the training clock
            log_initial_bound(state, tracker)
        summary = run_loop(state, tracker, report=evaluation, checkpoint=checkpoint, resume=resume)
        summary.walls["loop_entry"] = loop_entry_wall
        if rank == 0 and request.get("save_model_to"):
            torch.save(state.model.state_dict(), request["save_model_to"])
        result = asdict(summary)
    except TrialCancelled:
        result = {"cancelled": True}
    if rank == 0:
        ray.get(coordinator.finish.remote(request["pool_id"], run_id, result))


def _system_metrics(request: dict, rank: int):
    """Rank 0's system metrics of one trial (``raygd.tracking.system_metrics``): a monitor per trial, stopped
    and joined before the pool takes the next one (the pool's processes outlive their trials)."""
    return system_metrics(request["run"]["tracking"]["tracking_uri"], request["run_id"], enabled=rank == 0)


def pool_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point of a pool: take trials from the coordinator until it closes."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config["threads"]))
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    coordinator, pool_id = loop_config["coordinator"], loop_config["pool_id"]
    if rank == 0:  # what every trial's start needs, imported once as part of the pool's start
        import mlflow.tracking  # noqa: F401

        import raygd.checkpoint
        import raygd.diversity
        import raygd.train  # noqa: F401

        coordinator.pool_event.remote(pool_id, "ready", time.time())
    trials = 0
    while True:
        # Rank 0 takes the next trial; the others read the same request from the coordinator (an
        # ObjectRef inside it must travel through Ray, not through the process group's pickling).
        # Ray's stubs type ray.get of an untyped actor handle's call as a list; here it is a dict.
        request = ray.get(coordinator.next_trial.remote(pool_id, IDLE_POLL_S)) if rank == 0 else None
        what = _broadcast(None if request is None else "idle" if request.get("idle") else "trial", rank, world_size)  # pyright: ignore[reportAttributeAccessIssue]
        if what is None:
            return {"trials": trials}
        if what == "trial":
            request = request or ray.get(coordinator.current.remote(pool_id))
            with _system_metrics(request, rank):  # pyright: ignore[reportArgumentType]
                _run_trial(request, rank, world_size, device, coordinator)  # pyright: ignore[reportArgumentType]
            trials += 1


@ray.remote(num_cpus=0)
class PoolRunner:
    """Runs one pool's ``TorchTrainer.fit()`` (it blocks for the pool's life) and starts it again if it fails."""

    def run(self, pool_id: int, coordinator, run: dict, gpu: bool, name: str, storage_path: str | None) -> int:
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        tc = RunConfig.from_dict(run).train
        coordinator.pool_event.remote(pool_id, "launch", time.time())
        for attempt in range(MAX_POOL_RESTARTS + 1):
            trainer = TorchTrainer(
                pool_loop_per_worker,
                train_loop_config={
                    "coordinator": coordinator,
                    "pool_id": pool_id,
                    "use_gpu": gpu,
                    "threads": tc.cpus_per_worker,
                },
                scaling_config=ScalingConfig(
                    num_workers=tc.num_workers, use_gpu=gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
                ),
                run_config=TrainRunConfig(
                    name=name,
                    storage_path=storage_path,
                    failure_config=FailureConfig(max_failures=tc.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    logging_config=LoggingConfig(log_level="WARNING"),
                ),
            )
            try:
                trainer.fit()
                return attempt
            except Exception as err:  # the group failed for good: fail its trial, start again
                ray.get(coordinator.pool_failed.remote(pool_id, f"trial pool {pool_id} failed: {err!r}"))
        return MAX_POOL_RESTARTS + 1


@dataclass
class Pools:
    """The pools of one sweep: their coordinator (a named actor) and runners."""

    name: str
    coordinator: Any
    runners: list
    runs: list
    launch_wall: float

    def start_s(self, timeout_s: float = 0.0) -> float | None:
        """Seconds from launch to the first pool's loop entry (None if none is up yet)."""
        deadline = time.time() + timeout_s
        while True:
            # ray.get's stubs type an untyped actor handle's result as a list; pool_walls returns a dict.
            ready = [w["ready"] for w in ray.get(self.coordinator.pool_walls.remote()).values() if "ready" in w]  # pyright: ignore[reportAttributeAccessIssue]
            if ready or time.time() >= deadline:
                return min(ready) - self.launch_wall if ready else None
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> None:
        """Close the queue, let each pool's loop return, and end the actors."""
        ray.get(self.coordinator.close.remote())
        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for actor in [*self.runners, self.coordinator]:
            ray.kill(actor)


def start_pools(cfg: RunConfig, count: int, sweep_id: str, storage_path: str | None, gpu: bool = False) -> Pools:
    """Start ``count`` pools of ``cfg``'s worker shape (P workers, CPUs/GPUs per worker) for one sweep.

    Pool i's Train run is named ``raygd-pool-<sweep_id>-<i>``: a resumed sweep's pools find the
    checkpoint of a trial that was in flight when the sweep was interrupted.
    """
    name = coordinator_name(sweep_id)
    coordinator = Coordinator.options(name=name).remote()
    launch = time.time()
    runners = [PoolRunner.remote() for _ in range(count)]
    runs = [
        r.run.remote(i, coordinator, cfg.to_dict(), gpu, f"raygd-pool-{sweep_id}-{i}", storage_path)
        for i, r in enumerate(runners)
    ]
    return Pools(name, coordinator, runners, runs, launch)


def cancel_trial(sweep_id: str, run_id: str) -> None:
    """Tell the sweep's pools to abandon ``run_id`` (no-op when the sweep has no pools)."""
    try:
        coordinator = ray.get_actor(coordinator_name(sweep_id))
    except ValueError:
        return
    ray.get(coordinator.cancel.remote(run_id))


def fit_in_pool(
    cfg: RunConfig,
    pools_name: str,
    *,
    data: Dataset | None = None,
    parent_run_id: str | None = None,
    run_tags: dict[str, str] | None = None,
    run_id: str | None = None,
    relay=None,
    save_model_to: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """``raygd.train.fit`` for a trial of a sweep with pools: the same checks, MLflow run and records,
    with the training done by a warm pool.

    Args:
        cfg, data, parent_run_id, run_tags, run_id: as for ``raygd.train.fit``.
        pools_name: the sweep's coordinator (``Pools.name``).
        relay: called with each evaluation's metrics (with ``step``) as the pool reports them, in
            order and once per step (a redone step after a restart is not relayed again); None: the
            pool does not report evaluations (no scheduler reads them).
        save_model_to: write the final weights (rank 0's ``state_dict``) to this path on the pool's node.
        progress: the pool's rank 0 prints a line per evaluation.
    """
    from raygd.loop import RunSummary
    from raygd.train import failing, open_run, prepare, record_summary

    fit_start_wall = time.time()
    data, gpu = prepare(cfg, data)
    run_id = run_id or open_run(cfg, data, gpu, parent_run_id, run_tags)
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=True)
    coordinator = ray.get_actor(pools_name)
    with failing(tracker), _cancel_on_error(coordinator, run_id):
        request = {
            "run": cfg.to_dict(),
            "run_id": run_id,
            "data_key": data_key(cfg),
            "data_ref": ray.put(data),
            "relay": relay is not None,
            "save_model_to": save_model_to,
            "progress": progress,
        }
        launch_wall = time.time()
        ray.get(coordinator.submit.remote(request))
        result = _await_result(coordinator, run_id, relay)
        if "error" in result or "cancelled" in result:
            raise RuntimeError(result.get("error") or f"trial {run_id} was cancelled")
    summary = RunSummary(**result)
    summary.run_id = run_id
    record_summary(tracker, summary, fit_start_wall, launch_wall)
    return summary


@contextlib.contextmanager
def _cancel_on_error(coordinator, run_id: str):
    """A thin trial that fails or is stopped abandons its trial in the pool."""
    try:
        yield
    except BaseException:
        coordinator.cancel.remote(run_id)
        raise


def _await_result(coordinator, run_id: str, relay) -> dict:
    cursor, last_step = 0, -1
    while True:
        reports, result = ray.get(coordinator.poll.remote(run_id, cursor, POLL_S))
        cursor += len(reports)
        for metrics in reports:
            if relay is not None and metrics["step"] > last_step:
                relay(metrics)
                last_step = metrics["step"]
        if result is not None:
            return result
