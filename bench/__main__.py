"""``make bench``: the benches whose figures docs/BENCHMARKS.md quotes, one after the other, into one file.

Each bench runs as ``python -m bench.<name>`` in a process of its own with a time limit; its output
(tables, the load average, the commit) goes to the terminal and to ``bench/out/bench.md`` under a
header with the commit, the date and the command. About 45 minutes on an idle 2-core machine; the
limits below add up to 70, for a busy one. A bench that fails or runs out of time is marked so in
the file and the others still run; the exit status says whether all of them finished.

    .venv/bin/python -m bench                           # all of them -> bench/out/bench.md
    .venv/bin/python -m bench --only throughput --out /tmp/bench.md
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.pairing import LoadAverage, provenance

OUT = Path(__file__).resolve().parent / "out" / "bench.md"
BENCHES = {
    # name: (README section, arguments, time limit in s; about half of it on an idle 2-core machine)
    "throughput": ("Throughput", ["--windows", "2"], 1200),
    "diversity_overhead": ("Diversity overhead", [], 600),
    # 8 trials a sweep since grid edges are extended (#14): ~3.5 min a pair, 5 pairs took over 1200 s
    "sweep_overhead": ("Sweep start-up", ["--ab", "pool", "--pairs", "5"], 1800),
    "sweep_efficiency": ("Early stopping", [], 600),
    "eval_cost": ("Evaluation cost", [], 300),
    "metric_logging": ("Metric logging", [], 300),
    "mechanism_cost": ("Mechanisms on a transformer", [], 300),
}


def run(name: str, args: list[str], limit_s: int) -> tuple[str, str]:
    """Run one bench; its output and a one-line outcome. Output is echoed as it comes."""
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lines, start = [], time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True) as proc:
        # The bench and the local Ray it started share its session: one signal ends them all.
        watchdog = threading.Timer(limit_s, os.killpg, (proc.pid, signal.SIGKILL))
        watchdog.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
        watchdog.cancel()
    took = time.perf_counter() - start
    if proc.returncode == 0:
        outcome = f"finished in {took:.0f} s"
    elif took >= limit_s:
        outcome = f"**stopped at its limit of {limit_s} s**"
    else:
        outcome = f"**failed (exit {proc.returncode}) after {took:.0f} s**"
    return "".join(lines), outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="these benches only")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    names = args.only or list(BENCHES)
    load = LoadAverage()
    header = f"# raygd benchmarks\n\n`make bench` ({', '.join(names)}): {provenance()}.\n"
    sections, ok = [], True
    for name in names:
        title, bench_args, limit_s = BENCHES[name]
        command = " ".join(["python -m", f"bench.{name}", *bench_args])
        print(f"\n=== {title}: {command} (limit {limit_s} s)", flush=True)
        output, outcome = run(name, bench_args, limit_s)
        ok = ok and outcome.startswith("finished")
        sections.append(f"\n## {title}: `{command}`\n\n{outcome}.\n\n{output.strip()}\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + "".join(sections) + f"\nWhole run: {load}.\n")
    print(f"\nwrote {args.out}; whole run: {load.stop()}")
    args.out.write_text(header + "".join(sections) + f"\nWhole run: {load}.\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
