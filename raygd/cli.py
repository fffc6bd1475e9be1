"""The ``raygd`` command line.

    raygd train configs/quickstart.yaml                      # one data-parallel run
    raygd train configs/quickstart.yaml --set train.step_size=0.1 --set train.num_workers=1
    raygd sweep quickstart                                   # a Ray Tune sweep (tuning/presets/)
    raygd sweep quickstart --resume                          # finish an interrupted sweep (Ctrl-C, SIGTERM)
    raygd report quickstart                                  # rebuild its table and figures from MLflow
    raygd diversity configs/quickstart.yaml --replication 1,2,4,8 --mechanism vanilla,sgld
    raygd submit --address http://127.0.0.1:8265 -- raygd sweep quickstart   # on a Ray cluster (cluster/)
    raygd project quickstart --profile p3-v100-25g --workers 2,8,32,128,256   # projected onto a cluster

Every config value is validated before Ray starts; a bad value exits with status 2
and a message naming the field and what is allowed. SIGINT (Ctrl-C) or SIGTERM ends a command
with status 130 or 143: ``raygd train``'s MLflow run ends KILLED, and an interrupted sweep prints
the command that resumes it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from raygd import submit
from raygd.config import ConfigError, ResumeError, RunConfig, load_run_config
from raygd.data import DataError
from raygd.tracking import check_tracking_store

EXIT_BAD_INPUT = 2
COMMANDS_GROUP = "raygd.commands"
"""The entry-point group of commands other packages add (``tuning`` adds ``sweep`` and ``report``, pyproject.toml):
each entry is ``add(sub) -> handler``, which adds its subparser and returns the function that runs it."""
Command = Callable[[argparse.Namespace], int]


def _plugin_commands(sub: argparse._SubParsersAction) -> dict[str, Command]:
    """The commands of the installed ``raygd.commands`` entry points, by name (this layer does not import the
    packages above it: ``raygd sweep`` comes from ``tuning.commands``)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.load()(sub) for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name)}


def _add_set(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="raygd",
        description="Gradient diversity and data-parallel SGD on Ray, recorded in MLflow.",
        epilog="Example: raygd train configs/quickstart.yaml --set train.global_batch_size=128\n"
        "Config fields: see configs/quickstart.yaml and raygd/config.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="one data-parallel SGD run on Ray Train (P workers, global batch B)",
        description="Run data-parallel SGD until the target train accuracy, max passes or divergence; "
        "print a summary and the MLflow run id.",
    )
    train.add_argument("config", help="YAML run config with sections data, mechanism, train, tracking")
    _add_set(train, "override one config value (repeatable), e.g. --set mechanism.name=dropconnect")
    div = sub.add_parser(
        "diversity",
        help="measure gradient diversity and the batch-size bound B_D = n*Delta_D",
        description="Exact B_D of the config's model and data at the initial weights, per replication factor "
        "and mechanism, and optionally along a training run; printed and recorded in MLflow.",
    )
    div.add_argument("config", help="YAML run config (data, train.model, mechanism parameters, tracking)")
    _add_set(div, "override one config value (repeatable)")
    div.add_argument("--replication", default="1", help="comma-separated r values, e.g. 1,2,4,8 (default 1)")
    div.add_argument(
        "--mechanism",
        default="vanilla",
        help="comma-separated mechanisms: vanilla,dropconnect,sgld,quantize (parameters from the config)",
    )
    div.add_argument(
        "--along-training",
        action="store_true",
        help="also train (1 process, vanilla SGD) and measure B_D every --every updates",
    )
    div.add_argument("--every", type=int, default=50, help="updates between measurements along training")
    div.add_argument(
        "--differential",
        action="store_true",
        help="with --along-training: also the differential bound B̄_D(w_prev, w) (Definition 2, Theorem 5) "
        "between consecutive measured iterates, a column and an MLflow metric",
    )
    commands = _plugin_commands(sub)
    _add_project_parser(sub)
    submit.add_parser(sub)
    return parser, commands


