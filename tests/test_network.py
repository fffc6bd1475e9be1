"""Tests for raygd/network.py: the emulated link changes time only, by what the cost model says.

Real 2-process gloo groups (tests/dist.py), logistic regression on synthetic data, no Ray.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from raygd import costmodel
from raygd.config import ConfigError, load_run_config
from raygd.data import load_data
from raygd.loop import build_state, train_step
from tests.dist import run_group

SLOW = "train.network={bandwidth_gbps: 0.001, latency_us: 4000, topology: ring}"
"""0.125 MB/s and 4 ms: a 1.3 kB logreg gradient takes 2·4 ms + 1.3 kB / 0.125 MB/s ≈ 18.6 ms per update."""


def _cfg(*overrides):
    return load_run_config(
        None,
        [
            "data.name=synthetic",
            "data.synthetic_size=512",
            "train.model=logreg",
            "train.num_workers=2",
            "train.global_batch_size=32",
            "train.step_size=0.2",
            "train.diversity_estimator=none",  # the free estimator all-reduces outside DDP on its measured steps
            *overrides,
        ],
    )


def _steps(rank, world_size, cfg, data, steps):
    """Train ``steps`` updates; the final weights, each step's seconds and the emulation's totals."""
    torch.set_num_threads(1)
    state = build_state(cfg, data, rank, world_size)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        train_step(state, step)
        times.append(time.perf_counter() - t0)
    link = getattr(state.net, "emulated_link", None)
    totals = None if link is None else (link.waited_s, link.modelled_s, link.collectives)
    return {k: v.clone() for k, v in state.model.state_dict().items()}, times, totals


def _both(rank, world_size, plain_cfg, net_cfg, data, steps):
    """The same steps without and with the emulated link, interleaved in one process group."""
    return _steps(rank, world_size, plain_cfg, data, steps), _steps(rank, world_size, net_cfg, data, steps)


PS = "train.network={bandwidth_gbps: 0.01, latency_us: 500, topology: parameter_server}"


@pytest.mark.parametrize(
    ("mechanism", "network", "payload", "collective", "topology", "link"),
    [
        ("vanilla", SLOW, lambda n: 4 * n, "all_reduce", "ring", (0.001, 4000)),
        ("quantize", SLOW, lambda n: n + 4 * -(-n // 512), "all_gather", "ring", (0.001, 4000)),
        ("vanilla", PS, lambda n: 4 * n, "all_reduce", "parameter_server", (0.01, 500)),
    ],
)
def test_emulated_link_leaves_weights_bitwise_equal(mechanism, network, payload, collective, topology, link):
    """Weights bitwise equal with and without the link, on both ranks; the wait is the cost model's for the
    payload the mechanism's hook really sends (QSGD: int8 levels + one float32 norm per 512, gathered)."""
    cfg = _cfg(f"mechanism.name={mechanism}")
    data = load_data(cfg.data, 0)
    steps = 12
    ranks = run_group(_both, 2, cfg, _cfg(f"mechanism.name={mechanism}", network), data, steps)
    n = sum(v.numel() for v in ranks[0][0][0].values())
    per_update = costmodel.comm_time(payload(n), 2, costmodel.Link.from_gbps_us(*link), topology, collective)
    for (plain_w, _, none), (net_w, _, totals) in ranks:
        assert none is None and totals is not None
        waited, modelled, collectives = totals
        assert collectives == steps  # one bucket per update
        assert modelled == pytest.approx(steps * per_update)
        assert modelled * 0.999 <= waited < modelled * 1.5  # plus the sleeps' overshoot (wake-up latency)
        for name, value in plain_w.items():
            assert torch.equal(net_w[name], value), name
    initial = build_state(cfg, data).model.state_dict()
    assert not torch.equal(ranks[0][0][0]["linear.weight"], initial["linear.weight"])  # the weights moved


def test_added_time_per_step_matches_the_model():
    """The same fixed-size step with and without a ~50 ms link: the medians of 30 steps each differ by the
    modelled transfer within 10% (a long transfer, so the shared machine's jitter of a few ms stays small)."""
    cfg = _cfg()
    data = load_data(cfg.data, 0)
    network = "train.network={bandwidth_gbps: 0.001, latency_us: 20000, topology: ring}"
    (plain, timed), _ = run_group(_both, 2, cfg, _cfg(network), data, 30)
    params = sum(v.numel() for v in plain[0].values())
    modelled = costmodel.comm_time(
        costmodel.payload_bytes(params), 2, costmodel.Link.from_gbps_us(0.001, 20000), "ring", "all_reduce"
    )
    assert modelled == pytest.approx(2 * 20e-3 + 4 * params / 125_000)
    added = statistics.median(timed[1][2:]) - statistics.median(plain[1][2:])
    assert added == pytest.approx(modelled, rel=0.10), (plain[1], timed[1], modelled)


def test_overlap_hides_up_to_the_compute_time():
    assert costmodel.exposed_comm(0.02, 0.005, 1.0) == pytest.approx(0.015)
    assert costmodel.exposed_comm(0.02, 0.005, 0.0) == pytest.approx(0.02)
    assert costmodel.exposed_comm(0.002, 0.005, 1.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.network={bandwidth_gbps: 0}", "train.network.bandwidth_gbps"),
        ("train.network={latency_us: -1}", "train.network.latency_us"),
        ("train.network={topology: star}", "train.network.topology"),
        ("train.network={overlap: 1.5}", "train.network.overlap"),
        ("train.network={speed: 1}", "train.network.speed"),
        ("train.network=fast", "train.network"),
    ],
)
def test_bad_network_config_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg(override)


def test_network_params_flatten_and_round_trip():
    cfg = _cfg("train.network={bandwidth_gbps: 2.5, latency_us: 30}")
    flat = cfg.flat()
    assert flat["train.network.bandwidth_gbps"] == 2.5 and flat["train.network.topology"] == "ring"
    assert "train.network" not in flat
    assert type(cfg).from_dict(cfg.to_dict()).train.network == cfg.train.network
    assert _cfg().flat()["train.network"] is None
