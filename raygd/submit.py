"""``raygd submit``: run a raygd command on a Ray cluster through the Ray Jobs API.

    raygd submit -- raygd sweep quickstart                      # cluster at http://127.0.0.1:8265
    raygd submit --address http://127.0.0.1:8265 --no-wait -- raygd sweep dropconnect-speedup
    raygd submit --status raysubmit_XYZ     # or --logs [--follow], --stop, --list

The working directory is shipped as the job's ``working_dir`` (without .git, .venv, MLflow
stores, caches; see ``WORKING_DIR_EXCLUDES``), so the cluster runs the code you have. The
job's MLflow tracking URI is made explicit in the command: ``--tracking-uri URI``, or by
default ``$MLFLOW_TRACKING_URI`` as set on the cluster's nodes by the configs in
``cluster/`` (the MLflow server on the head, on the cluster's private network).

Token authentication (Ray >= 2.52) is never turned off: the token is read the way Ray reads
it (``RAY_AUTH_TOKEN``, then the file at ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``)
and sent as ``Authorization: Bearer``. A bad address, an unreachable cluster, a missing or
rejected token, a missing ``--`` or an oversized working directory stop with exit status 2
and a message naming the input and the fix, before anything is uploaded.

``--stop`` sends the job's driver SIGTERM, which a raygd driver handles as Ctrl-C (an interrupted
sweep stays resumable: ``raygd submit -- raygd sweep NAME --resume``); the job is given
``JOB_STOP_WAIT_S`` for that before Ray Jobs' SIGKILL.

One module (over 400 lines once formatted) because it is one command: its argument checks,
address/token/working-dir validation and the Jobs API calls share the same error messages.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from raygd.config import ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CLUSTER_TRACKING_URI = "cluster"
WORKING_DIR_EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "/build/",
    "/dist/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "*.db-journal",
    "ray_results/",
    "/report/",
    ".ipynb_checkpoints/",
    "*.token",
    "auth_token",
]
MAX_WORKING_DIR_BYTES = 100 * 2**20
"""Ray's own limit is 512 MiB zipped; data belongs on the nodes or in cloud storage, not in the upload."""
JOB_STOP_WAIT_S = 60
"""Seconds Ray Jobs waits after a stop's SIGTERM before it SIGKILLs the job (``RAY_JOB_STOP_WAIT_TIME_S``, read by the
job's supervisor from the job's environment; 3 s by default): an interrupted sweep stops Ray Tune, tags its parent
run and stops its pools first (~15 s on 2 cores). A value in the submitting shell's environment is passed instead."""
TRACKED_COMMANDS = ("train", "sweep", "diversity")
REMOTE_TRACKING_SCHEMES = ("http", "https", "postgresql", "mysql", "mssql", "databricks")
JOB_FLAGS = ("status", "logs", "stop")
FIX_REACH = (
    "Start the port forward to the head's dashboard first (`ray dashboard cluster/aws.yaml`, or "
    "`kubectl port-forward svc/raygd-head-svc 8265:8265`) or pass --address http://HOST:8265"
)


