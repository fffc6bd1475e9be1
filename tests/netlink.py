"""A real slow network on one machine: two Ray nodes joined by a veth pair whose bandwidth ``tc`` limits.

``ShapedLink`` creates a network namespace of its own, a veth pair with one end in the root namespace and
the other in that namespace, a random /30 of 10.211.0.0/16 on the pair (``.1`` the root end, ``.2`` the
namespace end) and a ``tbf`` qdisc on both ends (each direction at the rate). Nothing else is touched: no
other interface, no route beyond the pair's own /30, no address outside it. Everything it created is removed
when the context ends, also on an exception, at interpreter exit (``atexit``) and on SIGTERM / SIGHUP (a
handler that removes it and then dies of the signal as before); a namespace left by a process killed with
SIGKILL is named after that process (``raygd-<pid>-<tag>``) and removed by the next ``ShapedLink``.

``ShapedRayCluster`` is a ``tests.localray.LocalRayCluster`` over such a link: the head (``--num-cpus=1``)
in the root namespace at ``.1``, one worker node (``--num-cpus=1``) inside the namespace at ``.2``, each
with ``GLOO_SOCKET_IFNAME`` set to its own end of the pair (both hostnames resolve to 127.0.0.1, so gloo
would otherwise dial that) and ``RAYGD_SHAPED_LINK`` set to the rate (``raygd.network`` tags the runs
``shaped``). With P = 2 workers of 1 CPU, Ray Train places one on each node, and DDP's gloo all-reduce
crosses the link over real TCP.

    with ShapedRayCluster(rate_mbit=100) as cluster:
        cluster.start()
        subprocess.run(["raygd", "sweep", ...], env=cluster.driver_env())

Needs root and ``ip`` / ``tc`` (iproute2); ``unavailable()`` says why not, for a test's skip reason.
Requires Linux; ``netem`` (delay, loss) is not used: bandwidth only.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.localray import BIN, READY_LINE, LocalRayCluster, free_port, kill_marked, wait_for_line

SUBNET = ipaddress.ip_network("10.211.0.0/16")
NS_PREFIX = "raygd-"
SHAPED_ENV = "RAYGD_SHAPED_LINK"
"""What ``raygd.network`` reads on the driver: the link's rate in Mbit/s (``raygd.network.SHAPED``)."""
MTU_FRAME_BYTES = 1514
"""An Ethernet frame at MTU 1500, as ``tbf`` counts it (the veth's MAC header included)."""
QUEUE_S = 0.05
"""``tbf latency``: how long a packet may wait in the qdisc before it is dropped (its queue limit)."""

_LIVE: dict[str, ShapedLink] = {}
_HANDLERS_INSTALLED = False


def run(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    """Run a command (inside namespace ``ns`` if given), its output captured; raise with stderr on failure."""
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}: {out.stderr.strip()}")
    return out


