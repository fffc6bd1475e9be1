"""Data-parallel SGD: the per-worker loop and the Ray Train driver.

``train_worker`` is the loop body: it runs unchanged in-process (world size 1), under
any torch process group (tests and benchmarks spawn gloo groups) and inside Ray Train,
where ``train_loop_per_worker`` wraps it. ``fit`` is the driver: it validates and
loads the data before Ray starts, creates the MLflow run, builds a ``TorchTrainer``
(Train V2) and records the summary. Run it with ``raygd train CONFIG``.

The clock: time-to-accuracy is wall-clock seconds spent in training steps (sampling,
forward, backward, all-reduce, update) until the training accuracy measured on a
fixed sample of the training set reaches the target. Evaluation and reporting are
paused out of the clock; both figures are logged. Every rank takes the stop decision
from the same all-reduced numbers, so all ranks return together.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raygd.config import RunConfig
from raygd.data import Dataset, GlobalBatchSampler, eval_indices, load_data
from raygd.mechanisms import build_mechanism
from raygd.models import build_model
from raygd.tracking import Tracker, check_tracking_store, create_run, provenance_tags

EVAL_CHUNK = 2048


@dataclass
class RunSummary:
    """What one run produced; ``status`` is reached_target, max_passes or diverged."""

    status: str
    steps: int
    passes: float
    train_time_s: float
    eval_time_s: float
    final_train_accuracy: float
    final_train_loss: float
    final_test_accuracy: float
    samples_per_s: float
    time_to_accuracy_s: float | None = None
    passes_to_accuracy: float | None = None
    updates_to_accuracy: int | None = None
    diverged_at_step: int | None = None
    run_id: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    walls: dict[str, float] = field(default_factory=dict)
    """Wall-clock timestamps (time.time()) of start-up events, for the overhead figures."""

    def summary_metrics(self) -> dict[str, float]:
        """The numeric fields worth logging as MLflow summary metrics."""
        skip = {"status", "run_id", "extra", "walls"}
        out = {k: float(v) for k, v in asdict(self).items() if k not in skip and v is not None}
        out["reached_target"] = float(self.status == "reached_target")
        out["diverged"] = float(self.status == "diverged")
        return out


def _all_reduce_sum(values: list[float], world_size: int, device: torch.device) -> list[float]:
    """Sum a few floats over all ranks with one all-reduce (identity at world size 1)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world_size: int,
             device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy over this rank's examples, summed over all ranks."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for start in range(0, x.shape[0], EVAL_CHUNK):
        logits = model(x[start:start + EVAL_CHUNK])
        target = y[start:start + EVAL_CHUNK]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += float((logits.argmax(1) == target).sum())
    model.train(was_training)
    loss_sum, correct, count = _all_reduce_sum([loss_sum, correct, float(x.shape[0])], world_size, device)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


def _params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@dataclass
class Worker:
    """One rank's training state: model (unwrapped), the module that runs steps, data and sampler."""

    cfg: RunConfig
    data: Dataset
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    net: torch.nn.Module
    mechanism: Any
    optimizer: torch.optim.Optimizer
    sampler: GlobalBatchSampler
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    estimator: Any = None


