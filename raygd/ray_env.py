"""The Ray environment raygd runs in: joining or starting Ray, and what it offers.

``ensure_ray`` starts local Ray (or joins ``$RAY_ADDRESS``) once per process with the settings
raygd's runs rely on; ``check_ray_address`` rejects an unusable ``$RAY_ADDRESS`` before any
work starts; ``use_gpu`` decides between CUDA + NCCL and CPU + gloo.
"""

from __future__ import annotations

import os


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
        raise ConfigError(
            f"RAY_ADDRESS = {address!r} is invalid: use host:port of the head node's GCS "
            "(e.g. 10.0.0.5:6379), ray://host:10001 for Ray Client, or auto; unset it for local Ray."
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(
            f"RAY_ADDRESS = {address!r} cannot be reached ({err}): start the cluster "
            "(`ray start --head` or `ray up cluster/aws.yaml`), forward its port, or unset "
            "RAY_ADDRESS to run on local Ray."
        ) from None


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


def use_gpu(device: str) -> bool:
    """Whether to train on GPUs: ``train.device`` and what the connected Ray cluster offers."""
    if device == "cpu":
        return False
    import ray

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if device == "cuda" and gpus == 0:
        raise RuntimeError("train.device = 'cuda' but Ray sees no GPU: use train.device=auto or cpu.")
    return gpus > 0