def _add_project_parser(sub) -> None:
    from raygd.profiles import COMPUTES, LINKS, PROFILES

    proj = sub.add_parser(
        "project",
        help="project a sweep (or run) onto a cluster: measured updates to target x modelled time per update",
        description="Projected time to accuracy per trial, best (step size, B) per mechanism and speedup over "
        "vanilla at each P, Figure 1 at scale and speedup against rho = t_comm/t_compute, for a named cluster "
        "profile or explicit figures; printed and logged under projected/ in the sweep's parent run.",
    )
    proj.add_argument("sweep", help="the sweep's name (its MLflow experiment; the newest sweep) or a run id")
    proj.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default %(default)s)")
    proj.add_argument("--profile", default=None, help=f"cluster profile: {', '.join(PROFILES)} (default ec2-10g)")
    proj.add_argument("--link", default=None, help=f"network link: {', '.join(LINKS)}")
    proj.add_argument("--compute", default=None, help=f"compute: measured (this machine), {', '.join(COMPUTES)}")
    proj.add_argument("--bandwidth-gbps", type=float, default=None, help="explicit link bandwidth, Gbit/s")
    proj.add_argument("--latency-us", type=float, default=None, help="explicit link latency, microseconds")
    proj.add_argument("--topology", default="ring", help="ring or parameter_server (default ring)")
    proj.add_argument("--overlap", type=float, default=0.0, help="fraction of communication hidden (default 0)")
    proj.add_argument("--workers", default="2,8,32,128,256", help="comma-separated P values (default %(default)s)")
    proj.add_argument("--out", default=None, help="also write the table, CSVs and figures to this folder")
    proj.add_argument("--no-log", action="store_true", help="do not log the outputs to the parent run")


def _fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}{unit}"


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store, bound to loopback."""
    if urlsplit(tracking_uri).scheme in ("http", "https"):
        return f"open {tracking_uri} in a browser"
    return f"{mlflow_executable()} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def runs_page_url(tracking_uri: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page listing the runs of ``run_id``'s experiment in the model-training view (MLflow 3
    opens an experiment in its GenAI overview otherwise), trials first by time to accuracy; ``ui`` is the
    server for a local store."""
    from mlflow.tracking import MlflowClient

    base = tracking_uri.rstrip("/") if urlsplit(tracking_uri).scheme in ("http", "https") else ui
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    # Sorted by a metric, MLflow lists child runs as rows of their own (sorted by start time it shows the
    # parent with its children collapsed); the fastest trial comes first, runs without the metric last.
    order = "orderByKey=metrics.%60time_to_accuracy_s%60&orderByAsc=true"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&{order}"


def mlflow_executable() -> str:
    """``mlflow`` when the shell finds this environment's; else its path (``.venv/bin/mlflow`` after
    ``make``, whose venv is not activated)."""
    return _executable("mlflow")


def _executable(name: str) -> str:
    mine = Path(sys.executable).parent / name
    if not mine.exists() or shutil.which(name) == str(mine):
        return name
    try:
        return str(mine.relative_to(Path.cwd()))
    except ValueError:
        return str(mine)


IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray Jobs in a submitted job's driver (``raygd submit``)."""


def resume_command(args: argparse.Namespace) -> str:
    """The shell command that resumes the sweep ``args`` ran: its spec and ``--set`` overrides, quoted, and
    ``--resume``; in a Ray job, as submitted again (``raygd submit -- ...``)."""
    in_job = IN_RAY_JOB_ENV in os.environ
    words = ["raygd" if in_job else _executable("raygd"), "sweep", args.spec]
    for override in args.overrides:
        words += ["--set", override]
    return ("raygd submit -- " if in_job else "") + shlex.join([*words, "--resume"])