class OnlineDiversity:
    """B_D during training from the gradients of one update in ``train.diversity_every_steps``,
    smoothed over the measured updates (``raygd.diversity``).

    ``in_step``: per-example squared norms of the batch (ghost norms, one backward) give
    unbiased E‖g‖² and ‖μ‖². ``free``: the measured update's backward runs under DDP's
    ``no_sync``; ‖G_b‖² of each worker's B/P examples is read, the gradients are all-reduced by
    hand (``reduce_gradients``, one collective) and ‖G_B‖² read: no extra backward, and updates not measured
    keep DDP's overlapped all-reduce untouched. Both use the finite-population correction
    under ``shuffle`` sampling.
    """

    def __init__(self, cfg: RunConfig, n: int, model: torch.nn.Module, net: torch.nn.Module, world_size: int,
                 device: torch.device):
        from raygd import diversity as dv

        self.dv, self.kind, self.n = dv, cfg.train.diversity_estimator, n
        self.every = cfg.train.diversity_every_steps
        self.model, self.net, self.world_size, self.device = model, net, world_size, device
        self.B = cfg.train.global_batch_size
        self.b = self.B // world_size
        self.population = n if cfg.data.sampling == "shuffle" else None
        self.ema = dv.MomentsEMA(0.9)
        self.ghost = dv.GhostNorms(model) if self.kind == "in_step" else None

    def due(self, step: int) -> bool:
        """Whether update ``step`` (0-based) is measured."""
        return step % self.every == 0

    def measuring(self):
        """The context a measured update's forward and backward run in."""
        return self.ghost if self.ghost is not None else self.net.no_sync()  # free: P > 1, so net is DDP

    def update(self) -> None:
        """After a measured backward (before the mechanism changes the gradient)."""
        dv, P = self.dv, self.world_size
        if self.kind == "in_step":
            big = dv.grad_sq_norm(self.model)
            sum_sq = dv.mean_over_workers(float(self.ghost.sq_norms().sum()) * self.b**2, P, self.device) * P
            moments = dv.in_step_moments(sum_sq, big * self.B**2, self.B, self.population)
        else:
            small, big = dv.reduce_gradients(self.model, P)
            moments = dv.two_batch_moments(small, self.b, big, self.B, self.population)
        self.ema.update(moments)

    def metrics(self) -> dict[str, float]:
        bound = self.ema.value.batch_bound
        return {"diversity/batch_bound": bound, "diversity/delta": bound / self.n}


def make_worker(cfg: RunConfig, data: Dataset, rank: int = 0, world_size: int = 1,
                device: torch.device | None = None) -> Worker:
    """Build this rank's model (same initial weights on every rank), mechanism, DDP wrapper and sampler.

    world_size > 1 needs an initialised torch process group.
    """
    device = device or torch.device("cpu")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = build_model(tc.model, data.input_shape, data.num_classes)
    mechanism = build_mechanism(cfg.mechanism)
    model = mechanism.setup(model, seed=tc.seed, rank=rank, world_size=world_size,
                            global_batch_size=tc.global_batch_size, device=device).to(device)
    net = model
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        mechanism.attach_ddp(net)
    if device.type != "cpu":
        data = Dataset(data.x_train.to(device), data.y_train.to(device), data.x_test.to(device),
                       data.y_test.to(device), data.num_classes)
    ev = eval_indices(data.n, cfg.data.eval_size, tc.seed)[rank::world_size].to(device)
    estimator = OnlineDiversity(cfg, data.n, model, net, world_size, device) \
        if tc.diversity_estimator != "none" else None
    return Worker(cfg, data, rank, world_size, device, model, net, mechanism,
                  torch.optim.SGD(model.parameters(), lr=tc.step_size),
                  GlobalBatchSampler(data.n, tc.global_batch_size, cfg.data.sampling, tc.seed),
                  data.x_train[ev], data.y_train[ev], estimator)


def train_step(w: Worker, step: int) -> float:
    """One SGD update on the global batch of ``step`` (0-based); returns this rank's batch loss."""
    idx = w.sampler.worker_batch(step, w.rank, w.world_size).to(w.device)
    w.optimizer.zero_grad(set_to_none=True)
    estimator = w.estimator if w.estimator is not None and w.estimator.due(step) else None
    with estimator.measuring() if estimator else contextlib.nullcontext():
        loss = F.cross_entropy(w.net(w.data.x_train[idx]), w.data.y_train[idx])
        loss.backward()
    if estimator:
        estimator.update()  # before the mechanism changes the gradient
    w.mechanism.after_backward(w.model, step)
    w.optimizer.step()
    if w.device.type == "cuda":
        torch.cuda.synchronize(w.device)
    return float(loss.detach())


def checkpoint_state(w: Worker, step: int, clock: float, eval_time: float) -> dict[str, Any]:
    """Everything a restarted rank needs to continue exactly where ``step`` left off.

    Model and optimizer are identical on every rank; the RNG states (torch's, the
    mechanism's generators) are per rank. The sampler is a pure function of (seed, step),
    so the step is its whole state.
    """
    state: dict[str, Any] = {
        "step": step, "clock": clock, "eval_time": eval_time, "rank": w.rank, "world_size": w.world_size,
        "model": w.model.state_dict(), "optimizer": w.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
        "mechanism_rng": {k: g.get_state() for k, g in vars(w.mechanism).items() if isinstance(g, torch.Generator)},
        "estimator_ema": dict(vars(w.estimator.ema)) if w.estimator else None,
    }
    if w.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(w.device)
    return state


