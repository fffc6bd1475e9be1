"""raygd's benchmarks, run as modules from the repository root: ``python -m bench.throughput``.

``bench.pairing`` holds what every bench that prints a ratio shares: A and B interleaved,
the median of the paired ratios with their range, and the load average during the run.
"""