def print_summary(cfg: RunConfig, summary) -> None:
    t = cfg.train
    lines = [
        f"raygd train: {t.model} on {cfg.data.name}, mechanism {cfg.mechanism.name}, "
        f"P={t.num_workers}, B={t.global_batch_size}, step size {t.step_size:g}, seed {t.seed}",
        f"  status                {summary.status}"
        + (f" (at step {summary.diverged_at_step})" if summary.diverged_at_step else ""),
        f"  target                {t.target_label}",
        f"  time to target        {_fmt(summary.time_to_accuracy_s, ' s')}",
        f"  passes to target      {_fmt(summary.passes_to_accuracy, '', 2)}",
        f"  updates to target     {summary.updates_to_accuracy if summary.updates_to_accuracy else 'not reached'}",
        f"  final train accuracy  {summary.final_train_accuracy:.4f} (loss {summary.final_train_loss:.4f})",
        f"  final test accuracy   {summary.final_test_accuracy:.4f}",
        f"  training time         {summary.train_time_s:.2f} s over {summary.steps} updates "
        f"({summary.passes:.2f} passes, {summary.samples_per_s:.0f} samples/s); evaluation {summary.eval_time_s:.2f} s",
        f"  MLflow run            {summary.run_id} in experiment {cfg.tracking.experiment_name!r}",
        f"  see it with           {mlflow_ui_command(cfg.tracking.tracking_uri)}",
    ]
    print("\n".join(lines))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    from raygd.data import load_data
    from raygd.models import check_workload
    from raygd.train import fit, interrupted, stop_signals

    data = load_data(cfg.data, cfg.train.seed)
    check_workload(cfg, data)  # a user's model: bad input exits 2 here, before the store or Ray
    with stop_signals():
        try:
            summary = fit(cfg, data=data)
        except KeyboardInterrupt as err:  # raygd.train.Interrupted, or Ray's KeyboardInterrupt in its place
            stop = interrupted(err)
            ended = f"MLflow run {stop.run_id} ended KILLED" if stop.run_id else "before its MLflow run started"
            print(f"raygd train: interrupted by {stop.signal_name}; {ended}", flush=True)
            return stop.exit_code
    print_summary(cfg, summary)
    return 0


def cmd_diversity(args: argparse.Namespace) -> int:
    from raygd import measure

    cfg = load_run_config(args.config, args.overrides)
    check_tracking_store(cfg.tracking.tracking_uri)
    replications = measure.parse_list(args.replication, int, "--replication")
    mechanisms = measure.check_mechanisms(args.mechanism.split(","))
    if args.every < 1:
        raise ConfigError(f"--every {args.every} is invalid: an integer >= 1.")
    rows = measure.measure_replications(cfg, replications, mechanisms)
    if args.differential and not args.along_training:
        raise ConfigError("--differential is invalid without --along-training: it compares iterates of a training run.")
    along = measure.measure_along_training(cfg, args.every, args.differential) if args.along_training else []
    run_id = measure.record(cfg, rows, along)
    print(f"raygd diversity: {cfg.train.model} on {cfg.data.name}")
    print(measure.table(rows + along))
    print(
        f"\nMLflow run {run_id} in experiment {cfg.tracking.experiment_name!r}; "
        f"see it with: {mlflow_ui_command(cfg.tracking.tracking_uri)}"
    )
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    import tempfile

    from raygd import project, project_report
    from raygd.config import absolute_tracking_uri
    from raygd.records import latest_sweep, mlflow_client

    workers = [w.strip() for w in args.workers.split(",")]
    if not all(w.isdigit() and int(w) >= 1 for w in workers):
        raise ConfigError(f"--workers {args.workers!r} is invalid: comma-separated integers >= 1, e.g. 2,8,32.")
    target = project.resolve_target(
        args.profile, args.link, args.compute, args.bandwidth_gbps, args.latency_us, args.topology, args.overlap
    )
    uri = absolute_tracking_uri(args.tracking_uri)
    check_tracking_store(uri)
    client = mlflow_client(uri)
    is_run = len(args.sweep) == 32 and all(c in "0123456789abcdef" for c in args.sweep)
    run_id = args.sweep if is_run else latest_sweep(uri, args.sweep)
    if is_run:
        client.get_run(run_id)  # raises if there is no such run
    proj = project.project(project.read_trials(uri, run_id), target, [int(w) for w in workers])
    print(project_report.table(proj))
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="raygd-project-"))
    project_report.write_outputs(proj, folder)
    if not args.no_log:
        project_report.log_to_run(uri, run_id, folder)
        print(f"\nlogged under {project.PROJECTED}/ in MLflow run {run_id} (CSVs, projected.md, figures)")
    if args.out:
        print(f"written to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv, entrypoint = submit.split_entrypoint(sys.argv[1:] if argv is None else list(argv))
    parser, plugins = _parser()
    args = parser.parse_args(argv)
    args.entrypoint = entrypoint
    try:
        commands: dict[str, Command] = {
            "train": cmd_train,
            "diversity": cmd_diversity,
            "project": cmd_project,
            "submit": submit.cmd_submit,
            **plugins,
        }
        return commands[args.command](args)
    except (ConfigError, DataError) as err:
        print(f"raygd {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ResumeError as err:
        print(f"raygd {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C outside train and sweep's own handling (raygd.train.Interrupted)
        print(f"raygd {args.command}: interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