def restore_state(w: Worker, state: dict[str, Any]) -> None:
    """Load a ``checkpoint_state`` into a freshly built worker (same config, rank and world size)."""
    if (state["rank"], state["world_size"]) != (w.rank, w.world_size):
        raise ValueError(f"checkpoint of rank {state['rank']}/{state['world_size']} cannot restore "
                         f"rank {w.rank}/{w.world_size}: train.num_workers must not change on resume")
    w.model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    for name, rng in state["mechanism_rng"].items():
        getattr(w.mechanism, name).set_state(rng)
    if w.estimator and state["estimator_ema"]:
        vars(w.estimator.ema).update(state["estimator_ema"])
    if "cuda_rng" in state and w.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], w.device)


def train_worker(cfg: RunConfig, data: Dataset, rank: int = 0, world_size: int = 1,
                 tracker: Tracker | None = None, report: Callable[[dict], None] | None = None,
                 device: torch.device | None = None) -> RunSummary:
    """Run data-parallel SGD on this rank until the target, max passes or divergence.

    Args:
        cfg: the run config (identical on every rank).
        data: the full training/test tensors (every rank holds them; each uses its slice).
        rank, world_size: this worker's place; world_size > 1 needs an initialised process group.
        tracker: rank-zero MLflow logger (no-op elsewhere); None logs nothing.
        report: called with the metrics dict at every evaluation on every rank (``ray.train.report``).
        device: where to train; default CPU.

    Returns:
        The run's ``RunSummary`` (identical decisions on every rank).
    """
    return run_worker(make_worker(cfg, data, rank, world_size, device), tracker, report)