def split_entrypoint(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``submit [OPTIONS] -- COMMAND...`` at the first ``--`` before argparse sees it
    (argparse's handling of ``--`` changes between Python versions); other commands pass through."""
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] == ["submit"] and "--" in argv and argv.index("--") > argv.index("submit"):
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``raygd submit`` to the CLI's subcommands."""
    p = sub.add_parser(
        "submit",
        help="run a raygd command on a Ray cluster (Ray Jobs API); also --status/--logs/--stop JOB",
        usage="raygd submit [--address URL] [--working-dir DIR] [--tracking-uri URI] [--no-wait] -- COMMAND ...\n"
        "       raygd submit [--address URL] (--status JOB | --logs JOB [--follow] | --stop JOB | --list)",
        description="Ship the working directory to a Ray cluster and run COMMAND there as a Ray job; stream its "
        "logs and exit with the job's outcome (0 succeeded, 1 failed or stopped).",
        epilog="Example: raygd submit --address http://127.0.0.1:8265 -- raygd sweep quickstart\n"
        "Token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see cluster/README.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--address",
        default=None,
        help=f"the head's dashboard / Jobs API, http(s)://HOST:PORT (default $RAY_API_SERVER_ADDRESS, "
        f"an http RAY_ADDRESS, else {DEFAULT_ADDRESS}: a port-forwarded head)",
    )
    p.add_argument("--working-dir", default=".", help="folder shipped as the job's working_dir (default: .)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out these paths (gitignore syntax; repeatable)",
    )
    p.add_argument(
        "--tracking-uri",
        default=CLUSTER_TRACKING_URI,
        help="MLflow URI as seen from the cluster's nodes (default: $MLFLOW_TRACKING_URI on the cluster)",
    )
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks raysubmit_...)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--status", metavar="JOB", help="print a job's status and message")
    group.add_argument("--logs", metavar="JOB", help="print a job's logs (with --follow: until it ends)")
    group.add_argument("--stop", metavar="JOB", help="stop a running job")
    group.add_argument("--list", action="store_true", help="list the cluster's jobs")
    p.add_argument("--follow", action="store_true", help="with --logs: keep streaming until the job ends")
    # Filled by split_entrypoint(); anything left here means the `--` was missing.
    p.add_argument("stray", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def resolve_address(flag: str | None) -> str:
    """The Jobs API URL from --address, $RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS or the default."""
    env_http = os.environ.get("RAY_ADDRESS", "")
    raw = flag or os.environ.get("RAY_API_SERVER_ADDRESS") or (env_http if "://" in env_http else "") or DEFAULT_ADDRESS
    source = (
        "--address"
        if flag
        else "$RAY_API_SERVER_ADDRESS"
        if os.environ.get("RAY_API_SERVER_ADDRESS")
        else "$RAY_ADDRESS"
        if raw != DEFAULT_ADDRESS
        else "the default"
    )
    text = raw.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or text in ("http://auto",):
        raise ConfigError(
            f"address {raw!r} (from {source}) is not a Ray Jobs API address: pass --address with the head's "
            "dashboard URL, http(s)://HOST:PORT, e.g. http://127.0.0.1:8265 after `ray dashboard cluster/aws.yaml` "
            "(ray:// client addresses and the GCS port 6379 are not the Jobs API)."
        )
    return text if port or parts.scheme == "https" else f"{text}:8265"


def find_token() -> tuple[str | None, str]:
    """The Ray auth token and where it came from, looked up in Ray's order (env, env file, default file)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
        if not token:
            raise ConfigError(
                f"RAY_AUTH_TOKEN_PATH={str(path)!r} is not a readable, non-empty token file: point it "
                "at the file holding the cluster's token (see cluster/README.md, 'Token')."
            )
        return token, f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "nowhere (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


def working_dir_size(folder: Path, excludes: list[str]) -> tuple[int, int]:
    """Bytes and files that Ray would upload from ``folder`` after ``excludes`` (an upper bound: Ray zips)."""
    from ray._private.thirdparty.pathspec.pathspec import PathSpec  # the matcher Ray itself applies to excludes

    spec = PathSpec.from_lines("gitwildmatch", excludes)
    total = files = 0
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not spec.match_file(f"{rel_root / d}/")]
        for name in names:
            path = Path(root) / name
            if not spec.match_file(str(rel_root / name)) and not path.is_symlink():
                total += path.stat().st_size
                files += 1
    return total, files


def check_working_dir(folder: str, extra_excludes: list[str]) -> tuple[Path, list[str], int, int]:
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--working-dir {folder!r} is not a folder: pass the folder to ship (default: .).")
    excludes = WORKING_DIR_EXCLUDES + list(extra_excludes)
    size, files = working_dir_size(path, excludes)
    if size > MAX_WORKING_DIR_BYTES:
        raise ConfigError(
            f"--working-dir {str(path)!r} holds {size / 2**20:.0f} MiB after the standard excludes "
            f"(limit {MAX_WORKING_DIR_BYTES / 2**20:.0f} MiB): leave large files out with --exclude PATTERN or "
            "a .rayignore file; data belongs on the nodes (RAYGD_DATA_DIR) or in cloud storage."
        )
    return path, excludes, size, files


def check_tracking_uri(uri: str) -> None:
    """A tracking URI given to submit must be a server or database the cluster's nodes can all reach."""
    if uri == CLUSTER_TRACKING_URI:
        return
    scheme = urlsplit(uri).scheme
    if scheme not in REMOTE_TRACKING_SCHEMES:
        raise ConfigError(
            f"--tracking-uri {uri!r} is not reachable from every node of a cluster: use the MLflow server the "
            "nodes share (http://HEAD_PRIVATE_IP:5000, or leave --tracking-uri out to use the cluster's "
            f"$MLFLOW_TRACKING_URI) or a database URI ({', '.join(REMOTE_TRACKING_SCHEMES[2:])})."
        )


def build_entrypoint(command: list[str], tracking_uri: str) -> str:
    """The shell command the job runs: ``command`` with its MLflow tracking URI made explicit.

    raygd train/sweep/diversity get ``--set tracking.tracking_uri=...`` and raygd report gets
    ``--tracking-uri ...`` unless the command sets one itself; other commands run unchanged.
    With ``tracking_uri == "cluster"`` the value is ``$MLFLOW_TRACKING_URI`` of the node that
    runs the job, expanded there by the job's shell (which fails loudly if it is unset).
    """
    line = shlex.join(command)
    raygd_at = next((i for i, w in enumerate(command[:3]) if Path(w).name == "raygd" or w == "raygd.cli"), None)
    if raygd_at is None or raygd_at + 1 >= len(command):
        return line
    sub, rest = command[raygd_at + 1], command[raygd_at + 2 :]
    if tracking_uri == CLUSTER_TRACKING_URI:
        value = '"${MLFLOW_TRACKING_URI:?is not set on the cluster: pass raygd submit --tracking-uri URI}"'
    else:
        value = shlex.quote(tracking_uri)
    if sub in TRACKED_COMMANDS and not any("tracking.tracking_uri=" in w for w in rest):
        return f"{line} --set tracking.tracking_uri={value}"
    if sub == "report" and not any(w.startswith("--tracking-uri") for w in rest):
        return f"{line} --tracking-uri {value}"
    return line


@contextmanager
def _only_address(address: str):
    """JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override its argument: pin it."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        os.environ.update(saved)


def _auth_fix(address: str, status: int, source: str) -> str:
    if status == 401:
        return (
            f"the Ray cluster at {address} requires token authentication and no token was found ({source}). "
            "Fix: copy the cluster's token to this machine and export RAY_AUTH_TOKEN_PATH=FILE (launcher "
            "clusters: the file you mounted, see cluster/README.md 'Token'; KubeRay: "
            "`kubectl get secret raygd -o jsonpath='{.data.auth_token}' | base64 -d > FILE`)."
        )
    return (
        f"the Ray cluster at {address} rejected the token from {source} (HTTP {status}). Fix: use that "
        "cluster's token (export RAY_AUTH_TOKEN_PATH=FILE or RAY_AUTH_TOKEN); a token that `ray.init()` wrote "
        "to ~/.ray/auth_token for a local Ray is not the cluster's."
    )


def _reason(err: Exception) -> str:
    text = str(err)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("timed out", "no answer within 20 s"),
        ("No route to host", "no route to host"),
    ):
        if needle in text:
            return reason
    return f"{type(err).__name__}: {text[:160]}"


def connect(address: str):
    """A JobSubmissionClient for ``address`` with the token, after checking reachability and auth with a timeout."""
    import requests

    token, source = find_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.get(f"{address}/api/jobs/", headers=headers, timeout=20)
    except requests.exceptions.RequestException as err:
        raise ConfigError(f"cannot reach the Ray Jobs API at {address} ({_reason(err)}). {FIX_REACH}.") from None
    if r.status_code in (401, 403):
        raise ConfigError(_auth_fix(address, r.status_code, source))
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("application/json"):
        raise ConfigError(
            f"{address} answered HTTP {r.status_code} on /api/jobs/: it is not a Ray dashboard "
            f"(the Jobs API). {FIX_REACH}."
        )
    from ray.job_submission import JobSubmissionClient

    with _only_address(address):
        return JobSubmissionClient(address, headers=headers)


def _tail(client, job_id: str) -> None:
    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except RuntimeError as err:  # the log stream broke: the status below still tells the outcome
        print(f"raygd submit: log stream ended early ({err}); see raygd submit --logs {job_id}", file=sys.stderr)


def wait_for_end(client, job_id: str, timeout_s: float = 120.0):
    """The job's details once its status is terminal (logs can end a moment before the status does)."""
    deadline = time.monotonic() + timeout_s
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        info = client.get_job_info(job_id)
    return info


def _print_info(info) -> None:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    print(
        f"{info.submission_id or info.job_id}  {info.status}  started {started}  {info.message or ''}\n"
        f"  entrypoint: {info.entrypoint}"
    )


def run_job_command(args: argparse.Namespace, client) -> int:
    """--status, --logs [--follow], --stop, --list."""
    if args.list:
        for info in sorted(client.list_jobs(), key=lambda i: i.start_time or 0):
            _print_info(info)
        return 0
    job_id = args.status or args.logs or args.stop
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        raise ConfigError(
            f"job {job_id!r} is not known to the cluster ({str(err)[:200]}): see raygd submit --list."
        ) from None
    if args.status:
        _print_info(info)
    elif args.logs and args.follow:
        _tail(client, job_id)
    elif args.logs:
        print(client.get_job_logs(job_id), end="")
    else:
        stopped = client.stop_job(job_id)
        print(
            f"raygd submit: {'stop requested for' if stopped else 'nothing to stop:'} {job_id} "
            f"({wait_for_end(client, job_id, JOB_STOP_WAIT_S + 30).status if stopped else info.status})"
        )
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """``raygd submit``: validate everything, connect, then submit (and follow) or manage a job."""
    from raygd.tracking import git_commit, redact_uri

    command: list[str] = getattr(args, "entrypoint", None) or []
    manage = args.list or any(getattr(args, f) for f in JOB_FLAGS)
    if args.stray:
        raise ConfigError(
            f"raygd submit got {shlex.join(args.stray)!r} without `--` before it: write "
            "raygd submit [--address URL] -- raygd sweep PRESET ... (the `--` separates submit's "
            "options from the command the cluster runs)."
        )
    if manage and command:
        raise ConfigError(
            "raygd submit takes either a command after `--` or one of --status/--logs/--stop/--list, not both."
        )
    if not manage and not command:
        raise ConfigError(
            "raygd submit needs a command after `--`, e.g. raygd submit -- raygd sweep quickstart "
            "(or --status/--logs/--stop JOB, --list)."
        )
    if args.follow and not args.logs:
        raise ConfigError("--follow goes with --logs JOB.")
    address = resolve_address(args.address)
    if manage:
        return run_job_command(args, connect(address))
    check_tracking_uri(args.tracking_uri)
    path, excludes, size, files = check_working_dir(args.working_dir, args.exclude)
    entrypoint = build_entrypoint(command, args.tracking_uri)
    client = connect(address)
    env_vars = {
        "RAYGD_GIT_COMMIT": git_commit(path),
        "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(JOB_STOP_WAIT_S)),
    }
    if args.tracking_uri != CLUSTER_TRACKING_URI:
        env_vars["MLFLOW_TRACKING_URI"] = args.tracking_uri
    print(f"raygd submit: shipping {path} ({size / 2**20:.1f} MiB, {files} files) to {address}", file=sys.stderr)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=args.submission_id,
        runtime_env={"working_dir": str(path), "excludes": excludes, "env_vars": env_vars},
        metadata={"raygd.command": shlex.join(redact_uri(w) if "://" in w else w for w in command)[:500]},
    )
    print(job_id, flush=True)
    print(
        f"raygd submit: job {job_id} submitted; follow it with raygd submit --address {address} "
        f"--logs {job_id} --follow; stop it with --stop {job_id}",
        file=sys.stderr,
    )
    if args.no_wait:
        return 0
    try:
        _tail(client, job_id)
    except KeyboardInterrupt:
        print(
            f"\nraygd submit: stopped following; job {job_id} keeps running (--stop {job_id} ends it)", file=sys.stderr
        )
        return 130
    info = wait_for_end(client, job_id)
    print(f"raygd submit: job {job_id} {info.status}" + (f": {info.message}" if info.message else ""), file=sys.stderr)
    return 0 if str(info.status) == "SUCCEEDED" else 1
