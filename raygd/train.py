"""Data-parallel SGD on Ray Train: the per-worker entry point and the driver.

``train_loop_per_worker`` is what Ray Train runs on every worker: it unpacks the config, fetches
the data, resumes from the last checkpoint and runs ``raygd.loop.run_loop``. ``fit`` is the
driver: it validates and loads the data before Ray starts, creates the MLflow run, builds a
``TorchTrainer`` (Train V2) and records the summary. Run it with ``raygd train CONFIG``.

``stop_signals`` is how the commands (``raygd train``, ``raygd sweep``) stop on SIGINT or SIGTERM: an
``Interrupted`` exception in the driver, which ends a run KILLED and leaves a sweep resumable.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raygd.bound import log_initial_bound
from raygd.checkpoint import load_checkpoint, report_checkpoint
from raygd.config import RunConfig
from raygd.data import Dataset, GlobalBatchSampler, load_data
from raygd.loop import RunSummary, build_state, run_loop
from raygd.mechanisms import build_mechanism
from raygd.models import check_workload, workload_params
from raygd.network import emulation_tags
from raygd.ray_env import check_ray_address, ensure_ray, use_gpu
from raygd.records import INTERRUPTED_TAG, STATUS_TAG, Status
from raygd.tracking import Tracker, check_tracking_store, create_run, log_dataset, provenance_tags, system_metrics


def _say(line: str) -> None:
    """One line to the worker's stderr, shown once by the driver: Train V2 patches ``print`` to also
    log it through the root logger (shown a second time), so write to the stream directly."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _progress_line(metrics: dict[str, float]) -> str:
    return (
        f"step {metrics['step']:>6}  passes {metrics['progress/passes']:6.2f}  "
        f"train acc {metrics['train/accuracy']:.4f}  loss {metrics['train/loss']:.4f}  "
        f"train time {metrics['time/train_s']:7.2f} s  {metrics['perf/samples_per_s']:8.0f} samples/s"
    )


