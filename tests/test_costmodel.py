"""Tests for raygd/costmodel.py: byte counts against hand-computed cases, the model's limits, the fits."""

from __future__ import annotations

import itertools
import math

import pytest

from raygd import costmodel as cm

GBIT = 1e9 / 8


def test_payload_bytes_float32_and_qsgd():
    assert cm.payload_bytes(1000) == 4000
    assert cm.payload_bytes(1000, "dropconnect") == 4000
    # QSGD: 1000 int8 levels + ceil(1000 / 512) = 2 float32 norms
    assert cm.payload_bytes(1000, "quantize", 512) == 1000 + 8
    assert cm.payload_bytes(1024, "quantize", 512) == 1024 + 8
    assert cm.payload_bytes(1025, "quantize", 512) == 1025 + 12


@pytest.mark.parametrize(
    ("workers", "topology", "collective", "want_bytes", "want_terms"),
    [
        (1, "ring", "all_reduce", 0, 0),
        (2, "ring", "all_reduce", 1000, 2),  # 2 (P-1)/P = 1 payload, 2 (P-1) = 2 messages
        (4, "ring", "all_reduce", 1500, 6),  # reduce-scatter + all-gather: 6 chunks of 250 bytes
        (8, "ring", "all_reduce", 1750, 14),
        (4, "ring", "all_gather", 3000, 3),  # every rank receives the 3 other payloads
        (4, "parameter_server", "all_reduce", 8000, 2),  # server: 4 pushes in + 4 pulls out
        (4, "parameter_server", "all_gather", 8000, 2),
    ],
)
def test_link_bytes_and_latency_terms_against_hand_counts(workers, topology, collective, want_bytes, want_terms):
    assert cm.link_bytes(1000, workers, topology, collective) == pytest.approx(want_bytes)
    assert cm.latency_terms(workers, topology, collective) == want_terms


def test_ring_vs_parameter_server_at_scale():
    """The ring's per-rank bytes stay below 2 payloads; the server's link carries 2P payloads."""
    for p in (2, 8, 32, 128, 256):
        assert cm.link_bytes(1.0, p, "ring") < 2.0
        assert cm.link_bytes(1.0, p, "parameter_server") == 2.0 * p


def test_comm_time_hand_computed():
    link = cm.Link.from_gbps_us(1.0, 50.0)  # 125 MB/s, 50 µs
    # ring all-reduce of a 4 MB payload at P = 4: 6 · 50 µs + 1.5 · 4e6 / 125e6 s
    assert cm.comm_time(4e6, 4, link) == pytest.approx(6 * 50e-6 + 1.5 * 4e6 / 125e6)
    assert cm.comm_time(4e6, 4, link, buckets=3) == pytest.approx(18 * 50e-6 + 1.5 * 4e6 / 125e6)


def test_bad_topology_and_collective_name_the_allowed_values():
    with pytest.raises(ValueError, match="ring, parameter_server"):
        cm.link_bytes(1.0, 2, "star")
    with pytest.raises(ValueError, match="all_reduce, all_gather"):
        cm.latency_terms(2, "ring", "broadcast")
    with pytest.raises(ValueError, match="overlap"):
        cm.exposed_comm(1.0, 1.0, 1.5)


def _cost(bandwidth_gbps, batch=256, workers=8, overlap=0.0):
    return cm.step_cost(
        batch,
        workers,
        cm.Compute(per_example_s=1e-4, fixed_s=1e-3),
        payload=4 * 3_000_000,
        link=cm.Link.from_gbps_us(bandwidth_gbps, 30.0),
        overlap=overlap,
    )


def test_time_falls_as_bandwidth_rises():
    times = [_cost(bw).total_s for bw in (0.1, 1, 10, 100, 1000)]
    assert all(a > b for a, b in itertools.pairwise(times))
    # 1 Tbit/s: fixed + compute + 14 latencies + 1.75 payloads at 125 GB/s; latency bounds it from below
    assert times[-1] == pytest.approx(1e-3 + 1e-4 * 32 + 14 * 30e-6 + 1.75 * 12e6 / 125e9)


def test_time_is_proportional_to_updates_as_rho_grows():
    """Communication-bound (ρ → ∞): time to accuracy ∝ updates, whatever the batch — the regime where a
    larger B (fewer updates) wins."""
    slow = [_cost(1e-4, batch=b) for b in (64, 256, 1024)]
    assert min(c.rho for c in slow) > 1e3
    per_update = [c.total_s for c in slow]
    assert max(per_update) / min(per_update) == pytest.approx(1.0, abs=2e-3)
    tta = [cm.time_to_accuracy(u, c) for u, c in zip((4000, 1000, 250), slow, strict=True)]
    assert tta[0] / tta[1] == pytest.approx(4.0, rel=2e-3) and tta[1] / tta[2] == pytest.approx(4.0, rel=2e-3)
    assert cm.time_to_accuracy(None, slow[0]) is None


