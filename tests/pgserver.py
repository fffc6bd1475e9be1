"""A throwaway PostgreSQL server on 127.0.0.1 and a free port, for tests and benches; stopped by its PID.

Debian's server binaries (``/usr/lib/postgresql/<version>/bin``) run ``initdb`` into a fresh
folder under /tmp and ``pg_ctl start`` with ``listen_addresses=127.0.0.1``, a free port and the
Unix socket in that folder (never ``/var/run/postgresql``, never the default port), so a system
server or another test's server is left alone. PostgreSQL refuses to run as root: as root the
server runs as the ``postgres`` user (``runuser``). Logins need the password generated here
(scram-sha-256; on the socket too, unless ``local_auth="peer"`` as in Debian's own clusters). The
settings are in ``postgresql.conf``, so ``pg_ctl restart`` keeps them and ``ALTER SYSTEM`` can
override them. ``stop()`` ends exactly this server (``pg_ctl stop``, then its postmaster PID),
``remove_files()`` deletes its folder.

    with PostgresServer() as pg:
        uri = pg.create_database("mlflow")     # postgresql+psycopg://raygd:<password>@127.0.0.1:<port>/mlflow
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.localray import free_port

PG_ROOT = Path("/usr/lib/postgresql")
RUN_AS = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here and no way to install them; the message says why."""


def find_postgres_bin() -> Path | None:
    """The ``bin`` folder of the newest PostgreSQL installed from Debian's packages, or None."""
    found = sorted(
        (p.parent for p in PG_ROOT.glob("*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


def ensure_postgres_bin() -> Path:
    """PostgreSQL's server binaries; installs Debian's ``postgresql`` when missing and running as root.

    Raises ``PostgresUnavailable`` (with the reason) when there are none and they cannot be installed.
    """
    found = find_postgres_bin()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable(
            f"no PostgreSQL server under {PG_ROOT}/*/bin and not root on Debian to "
            "install it: apt-get install postgresql"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-1000:]}")
    found = find_postgres_bin()
    if not found:
        raise PostgresUnavailable(f"apt-get install postgresql put no initdb under {PG_ROOT}/*/bin")
    return found


class PostgresServer:
    """One PostgreSQL server in its own folder under /tmp, on 127.0.0.1 only; see the module docstring."""

    def __init__(self, user: str = "raygd", local_auth: str = "scram-sha-256", listen: str = "127.0.0.1"):
        """``user``: the superuser; ``local_auth``: pg_hba method on the Unix socket (``peer``, as Debian's own
        clusters, lets the ``postgres`` OS user in as the ``postgres`` role); ``listen``: ``listen_addresses``."""
        self.user, self.local_auth, self.listen = user, local_auth, listen
        self.bin = ensure_postgres_bin()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            try:
                owner = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
                ) from None
        # Short path: the Unix socket lives here too (socket paths are limited to ~107 bytes).
        self.root = Path(tempfile.mkdtemp(prefix="rgdpg", dir="/tmp"))
        if self.as_root:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password = secrets.token_hex(16)
        self.port: int | None = None
        self.pid: int | None = None

    def _cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin / tool), *args]
        return ["runuser", "-u", RUN_AS, "--", *cmd] if self.as_root else cmd

    def _run(self, tool: str, *args: str, timeout_s: float = 120) -> None:
        done = subprocess.run(self._cmd(tool, *args), cwd=self.root, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                f"{done.stderr[-2000:]}{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        return f"\n{self.log}:\n{self.log.read_text(errors='replace')[-2000:]}" if self.log.exists() else ""

    def start(self, timeout_s: float = 90) -> PostgresServer:
        """initdb (the superuser with a fresh password) and start on ``listen``; waits until it accepts."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.as_root:
            shutil.chown(pwfile, RUN_AS)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                f"--auth-local={self.local_auth}",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        finally:
            pwfile.unlink()
        conf = self.data / "postgresql.conf"
        base_conf = conf.read_text()
        for attempt in (1, 2):  # a free port can be taken by someone else before the server binds it
            self.port = free_port()
            # In postgresql.conf, not on pg_ctl's command line: a restart keeps them and ALTER SYSTEM can override.
            conf.write_text(
                base_conf + f"\nlisten_addresses = '{self.listen}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
            )
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    timeout_s=timeout_s + 10,
                )
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def uri(self, database: str, password: bool = True) -> str:
        """``postgresql+psycopg://`` URI of ``database`` (``password=False``: without it, for PGPASSWORD)."""
        login = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql+psycopg://{login}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URI (with the password)."""
        env = {**os.environ, "PGPASSWORD": self.password}
        done = subprocess.run(
            [str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr[-2000:]}{self._log_tail()}")
        return self.uri(name)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; if the server is still there, SIGTERM then SIGKILL its postmaster."""
        if self.pid is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # then by PID, below
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", timeout_s=40)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not pid_alive(self.pid):
                break
            os.kill(self.pid, sig)
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.pid = None

    def remove_files(self) -> None:
        """Delete the server's folder (data, log, socket); call after ``stop()``."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.remove_files()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
