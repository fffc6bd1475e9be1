"""raygd.attach (raygd/probe/): the probe on a user's own loop changes nothing and tracks the exact bound.

Tolerance. The probe reports its own standard error (``diversity/batch_bound_se``: the delta method on the
ratio of its moving averages, raygd/probe/smoothing.py). ``test_the_standard_error_is_calibrated`` checks it
against the spread of the estimator over 200 independent runs of the same estimator on known per-example
gradients: the mean SE is within 0.8-1.25x the empirical spread, the mean within 3% of the truth, and at
most 3% of the runs fall outside 3 SE. The estimator tests then run at a fixed w (step size 1e-7) with
``decay=0.98`` (about 99 effective updates, where the delta method is calibrated; at the default 0.9 it is
19 and the SE runs ~15% low) and ask for |online − exact| <= 3 SE, with the SE below 15% of the value so
that the test is not vacuous. Seeds are fixed, so each run is deterministic.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import raygd
from raygd.diversity import gradient_diversity, in_step_moments, two_batch_moments
from raygd.probe import CommHookConflict
from raygd.probe.smoothing import SmoothedBound
from tests.dist import run_group

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "attach" / "train_fashion_mnist.py"
N, D_IN, CLASSES, B = 600, 20, 5, 64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(D_IN, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(N, D_IN, generator=g), torch.randn(D_IN, CLASSES, generator=g)
    return x, (x @ w + 2.0 * torch.randn(N, CLASSES, generator=g)).argmax(1)


def _train(net, x, y, steps, lr, rank=0, world_size=1, seed=2):
    """The user's loop: B examples without replacement per update, each rank its B/P, mean loss, SGD."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    g, b = torch.Generator().manual_seed(seed), B // world_size
    for _ in range(steps):
        mine = torch.randperm(len(x), generator=g)[:B][rank * b : (rank + 1) * b]
        loss = nn.functional.cross_entropy(net(x[mine]), y[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _weights(net) -> dict[str, torch.Tensor]:
    module = net.module if isinstance(net, DDP) else net
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + ("forward" in m.__dict__)
        for m in model.modules()
    )


def _within_tolerance(metrics: dict[str, float], exact: float, largest_se: float = 0.15) -> None:
    bound, se = metrics["diversity/batch_bound"], metrics["diversity/batch_bound_se"]
    assert 0 < se < largest_se * bound, metrics
    assert abs(bound - exact) <= 3 * se, f"online {bound:.2f} ± {se:.2f}, exact {exact:.2f}"


# --------------------------------------------------------------------------- the tolerance, justified


def test_the_standard_error_is_calibrated():
    """200 runs of 300 measured updates on fixed per-example gradients (B_D known): the reported SE matches
    the spread of the estimate, for the free estimator (P = 2) and the in-step one."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(N, 10, generator=g, dtype=torch.float64) + 0.12  # B_D = n Σ‖g_i‖² / ‖Σ g_i‖²
    truth = N * float(grads.square().sum()) / float(grads.sum(0).square().sum())
    runs, steps, b = 200, 300, B // 2
    gen, free, in_step = torch.Generator().manual_seed(1), [], []
    for _ in range(steps):  # every run's batch of this step at once: [runs, B, d], drawn without replacement
        batches = grads[torch.rand(runs, N, generator=gen).argsort(-1)[:, :B]]
        parts = batches.view(runs, 2, b, -1).mean(2)
        free.append((parts.square().sum(-1).mean(-1), parts.mean(1).square().sum(-1)))  # mean ‖G_b‖², ‖G_B‖²
        in_step.append((batches.square().sum((-1, -2)), batches.sum(1).square().sum(-1)))  # Σ‖g_i‖², ‖Σ g_i‖²
    for kind, per_step in (("free", free), ("in_step", in_step)):
        first, second = (torch.stack(t) for t in zip(*per_step, strict=True))
        estimates, errors = [], []
        for run in range(runs):
            smoothing = SmoothedBound(0.98)
            for u, v in zip(first[:, run].tolist(), second[:, run].tolist(), strict=True):
                moments = two_batch_moments(u, b, v, B, N) if kind == "free" else in_step_moments(u, v, B, N)
                smoothing.update(moments)
            estimates.append(smoothing.value.batch_bound)
            errors.append(smoothing.standard_error())
        spread, se = statistics.stdev(estimates), statistics.mean(errors)
        outside = sum(abs(e - truth) > 3 * s for e, s in zip(estimates, errors, strict=True)) / runs
        assert 0.8 <= se / spread <= 1.25, (kind, se, spread)
        assert statistics.mean(estimates) == pytest.approx(truth, rel=0.03), kind
        assert outside <= 0.03, (kind, outside)


# --------------------------------------------------------------------------- plain DDP, P = 2 (gloo, no Ray)


def _plain_ddp(rank, world_size):
    torch.set_num_threads(1)
    x, y = _data()
    out = {}
    # 50 updates with and without the probe (default every=10), same batches: the same weights, bit for bit
    with_probe, without = DDP(_mlp()), DDP(_mlp())
    probe = raygd.attach(with_probe, n=N)
    _train(with_probe, x, y, 50, 0.05, rank, world_size)
    _train(without, x, y, 50, 0.05, rank, world_size)
    out["identical"] = all(
        torch.equal(a, b) for a, b in zip(_weights(with_probe).values(), _weights(without).values(), strict=True)
    )
    out["default"] = probe.metrics()
    out["estimator"] = probe.estimator
    probe.detach()
    out["hooks_left"] = _hooks_left(with_probe)
    out["comm_hooks"] = len(with_probe._comm_hooks)
    _train(with_probe, x, y, 5, 0.05, rank, world_size, seed=3)  # after detach: a pass-through, still DDP's sum
    _train(without, x, y, 5, 0.05, rank, world_size, seed=3)
    out["identical_after_detach"] = all(
        torch.equal(a, b) for a, b in zip(_weights(with_probe).values(), _weights(without).values(), strict=True)
    )
    again = raygd.attach(with_probe, n=N)  # the slot is reused
    out["reattached"] = again.estimator
    again.detach()
    # at a fixed w: every update measured, against the exact bound at the same weights
    fixed = DDP(_mlp())
    probe = raygd.attach(fixed, n=N, every=1, decay=0.98)
    _train(fixed, x, y, 200, 1e-7, rank, world_size)
    out["fixed"] = probe.metrics()
    out["exact"] = probe.exact((x, y), dtype=torch.float64).batch_bound
    out["exact_shards"] = probe.exact((x[rank::2], y[rank::2]), dtype=torch.float64, across_ranks=True).batch_bound
    return out


def test_on_a_plain_ddp_the_probe_changes_no_weight_and_tracks_the_exact_bound():
    rank0, rank1 = run_group(_plain_ddp, 2)
    assert rank0["estimator"] == "free" and rank0["reattached"] == "free"
    assert rank0["identical"] and rank0["identical_after_detach"]
    assert rank0["default"] == rank1["default"] and rank0["default"]["diversity/measured_updates"] == 5
    assert rank0["hooks_left"] == 0 and rank0["comm_hooks"] == 1  # DDP cannot unregister: a pass-through
    assert rank0["fixed"] == rank1["fixed"] and rank0["fixed"]["diversity/measured_updates"] == 200
    assert rank0["fixed"]["diversity/delta"] == pytest.approx(rank0["fixed"]["diversity/batch_bound"] / N)
    assert rank0["exact_shards"] == pytest.approx(rank0["exact"], rel=1e-9)  # two halves summed = all n
    _within_tolerance(rank0["fixed"], rank0["exact"])


def _counting_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state["calls"] += 1
    return allreduce_hook(None, bucket)


def _comm_hooks(rank, world_size):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from raygd.mechanisms.quantize import Quantize

    torch.set_num_threads(1)
    x, y = _data()
    out = {}
    registered_first = DDP(_mlp())
    registered_first.register_comm_hook(None, allreduce_hook)
    with pytest.raises(CommHookConflict) as err:
        raygd.attach(registered_first)
    out["before"] = str(err.value)
    # a hook registered after attach runs inside the probe's: same weights as the hook alone
    composed, alone = DDP(_mlp()), DDP(_mlp())
    mine, theirs = {"calls": 0}, {"calls": 0}
    raygd.attach(composed, n=N, every=2)
    composed.register_comm_hook(mine, _counting_hook)
    alone.register_comm_hook(theirs, _counting_hook)
    _train(composed, x, y, 20, 0.05, rank, world_size)
    _train(alone, x, y, 20, 0.05, rank, world_size)
    out["calls"] = (mine["calls"], theirs["calls"])
    out["identical"] = all(
        torch.equal(a, b) for a, b in zip(_weights(composed).values(), _weights(alone).values(), strict=True)
    )
    with pytest.raises(CommHookConflict) as err:
        composed.register_comm_hook(None, allreduce_hook)
    out["second"] = str(err.value)
    with pytest.raises(CommHookConflict) as err:
        composed._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    out["builtin"] = str(err.value)
    # QSGD at 2 levels (rounding noise several times the mean gradient): the bound is the plain gradient's
    model = _mlp()
    qsgd = Quantize(levels=2, bucket_size=512)
    model = qsgd.setup(model, seed=0, rank=rank, world_size=world_size, global_batch_size=B, device=torch.device("cpu"))
    quantized = DDP(model)
    probe = raygd.attach(quantized, n=N, every=1, decay=0.98)
    qsgd.attach_ddp(quantized)  # registers QSGD's hook: composed inside the probe's
    _train(quantized, x, y, 200, 1e-7, rank, world_size)
    out["qsgd"] = probe.metrics()
    out["qsgd_bytes"] = qsgd.metrics()["comm/bytes_ratio"]
    out["exact"] = probe.exact((x, y), dtype=torch.float64).batch_bound
    return out


def test_a_second_comm_hook_is_composed_or_refused_with_what_to_do():
    out, _ = run_group(_comm_hooks, 2)
    assert "registered before attach" in out["before"] and "comm_hook=(state, hook)" in out["before"]
    assert out["calls"][0] == out["calls"][1] > 0 and out["identical"]
    assert "already runs inside raygd's probe hook" in out["second"] and "_counting_hook" in out["second"]
    assert "FP16_COMPRESS" in out["builtin"] and "fp16_compress_hook" in out["builtin"]
    assert out["qsgd_bytes"] < 0.3  # the int8 hook did run
    # QSGD's rounding noise (its variance several times ‖G‖² at 2 levels) adds to the estimator's own: a wider SE
    _within_tolerance(out["qsgd"], out["exact"], largest_se=0.6)


# --------------------------------------------------------------------------- P = 1, an unwrapped module


def test_at_one_worker_the_in_step_probe_changes_no_weight_and_tracks_the_exact_bound():
    from raygd.models import MnistCNN

    torch.manual_seed(0)
    x, y = torch.randn(320, 1, 28, 28), torch.randint(0, 10, (320,))
    nets = []
    for attached in (True, False):
        torch.manual_seed(0)
        net = MnistCNN(widths=(8, 16, 32))
        probe = raygd.attach(net, n=320) if attached else None
        _train(net, x, y, 50, 0.05)
        nets.append(net)
        if probe is not None:
            assert probe.estimator == "in_step" and probe.metrics()["diversity/measured_updates"] == 5
            probe.detach()
            assert _hooks_left(net) == 0
    # GhostNorms' fused convolution would move the weight gradient by a rounding error; the hooks do not
    assert all(torch.equal(a, b) for a, b in zip(_weights(nets[0]).values(), _weights(nets[1]).values(), strict=True))

    x, y = _data()
    net = _mlp()
    probe = raygd.attach(net, n=N, every=1, decay=0.98)
    _train(net, x, y, 300, 1e-7)
    _within_tolerance(probe.metrics(), probe.exact((x, y), dtype=torch.float64).batch_bound)


def test_at_one_worker_batchnorm_is_refused_unless_the_probe_only_measures_exactly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
    with pytest.raises(ValueError, match=r"BatchNorm1d.*every=0"):
        raygd.attach(model)
    probe = raygd.attach(model, every=0)
    x, y = _data()
    assert probe.metrics() == {} and probe.estimator == "none"
    assert probe.exact((x, y)).batch_bound > 1 and model.training  # exact ran in eval mode and restored it


# --------------------------------------------------------------------------- exact


def test_exact_takes_tensors_or_a_loader_and_a_loss_of_the_users_own_and_touches_nothing():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data()
    net = _mlp()
    net(x[:8]).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    reference = gradient_diversity(net, x, y, dtype=torch.float64)  # before attach: a forward with gradients counts
    probe = raygd.attach(net, n=N)
    by_tensors = probe.exact((x, y), dtype=torch.float64)
    by_loader = probe.exact(DataLoader(TensorDataset(x, y), batch_size=50), dtype=torch.float64)
    by_loss = probe.exact((x, y), nn.CrossEntropyLoss(), dtype=torch.float64)  # torch.func, mean reduction
    first = probe.exact(DataLoader(TensorDataset(x, y), batch_size=64), max_examples=100)
    assert by_tensors.batch_bound == pytest.approx(reference.batch_bound, rel=1e-12)
    assert by_loader.batch_bound == pytest.approx(reference.batch_bound, rel=1e-12)
    assert by_loss.batch_bound == pytest.approx(reference.batch_bound, rel=1e-9)
    assert first.n == 100 and by_tensors.n == N and by_tensors.delta == pytest.approx(by_tensors.batch_bound / N)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters(), strict=True))
    assert probe.metrics()["diversity/measured_updates"] == 0  # exact's passes are not training updates


def test_exact_on_a_sequence_model_counts_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 12))
    ids = torch.randint(0, 12, (40, 6))
    probe = raygd.attach(model)
    default = probe.exact((ids, ids.roll(-1, 1)), dtype=torch.float64)

    def per_sequence(logits, targets):  # the mean over positions, one value per sequence
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)

    assert default.n == 40
    assert probe.exact((ids, ids.roll(-1, 1)), per_sequence, dtype=torch.float64).batch_bound == pytest.approx(
        default.batch_bound, rel=1e-9
    )


def test_import_raygd_stays_light_and_attach_is_there():
    code = "import sys, raygd; assert 'torch' not in sys.modules and 'ray' not in sys.modules; print(raygd.attach)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert "function attach" in out.stdout


def test_adascale_gain_runs_from_one_to_b():
    from raygd.probe import adascale_gain

    assert adascale_gain(1.0, 64) == pytest.approx(1.0)
    assert adascale_gain(math.inf, 64) == 64
    assert adascale_gain(65.0, 64) == pytest.approx(65 * 64 / 128)


# --------------------------------------------------------------------------- real Ray: prepare_model, Tune + MLflow


def _ray_loop(config):
    """A user's train_loop_per_worker: a sharded DataLoader and prepare_model, with and without the probe."""
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(1)
    x, y = _data()
    loader = ray.train.torch.prepare_data_loader(DataLoader(TensorDataset(x, y), batch_size=B // 2, shuffle=True))

    def train(model, updates, lr):
        opt, done, epoch = torch.optim.SGD(model.parameters(), lr=lr), 0, 0
        while done < updates:
            loader.sampler.set_epoch(epoch)  # the same batches for every model
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == updates:
                    break
            epoch += 1

    with_probe = ray.train.torch.prepare_model(_mlp())
    probe = raygd.attach(with_probe, n=N)
    train(with_probe, 50, 0.05)
    without = ray.train.torch.prepare_model(_mlp())
    train(without, 50, 0.05)
    ray.train.report({"updates": 50, **probe.metrics()})
    fixed = ray.train.torch.prepare_model(_mlp())
    at_w = raygd.attach(fixed, n=N, every=1, decay=0.98)
    train(fixed, 200, 1e-7)
    identical = all(
        torch.equal(a, b) for a, b in zip(_weights(with_probe).values(), _weights(without).values(), strict=True)
    )
    return {
        "type": type(with_probe).__name__,
        "estimator": probe.estimator,
        "identical": identical,
        "metrics": at_w.metrics(),
        "exact": at_w.exact((x, y), dtype=torch.float64).batch_bound,
        "exact_of_shards": at_w.exact(loader, dtype=torch.float64, across_ranks=True).batch_bound,
    }


def test_on_a_model_from_prepare_model_the_probe_changes_no_weight_and_tracks_the_exact_bound(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_loop,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=str(tmp_path), name="attach"),
    )
    out = trainer.fit().return_value
    assert out["type"] == "DistributedDataParallel" and out["estimator"] == "free" and out["identical"]
    assert out["exact_of_shards"] == pytest.approx(out["exact"], rel=1e-9)  # the sharded loader covers all n
    _within_tolerance(out["metrics"], out["exact"])


def _tune_trial(config):
    """A Tune trial as Ray Train V2 wants it: a function that fits a TorchTrainer over the example's own loop."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from examples.attach.train_fashion_mnist import train_func_per_worker

    TorchTrainer(
        train_func_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(storage_path=config["storage"], callbacks=[TuneReportCallback()]),
    ).fit()


def test_the_metrics_reach_tune_and_mlflow_through_the_users_own_report(ray_session, tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    config = {"lr": 1e-3, "epochs": 2, "batch_size_per_worker": 16, "smoke_test": True, "storage": str(tmp_path)}
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, {"cpu": 0, "memory": 2**20}),  # the trial only waits on its two workers
        param_space=config,
        run_config=tune.RunConfig(
            storage_path=str(tmp_path),
            name="attach-tune",
            callbacks=[MLflowLoggerCallback(tracking_uri=sqlite_uri, experiment_name="attach")],
        ),
    )
    result = tuner.fit()[0]
    assert result.error is None, result.error
    assert result.metrics is not None and result.metrics["diversity/measured_updates"] == 4  # 32 updates, every 10
    assert math.isfinite(result.metrics["diversity/batch_bound"])
    client = MlflowClient(sqlite_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attach").experiment_id])
    history = client.get_metric_history(run.info.run_id, "diversity/batch_bound")
    assert [m.value for m in history][-1] == pytest.approx(result.metrics["diversity/batch_bound"])
    assert len(history) == 2  # one report per epoch, as the loop sends them


def test_the_example_runs_as_written_at_its_smoke_size(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke-test"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "epoch 1: loss" in log and "4 of 32 updates measured" in log and "exact B_D on 256 training examples" in log
