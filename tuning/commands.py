"""``raygd sweep``, ``raygd report`` and ``raygd schema``: the commands the sweep layer adds to ``raygd``.

``raygd.cli`` finds them through the ``raygd.commands`` entry points (pyproject.toml), so that ``raygd`` imports
nothing from ``tuning``; each entry adds its subparser and returns its handler, and ``raygd.cli.main`` runs it
with the same bad-input handling (exit 2) as its own commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from raygd.cli import _add_set, mlflow_ui_command, resume_command, runs_page_url
from raygd.tracking import check_tracking_store


def sweep(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Add ``raygd sweep``; its handler is ``cmd_sweep``."""
    sweep = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep for the fastest (step size, batch size) per mechanism",
        description="Run every trial of a sweep preset or YAML file on Ray Tune, stop each at its target, and "
        "print the fastest (step size, batch size) per mechanism with its speedup over vanilla SGD.",
    )
    sweep.add_argument("spec", help="preset name (quickstart, ...) or a sweep YAML file")
    _add_set(
        sweep,
        "override the base run config (train.target_accuracy=0.85) or the sweep "
        "(sweep.search=random, sweep.space.seed=[0,1]); repeatable",
    )
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="finish the latest interrupted run of this sweep (no duplicate MLflow runs)",
    )
    sweep.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="Ray Tune's status tables and a progress line per evaluation (default: a line per trial)",
    )
    return cmd_sweep


def report(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Add ``raygd report``; its handler is ``cmd_report``."""
    report = sub.add_parser("report", help="rebuild a sweep's table and figures from MLflow")
    report.add_argument("experiment", help="the sweep's name (its MLflow experiment)")
    report.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="MLflow store (default %(default)s)")
    report.add_argument("--out", default=None, help="also write summary.md/csv and figures to this folder")
    return cmd_report


def _print_sweep(name: str, outcome, tracking_uri: str) -> None:
    print(
        f"raygd sweep {name}: {len(outcome.records)} trials, "
        f"{sum(r.reached for r in outcome.records)} reached the target"
    )
    print(outcome.console_table or outcome.table)
    more = "; per-batch table with the gap at target in summary.md" if outcome.console_table != outcome.table else ""
    files = f"summary.md, pairs.md (every step size and B over its seeds), CSVs, figures{more}"
    print(f"MLflow parent run {outcome.parent_run_id} in experiment {name!r} ({files})")
    print(f"see it with: {mlflow_ui_command(tracking_uri)}")
    print(f"then open:   {runs_page_url(tracking_uri, outcome.parent_run_id)}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from tuning.spec import load_sweep_spec
    from tuning.sweep import run_sweep

    spec = load_sweep_spec(args.spec, args.overrides)
    check_tracking_store(spec.tracking_uri)
    from raygd.ray_env import check_ray_address

    check_ray_address()
    from raygd.train import interrupted, stop_signals

    with stop_signals():
        try:
            outcome = run_sweep(spec, resume=args.resume, verbose=args.verbose)
        except KeyboardInterrupt as err:  # raygd.train.Interrupted, or Ray's KeyboardInterrupt in its place
            print(_interrupted_sweep(spec.name, err, args), flush=True)
            return interrupted(err).exit_code
    _print_sweep(spec.name, outcome, spec.tracking_uri)
    return 0


def _interrupted_sweep(name: str, err: KeyboardInterrupt, args: argparse.Namespace) -> str:
    """The line an interrupted sweep ends with (no table: its grid is not done): how far it got, how to resume."""
    from raygd.train import Interrupted, interrupted

    stop, recorded = interrupted(err), None
    cause: BaseException | None = err
    while cause is not None and recorded is None:  # a second signal may have cut the first one's recording short
        recorded = cause if isinstance(cause, Interrupted) and cause.run_id else None
        cause = cause.__context__
    if recorded is None:
        return f"raygd sweep {name}: interrupted by {stop.signal_name} before it started; nothing to resume"
    trials = f" after {recorded.trials[0]} of {recorded.trials[1]} trials" if recorded.trials else ""
    return (
        f"raygd sweep {name}: interrupted by {stop.signal_name}{trials} (MLflow parent run {recorded.run_id} "
        f"left open); resume it with: {resume_command(args)}"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from raygd.config import absolute_tracking_uri
    from raygd.records import latest_sweep
    from tuning.report import collect_sweep, write_outputs

    uri = absolute_tracking_uri(args.tracking_uri)
    check_tracking_store(uri)
    outcome = collect_sweep(uri, latest_sweep(uri, args.experiment))
    if args.out:
        write_outputs(Path(args.out), outcome.records, outcome.best_rows, outcome.table)
    _print_sweep(args.experiment, outcome, uri)
    return 0


SCHEMA_FILES = {"run": "docs/schema/raygd-run.schema.json", "sweep": "docs/schema/raygd-sweep.schema.json"}
"""Where the repository keeps each schema (the YAML files here name them on their first line)."""


def schema(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """Add ``raygd schema``; its handler is ``cmd_schema``."""
    parser = sub.add_parser(
        "schema",
        help="the JSON Schema of a run config or a sweep file, for your editor",
        description="Print (or write) the JSON Schema of raygd's YAML files: field types, defaults, descriptions and "
        "allowed values. Editors with YAML language support read it from a first line "
        "'# yaml-language-server: $schema=PATH'. raygd checks every file again when it loads it.",
    )
    parser.add_argument("kind", choices=tuple(SCHEMA_FILES), help="run: raygd train CONFIG; sweep: raygd sweep FILE")
    parser.add_argument("--out", default=None, help="write it to this file instead of printing it")
    return cmd_schema


def schema_text(kind: str) -> str:
    """The schema of ``kind`` as the committed files hold it (sorted keys, two-space indent, a final newline)."""
    import json

    from raygd.schema import run_config_schema
    from tuning.schema import sweep_schema

    return json.dumps(run_config_schema() if kind == "run" else sweep_schema(), indent=2, ensure_ascii=False) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    text = schema_text(args.kind)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote the {args.kind} schema to {args.out}")
    else:
        print(text, end="")
    return 0
