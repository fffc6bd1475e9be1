"""The calibration of a shaped link, as on a cluster: timed gloo all-reduces across it, fitted t = 2α + bytes/β.

Rank 0 in the root namespace, rank 1 in the link's namespace (``tests/netlink.py``), each a
``python -m bench.shaped_calibration SPEC`` process; P = 2, sizes 1 KB–16 MB a factor of 4 apart, capped at
``MAX_TRANSFER_S`` a transfer at the slow rates; the fit is ``raygd.costmodel.fit_link_regimes`` (β from the
≥ 1 MB transfers, α from the ≤ 4 KB ones), with the ordinary and the relative least-squares fits beside it.
Used by ``bench.shaped_link`` and ``bench.shaped_paper``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.pairing import SAY
from raygd import costmodel as cm

REPO = Path(__file__).resolve().parents[1]
SIZES = tuple(1 << k for k in range(10, 25, 2))
"""1 KB … 16 MB, a factor of 4 apart."""
MAX_TRANSFER_S = 2.0
"""Calibration sizes above ~this many seconds at a rate are left out (16 MB at 1 Mbit/s would take 2 min)."""


def _collective_worker(spec: dict) -> None:
    """One rank of the calibration (run in each namespace): median-free raw times of each size, rank 0 writes."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR=spec["master"], MASTER_PORT=str(spec["port"]), GLOO_SOCKET_IFNAME=spec["ifname"])
    dist.init_process_group("gloo", rank=spec["rank"], world_size=2)
    try:
        times: dict[int, list[float]] = {}
        for size in spec["sizes"]:
            t = torch.ones(size // 4)
            dist.all_reduce(t)  # warm-up: connection buffers, TCP windows
            runs = []
            for _ in range(spec["reps"]):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                runs.append(time.perf_counter() - t0)
            times[size] = runs
        if spec["rank"] == 0:
            Path(spec["out"]).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def time_collectives(link, sizes: list[int], reps: int) -> dict[int, list[float]]:
    """All-reduce times of each size across ``link`` (rank 0 in the root namespace, rank 1 in the link's)."""
    from tests.localray import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        base = {"master": link.host_ip, "port": free_port(), "sizes": sizes, "reps": reps, "out": str(out)}
        procs = []
        for rank, ifname, prefix in (
            (0, link.host_dev, []),
            (1, link.node_dev, ["ip", "netns", "exec", link.namespace]),
        ):
            spec = json.dumps({**base, "rank": rank, "ifname": ifname})
            cmd = [*prefix, sys.executable, "-m", "bench.shaped_calibration", spec]
            procs.append(subprocess.Popen(cmd, cwd=REPO))
        codes = [p.wait(timeout=900) for p in procs]
        if any(codes):
            raise RuntimeError(f"calibration ranks exited with {codes}")
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


@dataclass
class Calibration:
    """One rate's timed collectives and their fit t = 2α + bytes/β (``costmodel.fit_link_regimes``)."""

    rate_mbit: float | None
    sizes: list[int]
    medians: list[float]
    spread: list[tuple[float, float]]
    link: cm.Link
    fit: cm.LineFit
    ordinary: cm.Link
    """The ordinary least-squares fit over all sizes, for comparison (its α is set by the largest transfers' noise)."""
    relative: cm.Link
    """The fit on relative residuals (1/t² weights), for comparison (the small transfers' noise bends its β)."""

    @property
    def fitted_mbit(self) -> float:
        return self.link.bandwidth_bytes_per_s * 8 / 1e6

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"tbf {self.rate_mbit:g} Mbit/s"
        model = ""
        if self.rate_mbit is not None:
            goodput = cm.shaped_link(self.rate_mbit).bandwidth_bytes_per_s * 8 / 1e6
            model = f" = {self.fitted_mbit / self.rate_mbit:.3f} × rate (shaped_link: {goodput / self.rate_mbit:.3f})"
        residuals = ", ".join(
            f"{_size(s)} {r / m:+.0%}" for s, r, m in zip(self.sizes, self.fit.residuals, self.medians, strict=True)
        )
        return (
            f"- {rate}: β = {self.fitted_mbit:.1f} Mbit/s{model}, α = {self.link.latency_s * 1e6:.0f} µs "
            f"(ordinary least squares: {_link(self.ordinary)}; relative: {_link(self.relative)}); "
            f"relative residuals {residuals}"
        )

    def times(self) -> str:
        """Median (min–max) milliseconds per size."""
        return ", ".join(
            f"{_size(s)} {m * 1e3:.3g} ({lo * 1e3:.3g}–{hi * 1e3:.3g})"
            for s, m, (lo, hi) in zip(self.sizes, self.medians, self.spread, strict=True)
        )


def _link(link: cm.Link) -> str:
    return f"{link.bandwidth_bytes_per_s * 8 / 1e6:.1f} Mbit/s, {link.latency_s * 1e6:.0f} µs"


def _size(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB"


def fitted(rate: float | None, sizes: list[int], medians: list[float], spread: list) -> Calibration:
    """One rate's fit (``costmodel.fit_link_regimes``: β from the ≥ 1 MB transfers, α from the ≤ 4 KB ones)."""
    moved = [cm.link_bytes(s, 2) for s in sizes]
    link, fit = cm.fit_link_regimes(moved, medians, terms=2)
    ordinary, _ = cm.fit_link(moved, medians, terms=2)
    relative, _ = cm.fit_link(moved, medians, terms=2, relative=True)
    return Calibration(rate, sizes, medians, [tuple(x) for x in spread], link, fit, ordinary, relative)


def calibrate(link, rates: list[float | None], sizes: tuple[int, ...], reps: int) -> list[Calibration]:
    """Time and fit every rate (``None``: unshaped), each on the same link reshaped."""
    out = []
    for rate in rates:
        link.set_rate(rate)
        cap = [s for s in sizes if rate is None or s * 8 / (rate * 1e6) <= MAX_TRANSFER_S]
        times = time_collectives(link, cap, reps)
        medians = [statistics.median(times[s]) for s in cap]
        out.append(fitted(rate, cap, medians, [(min(times[s]), max(times[s])) for s in cap]))
        SAY(out[-1].describe())
    return out


def calibration_lines(calibrations: list[Calibration], reps: int, load: str) -> list[str]:
    return [
        f"## Calibration: gloo all-reduce across the link (P = 2), median of {reps}, fitted t = 2α + bytes/β",
        "",
        "β from the transfers of ≥ 1 MB (least squares; the two largest at the slow rates), α from those of"
        f" ≤ 4 KB (median of (t − bytes/β)/2): `costmodel.fit_link_regimes`; {load}.",
        "",
        *[c.describe() for c in calibrations],
        "",
        "Times, ms: median (min–max):",
        "",
        *[f"- {'unshaped' if c.rate_mbit is None else f'{c.rate_mbit:g} Mbit/s'}: {c.times()}" for c in calibrations],
        "",
    ]


if __name__ == "__main__":
    _collective_worker(json.loads(sys.argv[1]))
