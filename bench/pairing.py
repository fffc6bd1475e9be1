"""What every bench that prints a ratio shares: A and B interleaved, the median of the paired ratios
with their range, the machine's load average while it ran, and the commit and date of the figures.

On a shared machine a burst of load lands on whatever runs at that moment. Running A and B in turn
(A B, B A, A B, ...: the order reversed every other repetition) and dividing within each repetition
cancels what the two saw alike; the median of those ratios, with their min-max, says how far one
run of the bench can be trusted. The load average beside it says how busy the machine was.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAY = partial(print, flush=True)


def interleave(
    contenders: dict[str, Callable[[], float]], reps: int, warmup: int = 1, progress: Callable[[str], None] | None = SAY
) -> dict[str, list[float]]:
    """Call every contender once per repetition, one at a time, the order reversed every other
    repetition; drop the first ``warmup`` repetitions. Returns each contender's figures by repetition."""
    names = list(contenders)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        order = names if rep % 2 == 0 else names[::-1]
        done = {name: contenders[name]() for name in order}
        if progress:
            tag = "warm-up" if rep < warmup else f"{rep - warmup + 1}/{reps}"
            progress(f"  repetition {tag}: " + ", ".join(f"{n} {done[n]:.4g}" for n in names))
        if rep >= warmup:
            for name in names:
                figures[name].append(done[name])
    return figures


@dataclass(frozen=True)
class Paired:
    """Ratios a_i / b_i of figures measured in the same repetition."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def __str__(self) -> str:
        return f"{self.median:.2f}× ({min(self.ratios):.2f}–{max(self.ratios):.2f})"


def paired(a: list[float], b: list[float]) -> Paired:
    """The ratios of ``a`` to ``b``, repetition by repetition."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired ratios need figures from the same repetitions, got {len(a)} and {len(b)}")
    return Paired(tuple(x / y for x, y in zip(a, b, strict=True)))


class LoadAverage:
    """The 1-minute load average at the start, every ``interval_s`` (a daemon thread) and at the end."""

    def __init__(self, interval_s: float = 5.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._interval_s = interval_s
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> LoadAverage:
        if not self._stop.is_set():
            self._stop.set()
            self.samples.append(os.getloadavg()[0])
        return self

    def __str__(self) -> str:
        s = self.samples
        return (
            f"load average (1 min) {s[0]:.1f} at the start, {s[-1]:.1f} at the end, "
            f"{min(s):.1f}–{max(s):.1f} (median {statistics.median(s):.1f}) on {os.cpu_count()} cores"
        )


def provenance() -> str:
    """Commit (``-dirty`` with uncommitted changes), UTC date and machine, for a figure's caption."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    return f"commit {commit}{dirty}, {now}, {machine}"
