"""Named cluster profiles for ``raygd project``: network links and accelerator compute, each value cited.

A profile is a link plus a compute: ``PROFILES[name] = (link name, compute name)``. Compute
``measured`` means this machine's per-example time, fitted from the sweep's own step times; a
named accelerator turns the model's counted FLOPs into seconds at ``peak_tflops`` × ``utilisation``.
Peak figures are vendors' published numbers; utilisation and the fixed per-step cost are
assumptions (small models use a fraction of a GPU), said so here and in every projection's output.
Override any of it with explicit figures (``raygd project --bandwidth-gbps ... --latency-us ...``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_gbps: float
    latency_us: float
    source: str


@dataclass(frozen=True)
class ComputeProfile:
    peak_tflops: float
    """Peak FP32 TFLOP/s (vendor datasheet)."""
    utilisation: float
    """Assumed fraction of the peak a training step achieves."""
    fixed_ms: float
    """Assumed fixed cost per update (kernel launches, optimizer step, data loading)."""
    source: str


LINKS: dict[str, LinkProfile] = {
    "ec2-1g": LinkProfile(
        1.0,
        130.0,
        "The paper's era of EC2 (m4-class, 'High' network, about 1 Gbit/s): "
        "https://aws.amazon.com/ec2/previous-generation/ ; one-way latency ≈ half the 0.20–0.26 ms "
        "ping RTT measured within one availability zone, "
        "http://orensol.com/2009/05/24/network-latency-inside-and-across-amazon-ec2-availability-zones/",
    ),
    "ec2-10g": LinkProfile(
        10.0,
        50.0,
        "EC2 c5.9xlarge / m5.12xlarge: 10 Gbit/s, https://aws.amazon.com/ec2/instance-types/c5/ ; "
        "latency: ~100 µs same AZ, ~35 µs same cluster placement group (reported measurements, "
        "https://recapio.com/digest/reduce-aws-latency-by-200x-drop-from-7ms-to-35ms-by-anton-putra), 50 µs taken",
    ),
    "ec2-25g": LinkProfile(
        25.0,
        35.0,
        "EC2 p3.16xlarge (8 V100): 25 Gbit/s, https://aws.amazon.com/ec2/instance-types/p3/ ; "
        "35 µs: same cluster placement group (reported measurement, link as for ec2-10g)",
    ),
    "ec2-100g": LinkProfile(
        100.0,
        35.0,
        "EC2 c5n.18xlarge / p3dn.24xlarge: 100 Gbit/s, https://aws.amazon.com/ec2/instance-types/c5/ ; "
        "35 µs as for ec2-25g",
    ),
    "ec2-400g-efa": LinkProfile(
        400.0,
        15.0,
        "EC2 p4d.24xlarge (8 A100): 400 Gbit/s EFA, https://aws.amazon.com/ec2/instance-types/p4/ ; "
        "15 µs: EFA's OS-bypass latency is an assumption (no figure published on that page)",
    ),
}

COMPUTES: dict[str, ComputeProfile] = {
    "v100": ComputeProfile(
        15.7,
        0.3,
        1.0,
        "NVIDIA V100 SXM2 FP32 15.7 TFLOP/s, https://www.nvidia.com/en-us/data-center/v100/ ; "
        "utilisation 0.3 and 1 ms per update assumed",
    ),
    "a100": ComputeProfile(
        19.5,
        0.3,
        1.0,
        "NVIDIA A100 FP32 19.5 TFLOP/s, https://www.nvidia.com/en-us/data-center/a100/ ; "
        "utilisation 0.3 and 1 ms per update assumed",
    ),
    "h100": ComputeProfile(
        67.0,
        0.3,
        1.0,
        "NVIDIA H100 SXM FP32 67 TFLOP/s, https://www.nvidia.com/en-us/data-center/h100/ ; "
        "utilisation 0.3 and 1 ms per update assumed",
    ),
}

MEASURED = "measured"
"""Compute as measured on this machine (fitted from the sweep's step times)."""

PROFILES: dict[str, tuple[str, str]] = {
    "paper-ec2": ("ec2-1g", MEASURED),
    "ec2-10g": ("ec2-10g", MEASURED),
    "p3-v100-25g": ("ec2-25g", "v100"),
    "c5n-100g": ("ec2-100g", MEASURED),
    "p4d-a100-400g": ("ec2-400g-efa", "a100"),
    "h100-100g": ("ec2-100g", "h100"),
}