def run_worker(w: Worker, tracker: Tracker | None = None,
               report: Callable[[dict], None] | None = None,
               checkpoint: Callable[[dict, dict], None] | None = None,
               resume: dict[str, Any] | None = None) -> RunSummary:
    """The training loop of ``train_worker`` on an already built ``Worker``.

    Args:
        w: the built worker.
        tracker: rank-zero MLflow logger; None logs nothing.
        report: called with the metrics at every evaluation that is not a checkpoint.
        checkpoint: called with (metrics, ``checkpoint_state``) every ``train.checkpoint_interval``
            updates instead of ``report`` (not at the final evaluation); its time is paused out of the clock.
        resume: a ``checkpoint_state`` to continue from (its step, clock, weights and RNG), plus
            optionally ``restarts`` and ``lost_train_s`` (training time spent on work the restart
            threw away, added to the clock so time-to-accuracy counts the time actually spent).
    """
    tracker = tracker or Tracker(None, None, enabled=False)
    tc, data, world_size, device, model = w.cfg.train, w.data, w.world_size, w.device, w.model
    max_steps = max(1, math.ceil(tc.max_passes * data.n / tc.global_batch_size))
    every_ckpt = tc.checkpoint_interval if checkpoint is not None else 0

    clock = eval_time = window_clock = 0.0
    window_steps, window_loss, first_bad_step = 0, 0.0, float("inf")
    status, tta, step, start = "max_passes", None, 0, 0
    resume = resume or {}
    if "model" in resume:
        restore_state(w, resume)
        start, step, clock, eval_time = resume["step"], resume["step"], resume["clock"], resume["eval_time"]
    lost = float(resume.get("lost_train_s", 0.0))
    clock += lost
    acc = loss_eval = float("nan")
    first_step_wall = time.time()
    for step in range(start + 1, max_steps + 1):
        t0 = time.perf_counter()
        loss_value = train_step(w, step - 1)
        dt = time.perf_counter() - t0
        clock, window_clock, window_steps = clock + dt, window_clock + dt, window_steps + 1
        window_loss += loss_value
        if not math.isfinite(loss_value):
            first_bad_step = min(first_bad_step, step)
        save = bool(every_ckpt) and step % every_ckpt == 0 and step != max_steps
        if step % tc.eval_every_steps and step != max_steps and not save:
            continue
        t_eval = time.perf_counter()
        loss_eval, acc = evaluate(model, w.x_eval, w.y_eval, world_size, device)
        bad_local = first_bad_step if first_bad_step < float("inf") else (step if not _params_finite(model) else 0)
        bad_sum, batch_loss_sum = _all_reduce_sum([float(bad_local), window_loss], world_size, device)
        metrics = {
            "train/loss": loss_eval, "train/accuracy": acc,
            "train/batch_loss": batch_loss_sum / world_size / window_steps,
            "perf/samples_per_s": tc.global_batch_size * window_steps / window_clock,
            "perf/step_s": window_clock / window_steps, "progress/passes": step * tc.global_batch_size / data.n,
            "time/train_s": clock, **w.mechanism.metrics(), **(w.estimator.metrics() if w.estimator else {}),
        }
        window_clock, window_steps, window_loss = 0.0, 0, 0.0
        tracker.log_metrics(metrics, step=step)
        diverged = bad_sum > 0 or not math.isfinite(loss_eval)
        done = diverged or acc >= tc.target_accuracy
        if save and not done:
            checkpoint(dict(metrics, step=step), checkpoint_state(w, step, clock, eval_time))
        elif report is not None:
            report(dict(metrics, step=step))
        eval_time += time.perf_counter() - t_eval
        if diverged:
            status = "diverged"
            first_bad_step = int(bad_local) if bad_local else step
            break
        if done:
            status, tta = "reached_target", clock
            break

    t_eval = time.perf_counter()
    _, test_acc = evaluate(model, data.x_test[w.rank::world_size], data.y_test[w.rank::world_size], world_size, device)
    eval_time += time.perf_counter() - t_eval
    return RunSummary(
        status=status, steps=step, passes=step * tc.global_batch_size / data.n, train_time_s=clock,
        eval_time_s=eval_time, final_train_accuracy=acc, final_train_loss=loss_eval, final_test_accuracy=test_acc,
        samples_per_s=tc.global_batch_size * step / clock if clock > 0 else 0.0,
        time_to_accuracy_s=tta,
        passes_to_accuracy=step * tc.global_batch_size / data.n if tta is not None else None,
        updates_to_accuracy=step if tta is not None else None,
        diverged_at_step=first_bad_step if status == "diverged" else None,
        extra={**w.mechanism.metrics(), "train/restarts": float(resume.get("restarts", 0)),
               "time/lost_train_s": lost},
        walls={"first_step": first_step_wall},
    )