def unavailable() -> str | None:
    """Why a shaped link cannot be made here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "a shaped link needs root (network namespaces, veth, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"a shaped link needs iproute2: {', '.join(missing)} not found"
    probe = f"{NS_PREFIX}probe-{os.getpid()}"
    made = run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def burst_bytes(rate_mbit: float) -> int:
    """The token bucket's depth: one frame, or 50 µs at the rate where that is more (at 1 Gbit/s: 6.25 KB).

    A transfer that starts after an idle spell (an all-reduce after the backward pass) passes its first ``burst``
    bytes at the veth's own speed, which a real link does not do: one frame (``tbf`` needs at least that) takes
    ≤ 1514 B / rate off each transfer, 0.12 ms at 100 Mbit/s. (The timer that refills it fires every 12 µs at
    1 Gbit/s, so at high rates a few frames keep the rate within reach.)"""
    return max(MTU_FRAME_BYTES, int(rate_mbit * 1e6 / 8 * 50e-6))


def _owner_alive(ns: str) -> bool:
    parts = ns.split("-")
    if len(parts) < 3 or not parts[1].isdigit():
        return True  # not one of ours by name: leave it
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove namespaces ``raygd-<pid>-<tag>`` whose creating process is gone (killed before it could clean up);
    their veth pairs go with them. Returns their names."""
    names = [line.split()[0] for line in run("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    stale = [n for n in names if n.startswith(NS_PREFIX) and not _owner_alive(n)]
    for name in stale:
        run("ip", "netns", "del", name, check=False)
    return stale


def _used_addresses() -> set[ipaddress.IPv4Address]:
    used = set()
    for line in run("ip", "-o", "-4", "addr", "show", check=False).stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip)
    return used


def _pick_pair() -> ipaddress.IPv4Network:
    """A random /30 of ``SUBNET`` none of whose addresses is on an interface of this namespace."""
    used = _used_addresses()
    subnets = list(SUBNET.subnets(new_prefix=30))
    for _ in range(100):
        pair = random.choice(subnets)
        if not any(a in pair for a in used):
            return pair
    raise RuntimeError(f"no free /30 in {SUBNET} after 100 tries")


def _cleanup_all() -> None:
    for link in list(_LIVE.values()):
        link.down()


def _on_signal(signum, frame) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    """atexit, and SIGTERM / SIGHUP where nobody else handles them (a handler set later replaces ours; then
    atexit and the context manager remain)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: atexit and the context manager only
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
    _HANDLERS_INSTALLED = True


class ShapedLink:
    """A veth pair from the root namespace into a namespace of its own, both ends shaped by ``tbf``."""

    def __init__(self, rate_mbit: float | None = 100.0, queue_s: float = QUEUE_S):
        self.tag = secrets.token_hex(3)
        self.namespace = f"{NS_PREFIX}{os.getpid()}-{self.tag}"
        self.host_dev = f"rgdh{self.tag}"  # interface names: at most 15 characters
        self.node_dev = f"rgdn{self.tag}"
        self.rate_mbit = rate_mbit
        self.queue_s = queue_s
        self.pair: ipaddress.IPv4Network | None = None
        self.is_up = False

    @property
    def host_ip(self) -> str:
        assert self.pair is not None
        return str(self.pair.network_address + 1)

    @property
    def node_ip(self) -> str:
        assert self.pair is not None
        return str(self.pair.network_address + 2)

    def up(self) -> ShapedLink:
        """Create the namespace, the pair, its addresses and the qdiscs; on any failure remove what was made."""
        _install_handlers()
        remove_stale()
        self.pair = _pick_pair()
        _LIVE[self.namespace] = self
        self.is_up = True
        try:
            run("ip", "netns", "add", self.namespace)
            run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.node_dev)
            run("ip", "link", "set", self.node_dev, "netns", self.namespace)
            run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
            run("ip", "link", "set", self.host_dev, "up")
            run("ip", "addr", "add", f"{self.node_ip}/30", "dev", self.node_dev, ns=self.namespace)
            run("ip", "link", "set", self.node_dev, "up", ns=self.namespace)
            run("ip", "link", "set", "lo", "up", ns=self.namespace)  # the node's own processes talk over it
            self.set_rate(self.rate_mbit)
        except BaseException:
            self.down()
            raise
        return self

    def set_rate(self, rate_mbit: float | None) -> None:
        """``tbf`` at ``rate_mbit`` on both ends (replacing any), or no qdisc of ours (None: the veth's own speed)."""
        for dev, ns in ((self.host_dev, None), (self.node_dev, self.namespace)):
            if rate_mbit is None:
                if "tbf" in run("tc", "qdisc", "show", "dev", dev, ns=ns).stdout:
                    run("tc", "qdisc", "del", "dev", dev, "root", ns=ns)
            else:
                run(
                    "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", f"{rate_mbit:g}mbit", "burst", str(burst_bytes(rate_mbit)),
                    "latency", f"{self.queue_s * 1e3:g}ms", ns=ns,
                )  # fmt: skip
        self.rate_mbit = rate_mbit

    def qdiscs(self) -> str:
        """``tc qdisc show`` of both ends (what is shaping them now)."""
        return "\n".join(
            run("tc", "qdisc", "show", "dev", dev, ns=ns, check=False).stdout.strip()
            for dev, ns in ((self.host_dev, None), (self.node_dev, self.namespace))
        )

    def down(self) -> None:
        """Remove the namespace (its end of the pair and that end's qdisc go with it), then the root end if it is
        still there. Safe to call twice and on a half-made link."""
        if not self.is_up:
            return
        run("ip", "netns", "del", self.namespace, check=False)
        if run("ip", "link", "show", self.host_dev, check=False).returncode == 0:
            run("ip", "link", "del", self.host_dev, check=False)
        self.is_up = False
        _LIVE.pop(self.namespace, None)

    def exists(self) -> dict[str, bool]:
        """What of this link is still on the machine (for tests of the clean-up)."""
        namespaces = run("ip", "netns", "list", check=False).stdout
        links = run("ip", "-o", "link", "show", check=False).stdout
        return {
            "namespace": any(line.split()[0] == self.namespace for line in namespaces.splitlines() if line.strip()),
            "veth": f"{self.host_dev}@" in links or f" {self.host_dev}:" in links,
            "qdisc": self.host_dev in run("tc", "qdisc", "show", check=False).stdout,
        }

    def __enter__(self) -> ShapedLink:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


class ShapedRayCluster(LocalRayCluster):
    """A Ray head in the root namespace and one worker node in a ``ShapedLink``'s namespace (module docstring)."""

    def __init__(self, rate_mbit: float | None = 100.0, head_cpus: int = 1, node_cpus: int = 1, **kwargs):
        root = Path(tempfile.mkdtemp(prefix="rgs", dir="/tmp"))
        super().__init__(root, **kwargs)
        self.link = ShapedLink(rate_mbit)
        self.head_cpus, self.node_cpus = head_cpus, node_cpus
        self.env.pop(SHAPED_ENV, None)

    def _node_env(self, dev: str) -> dict[str, str]:
        env = {**self.env, "GLOO_SOCKET_IFNAME": dev}
        if self.link.rate_mbit is not None:
            env[SHAPED_ENV] = f"{self.link.rate_mbit:g}"
        return env

    def _launch_in(self, name: str, args: list[str], env: dict[str, str], ns: str | None):
        temp_dir = Path(tempfile.mkdtemp(prefix=name[:1], dir=self.root))
        log = self.root / f"{name}.log"
        ports = [
            f"{flag}={free_port()}"
            for flag in (
                "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port",
                "--runtime-env-agent-port",
                "--metrics-export-port",
                "--node-manager-port",
                "--object-manager-port",
            )
        ]
        cmd = [
            str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--min-worker-port=0",
            "--max-worker-port=0", "--disable-usage-stats", *ports, *args,
        ]  # fmt: skip
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
            )
        self.procs.append(proc)
        return proc, log

    def start(self, timeout_s: float = 240, **_ignored) -> None:  # type: ignore[override]
        """Bring the link up, then the head at ``.1`` (its dashboard on 127.0.0.1 only), then the node at ``.2``
        (each once more with new ports if its ``ray start`` exits during start-up, as ``LocalRayCluster.start``
        does)."""
        self.link.up()
        try:
            for attempt in (1, 2):  # a head that times out on a busy machine, or loses a port: once more
                gcs_port, dash_port = free_port(), free_port()
                self.gcs_address = f"{self.link.host_ip}:{gcs_port}"
                self.dashboard_url = f"http://127.0.0.1:{dash_port}"
                head = self._launch_in(
                    f"head{attempt}",
                    [
                        "--head", f"--node-ip-address={self.link.host_ip}", f"--port={gcs_port}",
                        f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
                        f"--ray-client-server-port={free_port()}", f"--num-cpus={self.head_cpus}",
                    ],
                    self._node_env(self.link.host_dev),
                    None,
                )  # fmt: skip
                try:
                    wait_for_line(head[1], READY_LINE, head[0], timeout_s)
                    break
                except RuntimeError:
                    kill_marked(self.marker)
                    if attempt == 2:
                        raise
            for attempt in (1, 2):  # after the head: a node that finds no head in its GCS exits
                node = self._launch_in(
                    f"node{attempt}",
                    [
                        f"--address={self.gcs_address}", f"--node-ip-address={self.link.node_ip}",
                        f"--num-cpus={self.node_cpus}",
                    ],
                    self._node_env(self.link.node_dev),
                    self.link.namespace,
                )  # fmt: skip
                try:
                    wait_for_line(node[1], READY_LINE, node[0], timeout_s)
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver on the head's side (``raygd sweep``): the cluster's address and token, and
        ``RAYGD_SHAPED_LINK`` at the link's rate (absent when unshaped)."""
        env = self.client_env()
        env.pop(SHAPED_ENV, None)
        env.update(RAY_ADDRESS=self.gcs_address or "", GLOO_SOCKET_IFNAME=self.link.host_dev)
        if self.link.rate_mbit is not None:
            env[SHAPED_ENV] = f"{self.link.rate_mbit:g}"
        return env

    def stop(self) -> int:
        """End every process of the cluster (by marker), then remove the link."""
        try:
            return super().stop()
        finally:
            self.link.down()

    def __enter__(self) -> ShapedRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.remove_files()
