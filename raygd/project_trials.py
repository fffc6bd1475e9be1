"""A sweep's trials as ``raygd project`` reads them, and this machine's compute fitted from their step times.

Each trial's record (``raygd.records.TrialRecord``) with what the cost model needs from its run: the model's
size (``model.num_params``, ``model.macs_per_example``, or a built-in model rebuilt by name for older runs),
the mechanism's payload, the workers and the step count, and any emulated or shaped link its time includes.
``local_step_s`` takes that link's modelled share out, so ``fit_measured_compute`` fits compute alone.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raygd import costmodel as cm
from raygd.records import KIND_TAG, SWEEP_KIND, TrialRecord, child_runs, mlflow_client, params_target

INPUT_SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@dataclass(frozen=True)
class TrialInput:
    """A trial's record and what the cost model needs from its run."""

    record: TrialRecord
    model: str
    mechanism_name: str
    quant_bucket_size: int
    n: int
    workers: int
    steps: int
    train_time_s: float
    num_params: int
    macs_per_example: float
    emulated: dict[str, Any] | None = None
    """The run's ``train.network.*`` when its time was emulated."""
    shaped_rate_mbit: float | None = None
    """The ``tbf`` rate of the shaped link its collectives crossed (tag ``raygd.network_rate_mbit``), if any."""
    target: str = "the target"
    """The run's target as ``TrainConfig.target_label`` words it (``train loss <= 1.8``)."""

    @property
    def step_s(self) -> float:
        return self.train_time_s / self.steps if self.steps else math.nan

    @property
    def payload(self) -> int:
        return cm.payload_bytes(self.num_params, self.mechanism_name, self.quant_bucket_size)

    @property
    def collective(self) -> str:
        return cm.collective_of(self.mechanism_name)

    @property
    def buckets(self) -> int:
        return cm.ddp_buckets(4 * self.num_params)


def builtin_model_size(model: str, data_name: str, features: int, num_classes: int) -> tuple[int, float]:
    """(parameters, forward multiply-accumulates per example) of raygd's built-in ``model``, for runs recorded
    before every run logged ``model.num_params`` and ``model.macs_per_example`` (``raygd.models.model_size``)."""
    import torch

    from raygd.models import build_model, model_size

    shape = INPUT_SHAPES.get(data_name, (features,))
    params, _, macs = model_size(build_model(model, shape, num_classes), torch.zeros(1, *shape))
    return params, macs


def _trial_input(run, sizes: dict) -> TrialInput:
    p, m = run.data.params, run.data.metrics
    key = (p.get("train.model", "logreg"), p.get("data.name", "synthetic"), p.get("data.synthetic_features", "32"))
    classes = int(p.get("data.num_classes", 10))
    if "model.num_params" in p and "model.macs_per_example" in p:  # any model: what the run measured of it
        params, macs = int(p["model.num_params"]), float(p["model.macs_per_example"])
    else:  # a run from before those params: a built-in model, rebuilt by name
        if (*key, classes) not in sizes:
            sizes[(*key, classes)] = builtin_model_size(key[0], key[1], int(key[2]), classes)
        params, macs = sizes[(*key, classes)]
    emulated = None
    if run.data.tags.get("raygd.network") == "emulated":
        emulated = {k.split(".")[-1]: v for k, v in p.items() if k.startswith("train.network.")}
    rate = run.data.tags.get("raygd.network_rate_mbit")
    target = params_target(p) or "the target"
    return TrialInput(
        target=target,
        record=TrialRecord.from_run(run),
        model=key[0],
        mechanism_name=p.get("mechanism.name", "vanilla"),
        quant_bucket_size=int(p.get("mechanism.quant_bucket_size", 512)),
        n=int(float(p.get("data.n", 0))),
        workers=int(p.get("train.num_workers", 1)),
        steps=int(m.get("steps", 0)),
        train_time_s=float(m.get("train_time_s", math.nan)),
        num_params=params,
        macs_per_example=macs,
        emulated=emulated,
        shaped_rate_mbit=None if rate is None else float(rate),
    )


def read_trials(tracking_uri: str, run_id: str) -> list[TrialInput]:
    """The trials of a sweep's parent run (its child runs), or the one run ``run_id`` itself."""
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    runs = child_runs(tracking_uri, run_id) if run.data.tags.get(KIND_TAG) == SWEEP_KIND else [run]
    sizes: dict = {}
    return [_trial_input(r, sizes) for r in runs if int(r.data.metrics.get("steps", 0)) > 0]


def local_step_s(t: TrialInput) -> float:
    """The trial's step time without any emulated wait (the cost model's exposed wait for its link) and without
    the modelled transfer over a shaped link it crossed (``cm.shaped_link`` at its rate, no overlap: DDP's
    all-reduce of one bucket waits for the whole backward, and gloo's transfer is measured as such)."""
    step_s = t.step_s
    if t.shaped_rate_mbit is not None:
        link = cm.shaped_link(t.shaped_rate_mbit)
        step_s -= cm.comm_time(t.payload, t.workers, link, "ring", t.collective, t.buckets)
    if not t.emulated:
        return step_s
    link = cm.Link.from_gbps_us(float(t.emulated["bandwidth_gbps"]), float(t.emulated["latency_us"]))
    comm = cm.comm_time(t.payload, t.workers, link, t.emulated.get("topology", "ring"), t.collective, t.buckets)
    overlap = float(t.emulated.get("overlap", 0.0))
    return step_s - cm.exposed_comm(comm, max(step_s - comm, 0.0), overlap)


def fit_measured_compute(trials: Sequence[TrialInput]) -> dict[tuple[str, str], tuple[cm.Compute, cm.LineFit | None]]:
    """Per (model, mechanism label): t = fixed + c·(B/P) over the trials' local step times (one B/P: c = t/(B/P))."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for t in trials:
        if math.isfinite(t.step_s):
            groups[(t.model, t.record.mechanism)].append((t.record.global_batch_size / t.workers, local_step_s(t)))
    fits: dict[tuple[str, str], tuple[cm.Compute, cm.LineFit | None]] = {}
    for key, points in groups.items():
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        if len(set(xs)) >= 2:
            fits[key] = cm.fit_compute(xs, ys)
        else:
            fits[key] = (cm.Compute(per_example_s=statistics.median(ys) / xs[0]), None)
    return fits