def resume_point(tracker: Tracker, rank: int, checkpoint_prefix: str = "") -> dict[str, Any]:
    """The checkpoint to continue from (if Ray Train restarted the group) and the restart bookkeeping.

    Rank zero counts the attempt in the MLflow run, skips re-logging the steps already in its metric
    history, and charges the training time of the discarded steps (last logged ``time/train_s`` minus
    the checkpoint's clock) to the clock. ``checkpoint_prefix``: use the last checkpoint only if its
    folder name starts with it (a trial pool's checkpoints are named by the trial's run id).
    """
    import ray.train

    resume: dict[str, Any] = {}
    last = ray.train.get_checkpoint()
    if last is not None and Path(last.path).name.startswith(checkpoint_prefix):
        with last.as_directory() as folder:
            resume = load_checkpoint(folder, rank)
    attempt = tracker.next_attempt()
    if attempt > 1:
        logged_step, logged_clock = tracker.resume_point("time/train_s")
        tracker.logged_through = logged_step
        resume["restarts"] = attempt - 1
        resume["lost_train_s"] = max(0.0, (logged_clock or 0.0) - resume.get("clock", 0.0))
        _say(
            f"raygd: restart {attempt - 1}: resuming at step {resume.get('step', 0)} "
            f"(metrics logged through step {logged_step})"
        )
    return resume


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: unpack the config, fetch the data, resume from a checkpoint, run the loop.

    After a worker failure Ray Train restarts every worker here; the loop continues from the
    last checkpoint (``ray.train.get_checkpoint``).
    """

    import ray
    import ray.train
    import ray.train.torch

    loop_entry_wall = time.time()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config["threads"]))
    cfg = RunConfig.from_dict(loop_config["run"])
    data: Dataset = ray.get(loop_config["data_ref"])  # pyright: ignore[reportAssignmentType]  # Ray's stubs: ray.get(Any) is a list
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    tracker = Tracker(cfg.tracking.tracking_uri, loop_config["run_id"], enabled=rank == 0)
    resume = resume_point(tracker, rank)

    progress = rank == 0 and loop_config.get("progress", True)

    def report(metrics: dict[str, float]) -> None:
        if progress:
            _say(_progress_line(metrics))
        if loop_config["report_to_ray"]:  # only Tune reads reports; each is a barrier across workers
            ray.train.report(metrics)

    def checkpoint(metrics: dict[str, float], state: dict[str, Any]) -> None:
        if progress:
            _say(_progress_line(metrics) + "  [checkpoint]")
        report_checkpoint(metrics, state, f"step_{state['step']:09d}")

    state = build_state(cfg, data, rank, world_size, device)
    if "model" not in resume:  # B_D at the initial weights, once per trial, outside the training clock
        log_initial_bound(state, tracker)
    with system_metrics(cfg.tracking.tracking_uri, loop_config["run_id"], enabled=rank == 0):  # also on an error
        summary = run_loop(state, tracker, report=report, checkpoint=checkpoint, resume=resume)
    summary.walls["loop_entry"] = loop_entry_wall
    if rank == 0 and loop_config.get("save_model_to"):
        torch.save(state.model.state_dict(), loop_config["save_model_to"])
    return asdict(summary)


def default_run_name(cfg: RunConfig) -> str:
    t = cfg.train
    return f"{t.model}-{cfg.mechanism.name}-B{t.global_batch_size}-lr{t.step_size:g}-P{t.num_workers}-s{t.seed}"


def open_run(cfg: RunConfig, data: Dataset, gpu: bool, parent_run_id: str | None, run_tags: dict | None) -> str:
    """The MLflow run of this fit: the whole config as params, provenance and cluster shape as tags."""
    import ray

    tc = cfg.train
    params = {
        **cfg.flat(),
        **build_mechanism(cfg.mechanism).log_params(),
        "data.n": data.n,
        "data.num_classes": data.num_classes,
        "train.batch_size_per_worker": tc.batch_size_per_worker,
        **workload_params(cfg, data),
    }
    shape = {
        "cluster.num_workers": tc.num_workers,
        "cluster.cpus_per_worker": tc.cpus_per_worker,
        "cluster.use_gpu": gpu,
        "cluster.nodes": len(ray.nodes()),
    }
    run_id = create_run(
        cfg.tracking.tracking_uri,
        cfg.tracking.experiment_name,
        cfg.tracking.run_name or default_run_name(cfg),
        params,
        {**provenance_tags(shape), **emulation_tags(cfg.train.network, tc.num_workers), **(run_tags or {})},
        parent_run_id,
    )
    log_dataset(cfg.tracking.tracking_uri, run_id, cfg.data, data)
    return run_id


def _trainer(
    cfg: RunConfig,
    data: Dataset,
    run_id: str,
    gpu: bool,
    train_callbacks: list | None,
    storage_path: str | None,
    save_model_to: str | None,
    progress: bool,
):
    """The ``TorchTrainer`` of one run: P workers of ``train.cpus_per_worker`` CPUs (and a GPU each)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    loop_config = {
        "run": cfg.to_dict(),
        "data_ref": ray.put(data),
        "run_id": run_id,
        "use_gpu": gpu,
        "threads": tc.cpus_per_worker,
        "report_to_ray": bool(train_callbacks),
        "save_model_to": save_model_to,
        "progress": progress,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=gpu, resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        run_config=TrainRunConfig(
            name=f"raygd-{run_id}",
            storage_path=storage_path,
            callbacks=train_callbacks or [],
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def record_summary(tracker: Tracker, summary: RunSummary, fit_start_wall: float, launch_wall: float) -> None:
    """Log the start-up split, the summary metrics and the status, and end the run."""
    walls = summary.walls
    summary.extra.update(
        {
            "overhead/fit_setup_s": launch_wall - fit_start_wall,  # data, MLflow run, object store
            "overhead/worker_start_s": walls["loop_entry"] - launch_wall,  # Train controller, actors, group;
            # in a trial pool: the wait for a free pool
            "overhead/loop_setup_s": walls["first_step"] - walls["loop_entry"],  # data fetch, model, DDP
            "overhead/fit_to_first_step_s": walls["first_step"] - fit_start_wall,
        }
    )
    tracker.log_metrics({**summary.extra, **summary.summary_metrics()}, step=summary.steps)
    tracker.set_tags({STATUS_TAG: summary.status})
    tracker.finish("FINISHED")


def prepare(cfg: RunConfig, data: Dataset | None) -> tuple[Dataset, bool]:
    """Checks before any training: the tracking store, ``$RAY_ADDRESS``, the data (loaded now unless
    given) and B against n; then Ray is started or joined. Returns the data and whether to use GPUs."""
    import ray

    tc = cfg.train
    check_tracking_store(cfg.tracking.tracking_uri)
    if not ray.is_initialized():
        check_ray_address()
    data = data if data is not None else load_data(cfg.data, tc.seed)
    check_workload(cfg, data)  # a user's model: built, one forward checked against the labels
    GlobalBatchSampler(data.n, tc.global_batch_size, cfg.data.sampling, tc.seed)  # validates B <= n
    ensure_ray(tc.num_workers * tc.cpus_per_worker)
    return data, use_gpu(tc.device)


@contextlib.contextmanager
def failing(tracker: Tracker):
    """Mark the run FAILED if the block raises (unless someone else ended it: a sweep's early stop), or KILLED
    with ``INTERRUPTED_TAG`` if Ctrl-C (``KeyboardInterrupt``) or a stop signal (``Interrupted``) ended it."""
    try:
        yield
    except KeyboardInterrupt as err:
        stop = interrupted(err)
        with contextlib.suppress(Exception):
            if tracker.status() == "RUNNING":
                tracker.set_tags({INTERRUPTED_TAG: stop.signal_name})
                tracker.finish("KILLED")
        stop.run_id = tracker.run_id
        if stop is err:
            raise
        raise stop from err
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be what failed; the original error matters
            if tracker.status() == "RUNNING":
                tracker.set_tags({STATUS_TAG: Status.FAILED})
                tracker.finish("FAILED")
        raise


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""What stops a command: Ctrl-C, and what a job stop (Ray Jobs, a scheduler) or a preempted node sends."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command (``stop_signals``): a ``KeyboardInterrupt``, as Ctrl-C raises.

    Attributes:
        signum: the (first) signal.
        repeated: a second stop signal came: stop at once.
        run_id: the MLflow run it interrupted, once recorded (a run's, or a sweep's parent run).
        trials: an interrupted sweep's (finished, total) trials, once recorded.
    """

    def __init__(self, signum: int, repeated: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.repeated = signum, repeated
        self.run_id: str | None = None
        self.trials: tuple[int, int] | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process this signal ended: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


RECEIVED: list[int] = []
"""The stop signals received since ``stop_signals`` (or a sweep's Tune experiment) began, first first."""


def interrupted(err: BaseException | None = None) -> Interrupted:
    """``err`` if it is an ``Interrupted``, else the ``Interrupted`` of the signals ``RECEIVED`` (SIGINT if none): Ray's
    blocking calls (``ray.get``, ``ray.wait``) raise a plain ``KeyboardInterrupt`` in place of what a handler raised."""
    if isinstance(err, Interrupted):
        return err
    return Interrupted(RECEIVED[0] if RECEIVED else signal.SIGINT, repeated=len(RECEIVED) > 1)


def _raise_interrupted(signum: int, frame) -> None:
    RECEIVED.append(signum)
    raise interrupted()


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise ``Interrupted`` in the main thread while the block runs (``raygd train``, ``sweep``).

    A signal that was ignored when the block began (``nohup``, a shell's background job) stays ignored. Ray replaces
    SIGTERM's handler when it starts (``ray.init``: exit; a local head also kills Ray's processes under the running
    driver, which then aborts in Ray's C++ core, exit 134): start Ray inside ``keeping_stop_signals``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    RECEIVED.clear()
    for s, handler in saved.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def keeping_stop_signals():
    """Put ``stop_signals``' handlers back after the block (where Ray starts, which replaces SIGTERM's)."""
    main = threading.current_thread() is threading.main_thread()
    ours = [s for s in STOP_SIGNALS if main and signal.getsignal(s) is _raise_interrupted]
    try:
        yield
    finally:
        for s in ours:
            signal.signal(s, _raise_interrupted)


def _fit_trainer(trainer):
    """``trainer.fit()``; under ``stop_signals`` in a thread of its own, where Train V2 leaves SIGINT alone. From the
    main thread it installs a SIGINT handler of its own, which aborts the run and exits with status 0."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not (
        _raise_interrupted
    ):
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="raygd-fit", daemon=True)  # an interrupted fit ends with Ray
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # signal handlers run in the main thread, between waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def fit(
    cfg: RunConfig,
    *,
    data: Dataset | None = None,
    parent_run_id: str | None = None,
    train_callbacks: list | None = None,
    storage_path: str | None = None,
    run_tags: dict[str, str] | None = None,
    run_id: str | None = None,
    save_model_to: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run one data-parallel SGD job on Ray Train and record it in MLflow.

    Data is loaded (and so validated) before Ray starts; the MLflow run is created
    before ``fit()`` and marked FAILED if training raises.

    Args:
        cfg: a validated run config (tracking URI absolute).
        data: preloaded data (default: ``load_data(cfg.data, seed)``).
        parent_run_id: nest the MLflow run under this run (a sweep's parent).
        train_callbacks: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
        storage_path: Ray Train storage (default ``~/ray_results``).
        run_tags: extra MLflow tags (e.g. the Tune trial id).
        run_id: continue this unfinished MLflow run instead of creating one (a resumed sweep's trial):
            the Ray Train run of the same name restores its last checkpoint from ``storage_path``, and
            the loop logs only steps after those already recorded.
        save_model_to: write the final weights (rank 0's ``state_dict``) to this path on rank 0's node.
        progress: rank 0 prints a line per evaluation (shown by the driver).

    Returns:
        The ``RunSummary`` of rank zero, with ``run_id`` set.
    """
    fit_start_wall = time.time()
    with keeping_stop_signals():
        data, gpu = prepare(cfg, data)
    run_id = run_id or open_run(cfg, data, gpu, parent_run_id, run_tags)
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=True)
    with failing(tracker):
        trainer = _trainer(cfg, data, run_id, gpu, train_callbacks, storage_path, save_model_to, progress)
        launch_wall = time.time()
        # Ray's stubs do not type Result.return_value: it is the dict train_loop_per_worker returned.
        summary = RunSummary(**_fit_trainer(trainer).return_value)  # pyright: ignore[reportCallIssue]
    summary.run_id = run_id
    record_summary(tracker, summary, fit_start_wall, launch_wall)
    return summary