def _say(line: str) -> None:
    """One line to the worker's stderr, shown once by the driver: Train V2 patches ``print`` to also
    log it through the root logger (shown a second time), so write to the stream directly."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _progress_line(metrics: dict[str, float]) -> str:
    return (f"step {metrics['step']:>6}  passes {metrics['progress/passes']:6.2f}  "
            f"train acc {metrics['train/accuracy']:.4f}  loss {metrics['train/loss']:.4f}  "
            f"train time {metrics['time/train_s']:7.2f} s  {metrics['perf/samples_per_s']:8.0f} samples/s")


MODEL_FILE = "model.pt"


def load_checkpoint(folder: str | os.PathLike, rank: int) -> dict[str, Any]:
    """This rank's ``checkpoint_state`` from a checkpoint folder (shared model + per-rank RNG file)."""
    from pathlib import Path

    folder = Path(folder)
    state = torch.load(folder / f"rank_{rank}.pt", map_location="cpu", weights_only=False)
    state.update(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=False))
    return state


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a ``checkpoint_state``: rank 0 the shared model/optimizer/estimator, every rank its RNG."""
    from pathlib import Path

    shared = ("model", "optimizer", "estimator_ema")
    if state["rank"] == 0:
        torch.save({k: state[k] for k in shared}, Path(folder) / MODEL_FILE)
    torch.save({k: v for k, v in state.items() if k not in shared}, Path(folder) / f"rank_{state['rank']}.pt")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point: unpack the config, fetch the data, resume from a checkpoint, run the loop.

    After a worker failure Ray Train restarts every worker here; the loop continues from the
    last checkpoint (``ray.train.get_checkpoint``). Rank zero counts the attempt in the MLflow
    run, skips re-logging the steps already in its metric history, and adds the training time
    of the discarded steps (last logged ``time/train_s`` minus the checkpoint's clock) to the clock.
    """
    import tempfile

    import ray
    import ray.train
    import ray.train.torch

    loop_entry_wall = time.time()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(loop_config["threads"]))
    cfg = RunConfig.from_dict(loop_config["run"])
    data = ray.get(loop_config["data_ref"])
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    tracker = Tracker(cfg.tracking.tracking_uri, loop_config["run_id"], enabled=rank == 0)

    resume: dict[str, Any] = {}
    last = ray.train.get_checkpoint()
    if last is not None:
        with last.as_directory() as folder:
            resume = load_checkpoint(folder, rank)
    attempt = tracker.next_attempt()
    if attempt > 1:
        logged_step, logged_clock = tracker.resume_point("time/train_s")
        tracker.logged_through = logged_step
        resume["restarts"] = attempt - 1
        resume["lost_train_s"] = max(0.0, (logged_clock or 0.0) - resume.get("clock", 0.0))
        _say(f"raygd: restart {attempt - 1}: resuming at step {resume.get('step', 0)} "
             f"(metrics logged through step {logged_step})")

    def report(metrics: dict[str, float]) -> None:
        if rank == 0:
            _say(_progress_line(metrics))
        if loop_config["report_to_ray"]:  # only Tune reads reports; each is a barrier across workers
            ray.train.report(metrics)

    def checkpoint(metrics: dict[str, float], state: dict[str, Any]) -> None:
        if rank == 0:
            _say(_progress_line(metrics) + "  [checkpoint]")
        with tempfile.TemporaryDirectory(prefix="raygd-ckpt-") as folder:
            save_checkpoint(folder, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"step_{state['step']:09d}")

    w = make_worker(cfg, data, rank, world_size, device)
    summary = run_worker(w, tracker, report=report, checkpoint=checkpoint, resume=resume)
    summary.walls["loop_entry"] = loop_entry_wall
    return asdict(summary)


def check_ray_address(address: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail fast with a ``ConfigError`` if ``$RAY_ADDRESS`` (or ``address``) names no reachable Ray cluster.

    Accepts ``auto``, ``host:port`` (the GCS port, 6379 by default) and ``ray://host:port`` (Ray Client,
    10001); a TCP connect with a timeout tells a typo or a missing port-forward from a slow start.
    """
    import socket

    from raygd.config import ConfigError

    address = address if address is not None else os.environ.get("RAY_ADDRESS", "")
    if not address or address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[1] if address.startswith("ray://") else address
    host, _, port = host_port.rpartition(":")
    if "://" in host_port or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"RAY_ADDRESS = {address!r} is invalid: use host:port of the head node's GCS "
                          "(e.g. 10.0.0.5:6379), ray://host:10001 for Ray Client, or auto; unset it for local Ray.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"RAY_ADDRESS = {address!r} cannot be reached ({err}): start the cluster "
                          "(`ray start --head` or `ray up cluster/aws.yaml`), forward its port, or unset "
                          "RAY_ADDRESS to run on local Ray.") from None


def ensure_ray(num_cpus_needed: int, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start local Ray (or join ``$RAY_ADDRESS``) unless this process is already connected.

    A local start gets ``num_cpus`` (default: all cores, at least ``num_cpus_needed``) and its
    dashboard a free port that every process of the cluster knows (``RAY_API_SERVER_ADDRESS``):
    Ray Train's placement group cleaner finds its cluster through the State API, which fails when
    several local Ray instances run on one machine, and then a trial that Tune stops early
    (ASHA) keeps its workers' CPUs for good and the next trial never starts.
    """
    import socket

    import ray

    # Train V2 polls its workers every 2 s by default and a report (a barrier) waits for the poll;
    # 0.1 s brings a report to ~0.1 s (bench/throughput.py runs with it: same median throughput).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    num_cpus = num_cpus or max(os.cpu_count() or 1, num_cpus_needed)
    # One local node is never preempted; the watcher is one more actor process per fit (~1.8 CPU s).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The raylet and so every worker inherit it; a user's value (say, for `raygd submit` to a remote
    # cluster) would send the cleaner's queries there, and it would remove placement groups in use.
    given = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    try:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=log_to_driver)
    finally:  # this process keeps the user's value; a later local start picks its own port
        if given is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = given