def test_overlap_hides_at_most_the_compute():
    fast, slow = _cost(1000, overlap=1.0), _cost(0.1, overlap=1.0)
    assert fast.total_s == pytest.approx(fast.fixed_s + fast.compute_s)  # comm < compute: fully hidden
    assert slow.total_s == pytest.approx(slow.fixed_s + slow.comm_s)  # compute hidden behind comm
    half = _cost(0.1, overlap=0.5)
    assert half.total_s == pytest.approx(half.fixed_s + half.compute_s + half.comm_s - 0.5 * half.compute_s)


def test_single_worker_has_no_communication():
    c = _cost(0.001, workers=1)
    assert c.comm_s == 0 and c.total_s == pytest.approx(1e-3 + 256e-4)


def test_pass_time():
    c = _cost(10)
    assert cm.pass_time(60_000, 256, c) == pytest.approx(60_000 / 256 * c.total_s)


def test_ddp_buckets():
    assert cm.ddp_buckets(4 * 7850) == 1
    assert cm.ddp_buckets(1024 * 1024 + 1) == 2
    assert cm.ddp_buckets(1024 * 1024 + 25 * 1024 * 1024 + 1) == 3


def test_fits_recover_known_lines_and_report_residuals():
    xs = [16, 32, 64, 128, 256]
    compute, fit = cm.fit_compute(xs, [0.002 + 5e-5 * x for x in xs])
    assert compute.per_example_s == pytest.approx(5e-5) and compute.fixed_s == pytest.approx(0.002)
    assert max(abs(r) for r in fit.residuals) < 1e-12
    sizes = [1e3, 1e4, 1e5, 1e6, 1.6e7]
    noisy = [2 * 40e-6 + s / 2e9 * (1 + 0.01 * (-1) ** i) for i, s in enumerate(sizes)]
    link, fit = cm.fit_link(sizes, noisy, terms=2)
    assert link.latency_s == pytest.approx(40e-6, rel=0.1)
    assert link.bandwidth_bytes_per_s == pytest.approx(2e9, rel=0.02)
    assert 0 < fit.max_relative_residual < 0.05
    with pytest.raises(ValueError, match="distinct"):
        cm.fit_line([1, 1], [2, 3])


def test_a_relative_fit_sets_the_latency_from_the_small_transfers():
    """Proportional noise on a 16 MB transfer (1% of 80 ms) swamps an ordinary fit's intercept (80 µs);
    weighted by 1/y² the small transfers fix it, and the relative residuals shrink."""
    sizes = [1e3, 1e4, 1e5, 1e6, 1.6e7]
    noisy = [2 * 40e-6 + s / 2e8 * (1 + 0.01 * (-1) ** i) for i, s in enumerate(sizes)]
    ordinary, ordinary_fit = cm.fit_link(sizes, noisy, terms=2)
    relative, relative_fit = cm.fit_link(sizes, noisy, terms=2, relative=True)
    assert relative.latency_s == pytest.approx(40e-6, rel=0.05)
    assert abs(ordinary.latency_s - 40e-6) > 4 * abs(relative.latency_s - 40e-6)
    assert relative.bandwidth_bytes_per_s == pytest.approx(2e8, rel=0.02)
    assert relative_fit.max_relative_residual < ordinary_fit.max_relative_residual
    exact = cm.fit_line([1, 2, 3], [3, 5, 7], relative=True)
    assert (exact.intercept, exact.slope) == pytest.approx((1, 2))
    with pytest.raises(ValueError, match="y > 0"):
        cm.fit_line([1, 2], [0, 1], relative=True)


def test_the_two_regime_fit_takes_beta_from_large_transfers_and_alpha_from_small_ones():
    sizes = [1e3, 4e3, 1.6e4, 6.4e4, 1e6, 4e6, 1.6e7]
    true = [2 * 300e-6 + s / 1e7 for s in sizes]
    noisy = [t * (1.6 if s == 1.6e4 else 1.0) for s, t in zip(sizes, true, strict=True)]  # a mid-size outlier
    link, fit = cm.fit_link_regimes(sizes, noisy, terms=2)
    assert link.bandwidth_bytes_per_s == pytest.approx(1e7) and link.latency_s == pytest.approx(300e-6)
    assert fit.predict(6.4e4) == pytest.approx(true[3]) and fit.residuals[2] > 0
    slow, _ = cm.fit_link_regimes(sizes[:4], noisy[:4], terms=2)  # nothing >= 1 MB: the two largest set β
    assert slow.bandwidth_bytes_per_s == pytest.approx((6.4e4 - 1.6e4) / (noisy[3] - noisy[2]))
    with pytest.raises(ValueError, match="fit_link_regimes"):
        cm.fit_link_regimes([1e3, 1e6], [1.0, 2.0])


def test_link_units():
    link = cm.Link.from_gbps_us(8.0, 10.0)
    assert link.bandwidth_bytes_per_s == 1e9 and link.latency_s == pytest.approx(1e-5)
    assert math.isinf(cm.StepCost(0.0, 1.0, 0.0, 0.0).rho)