def _use_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if device == "cuda" and gpus == 0:
        raise RuntimeError("train.device = 'cuda' but Ray sees no GPU: use train.device=auto or cpu.")
    return gpus > 0


def default_run_name(cfg: RunConfig) -> str:
    t = cfg.train
    return f"{t.model}-{cfg.mechanism.name}-B{t.global_batch_size}-lr{t.step_size:g}-P{t.num_workers}-s{t.seed}"


def fit(cfg: RunConfig, *, data: Dataset | None = None, parent_run_id: str | None = None,
        train_callbacks: list | None = None, storage_path: str | None = None,
        run_tags: dict[str, str] | None = None, run_id: str | None = None) -> RunSummary:
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

    Returns:
        The ``RunSummary`` of rank zero, with ``run_id`` set.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    fit_start_wall = time.time()
    tc = cfg.train
    check_tracking_store(cfg.tracking.tracking_uri)
    if not ray.is_initialized():
        check_ray_address()
    data = data if data is not None else load_data(cfg.data, tc.seed)
    GlobalBatchSampler(data.n, tc.global_batch_size, cfg.data.sampling, tc.seed)  # validates B <= n
    ensure_ray(tc.num_workers * tc.cpus_per_worker)
    use_gpu = _use_gpu(tc.device)
    mechanism = build_mechanism(cfg.mechanism)
    params = {**cfg.flat(), **mechanism.log_params(), "data.n": data.n, "data.num_classes": data.num_classes,
              "train.batch_size_per_worker": tc.batch_size_per_worker}
    shape = {"cluster.num_workers": tc.num_workers, "cluster.cpus_per_worker": tc.cpus_per_worker,
             "cluster.use_gpu": use_gpu, "cluster.nodes": len(ray.nodes())}
    if run_id is None:
        run_id = create_run(cfg.tracking.tracking_uri, cfg.tracking.experiment_name,
                            cfg.tracking.run_name or default_run_name(cfg), params,
                            {**provenance_tags(shape), **(run_tags or {})}, parent_run_id)
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=True)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": cfg.to_dict(), "data_ref": ray.put(data), "run_id": run_id,
                               "use_gpu": use_gpu, "threads": tc.cpus_per_worker,
                               "report_to_ray": bool(train_callbacks)},
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": tc.cpus_per_worker}),
            run_config=TrainRunConfig(name=f"raygd-{run_id}", storage_path=storage_path,
                                      callbacks=train_callbacks or [],
                                      failure_config=FailureConfig(max_failures=tc.max_failures),
                                      checkpoint_config=CheckpointConfig(num_to_keep=1),
                                      logging_config=LoggingConfig(log_level="WARNING")),
        )
        launch_wall = time.time()
        result = trainer.fit()
        summary = RunSummary(**result.return_value)
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be what failed; the original error matters
            if tracker.status() == "RUNNING":  # not already ended by someone else (a sweep's early stop)
                tracker.set_tags({"raygd.status": "failed"})
                tracker.finish("FAILED")
        raise
    summary.run_id = run_id
    walls = summary.walls
    summary.extra.update({
        "overhead/fit_setup_s": launch_wall - fit_start_wall,  # data, MLflow run, object store
        "overhead/worker_start_s": walls["loop_entry"] - launch_wall,  # Train controller, actors, process group
        "overhead/loop_setup_s": walls["first_step"] - walls["loop_entry"],  # data fetch, model, DDP
        "overhead/fit_to_first_step_s": walls["first_step"] - fit_start_wall,
    })
    tracker.log_metrics({**summary.extra, **summary.summary_metrics()}, step=summary.steps)
    tracker.set_tags({"raygd.status": summary.status})
    tracker.finish("FINISHED")
    return summary
