"""Ray Tune sweeps for the fastest wall-clock time to a target accuracy: the driver.

The driver builds a ``Tuner`` over ``tuning.trial.run_trial``, runs (or resumes) it, re-runs each
mechanism's winner with fresh seeds (the confirm phase), and closes the sweep (``tuning.report``).
With ``extend_edges`` the grid's experiment also runs the rounds beyond its winners' edges
(``tuning.rounds.EdgeSearcher``, a Tune searcher), in the same warm trial actor.
By default (``trial_pool: true``) the trials train in ``max_concurrent_trials`` warm worker groups
started once per sweep (``raygd.pool``); each Tune trial only hands its config over and relays results.
Every trial stops at the target inside the training loop; with a scheduler (ASHA), rank
zero's evaluations reach Tune through ``TuneReportCallback`` (with the provisional objective
added, see ``tuning.callbacks``), and the trial's final summary is its last report. Search is a
grid, random draws, or Optuna's TPE (``OptunaSearch``) minimising ``objective_s``, the
time to accuracy with a finite penalty for misses (``tuning.objective``); ASHA may stop
trials that lag, and their MLflow runs are ended ``stopped_early`` as they stop.
MLflow holds one parent run per sweep and one child run per trial (``mlflow.parentRunId``,
see ``raygd.records``), created by raygd itself rather than Ray's MLflow callback, whose
nesting does not give one child per trial under a parent we own.

    raygd sweep quickstart                     # a preset from tuning/presets/
    raygd sweep my-sweep.yaml --set train.target_accuracy=0.85
    raygd sweep quickstart --resume            # finish the latest interrupted sweep

Interrupted (SIGINT, SIGTERM: ``tuning.tune_control.stop_tune_on_signal``), a sweep stops as Tune stops on
Ctrl-C (it saves its experiment's state and ends the running trials), tags its parent run
(``tuning.report.record_interruption``) and raises ``raygd.train.Interrupted``; the parent stays RUNNING, and
``--resume`` runs the trials that had not finished.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from raygd.config import ConfigError
from raygd.records import (
    CONFIRM_PHASE,
    EXTEND_INLINE_TAG,
    EXTEND_ROUND_TAG,
    KIND_TAG,
    PHASE_TAG,
    SWEEP_KIND,
    TUNE_DIR_TAG,
    child_runs,
    newest_sweep,
)
from raygd.tracking import Tracker, create_run, provenance_tags
from tuning.report import SweepOutcome, clear_interruption, close_sweep, collect_sweep, record_interruption
from tuning.spec import SweepSpec, mechanism_label, storage_root
from tuning.trial import CONFIRM_PARAM, EXTEND_PARAM, EXTEND_ROUND_PARAM, run_trial
from tuning.tune_control import fail_on_lost_state, quiet_tune, stop_tune_on_signal

REUSE_TRIAL_ACTORS = True
"""Run trials in one warm Tune actor (its imports of torch, Ray Train and MLflow done once), not one each:
~5 CPU s less per trial (bench/sweep_overhead.py --ab reuse). Not with a scheduler: Tune would hand the
actor of a stopped trial, still inside fit(), to the next trial, whose reset then fails."""


INLINE_EDGE_ROUNDS = True
"""A new sweep's edge rounds run in the grid's Tune experiment (``tuning.rounds``), in its warm trial actor,
not each in a Tune experiment of its own, whose cold trial actor put ~15 s between the quickstart's grid
and its round's first training step (its trials take 1.5-4 s each; bench/sweep_overhead.py --ab rounds)."""


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param space: grid_search over each list, or (random, optuna) a choice per list and a
    (log-)uniform per range; mechanisms become their labels there, which Optuna can handle."""
    from ray import tune

    if spec.search == "grid":
        return {key: tune.grid_search(values) for key, values in spec.space.items()}
    space: dict[str, Any] = {}
    for key, values in spec.space.items():
        if isinstance(values, dict):
            space[key] = (tune.loguniform if values.get("log") else tune.uniform)(values["low"], values["high"])
            continue
        if key == "mechanism":
            values = [mechanism_label(m) for m in values]
        space[key] = values[0] if len(values) == 1 else tune.choice(values)
    return space


def _search_alg(spec: SweepSpec):
    """Optuna's TPE (seeded) minimising objective_s, or Tune's seeded random draws; None for the grid."""
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric="objective_s", mode="min", seed=spec.search_seed)
    if spec.search == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.search_seed)
    return None


def _tune_config(spec: SweepSpec, search_alg=None):
    """Tune's config; ``search_alg``: the grid with its edge rounds (``tuning.rounds.EdgeSearcher``), which
    hands out trials until it says it has finished (``num_samples = -1``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if spec.scheduler == "asha":
        # Train accuracy at equal budget (training seconds by default: the objective's own clock);
        # every evaluation is a Tune result, and trials also stop at the target by themselves.
        scheduler = ASHAScheduler(
            metric="train/accuracy",
            mode="max",
            time_attr=spec.asha_time_attr,
            # Ray's stubs say int; ASHA's rungs are compared with a float time budget (training seconds).
            max_t=1e9,  # pyright: ignore[reportArgumentType]
            grace_period=spec.asha_grace_period,  # pyright: ignore[reportArgumentType]
            reduction_factor=spec.asha_reduction_factor,
        )
    return tune.TuneConfig(
        num_samples=-1 if search_alg is not None else (spec.num_samples or 1) if spec.search != "grid" else 1,
        max_concurrent_trials=spec.max_concurrent_trials,
        scheduler=scheduler,
        search_alg=search_alg or _search_alg(spec),
        reuse_actors=REUSE_TRIAL_ACTORS and scheduler is None,
    )


def split_storage_dir(tune_dir: str) -> tuple[str, str]:
    """(storage path, experiment name) of a Tune folder, path or URI (``Path`` would fold ``s3://`` to ``s3:/``)."""
    parent, _, name = tune_dir.rstrip("/").rpartition("/")
    return parent, name


def _start_parent(spec: SweepSpec, resume: bool) -> tuple[str, str, bool]:
    """The sweep's parent run id, Tune folder and whether its edge rounds run inside the grid's Tune experiment
    (``tuning.rounds``): a new parent run, or with ``resume`` the latest unfinished one."""
    if resume:
        run = newest_sweep(spec.tracking_uri, spec.name, running_only=True)
        if run is None:
            raise ConfigError(
                f"--resume: sweep {spec.name!r} has no interrupted run in {spec.tracking_uri}; "
                "run it without --resume to start a new one."
            )
        return run.info.run_id, run.data.tags[TUNE_DIR_TAG], run.data.tags.get(EXTEND_INLINE_TAG) == "1"
    inline = INLINE_EDGE_ROUNDS and spec.extend_edges and spec.search == "grid"
    tags = {KIND_TAG: SWEEP_KIND, **({EXTEND_INLINE_TAG: "1"} if inline else {})}
    parent_run_id = create_run(
        spec.tracking_uri, spec.name, f"sweep-{spec.name}", _spec_params(spec), provenance_tags(tags)
    )
    tune_dir = f"{storage_root(spec.storage_path)}/{spec.name}-{parent_run_id[:12]}"
    Tracker(spec.tracking_uri, parent_run_id, enabled=True).set_tags({TUNE_DIR_TAG: tune_dir})
    return parent_run_id, tune_dir, inline


def run_sweep(spec: SweepSpec, resume: bool = False, verbose: bool = False) -> SweepOutcome:
    """Run (or resume) a sweep on Ray Tune and record it in MLflow; returns its summary.

    ``verbose``: Tune's status tables and every worker's progress lines; by default one line per
    trial start and end (``tuning.console``).

    Raises:
        raygd.train.Interrupted: SIGINT or SIGTERM stopped the sweep; its parent run (``run_id``) stays RUNNING,
            tagged with the signal and the trials finished of the total (``trials``), for ``resume``.
    """
    from raygd.data import load_data
    from raygd.pool import data_key
    from raygd.ray_env import ensure_ray
    from raygd.train import interrupted, keeping_stop_signals

    configs = [spec.run_config(p) for p in spec.trial_params()]
    _say(f"raygd sweep {spec.name}: checking the data ({configs[0].data.name}) ...")
    data = load_data(configs[0].data, configs[0].train.seed)  # a missing or broken data set fails here, before Ray
    _check_workloads(configs, data)
    shapes = {(c.train.num_workers, c.train.cpus_per_worker, c.train.device) for c in configs}
    if spec.trial_pool and len(shapes) > 1:
        raise ConfigError(
            f"trial_pool = true needs one worker shape (train.num_workers, cpus_per_worker, device) "
            f"for every trial, the space gives {sorted(shapes)}: set sweep.trial_pool=false."
        )
    per_trial = max(c.train.num_workers * c.train.cpus_per_worker for c in configs)
    cpus = per_trial * spec.max_concurrent_trials
    if resume:  # finds the interrupted run, or refuses before any Ray work
        parent_run_id, tune_dir, inline = _start_parent(spec, resume)
        clear_interruption(spec.tracking_uri, parent_run_id)
    else:  # the new parent run (a new SQLite store's tables: ~4.6 CPU s) while Ray starts, which mostly waits
        with ThreadPoolExecutor(1, thread_name_prefix="raygd-parent") as background:
            parent = background.submit(_start_parent, spec, False)
            try:
                with keeping_stop_signals():  # Ray's start replaces the handler of SIGTERM
                    ensure_ray(cpus, log_to_driver=verbose)  # workers' logs: -v only
            except KeyboardInterrupt as err:  # before any trial: the parent is there to resume all the same
                stop = interrupted(err)
                stop.run_id = parent.result()[0]
                raise stop from None if stop is err else err
            parent_run_id, tune_dir, inline = parent.result()
    pools, stop = None, None
    try:
        if resume:
            with keeping_stop_signals():
                ensure_ray(cpus, log_to_driver=verbose)
        if spec.trial_pool:
            _say(
                f"starting {spec.max_concurrent_trials} warm worker group(s) of {configs[0].train.num_workers} "
                "workers; trials follow as soon as one is up ..."
            )
            pools = _start_pools(spec, configs[0], parent_run_id, tune_dir)
        preloaded = (data_key(configs[0]), data)  # the trials' data when theirs is this one (tuning.trial)
        _run_phases(spec, parent_run_id, tune_dir, resume, verbose, pools.name if pools else None, inline, preloaded)
        if pools is not None:
            start_s = pools.start_s()
            if start_s is not None:  # the pool's own start, once per sweep
                Tracker(spec.tracking_uri, parent_run_id, enabled=True).log_metrics({"pool/start_s": start_s}, step=0)
        if pools is not None:  # before the close
            pools.stop()
            pools = None
        return close_sweep(spec.tracking_uri, parent_run_id)
    except KeyboardInterrupt as err:  # tagged first: a job's stop sends SIGKILL a while after its SIGTERM
        stop = interrupted(err)
        stop.run_id = parent_run_id
        with contextlib.suppress(Exception):  # the store may be going down with the node
            stop.trials = record_interruption(
                spec.tracking_uri, parent_run_id, stop.signal_name, _planned_trials(spec, parent_run_id)
            )
        if stop is err:
            raise
        raise stop from err
    finally:
        if pools is not None:
            _stop_pools(pools, spec.tracking_uri, parent_run_id, stop)


INTERRUPTED_POOLS_STOP_S = 10.0
"""How long an interrupted sweep waits for its pools to abandon their trials in flight before it ends them."""


def _stop_pools(pools, tracking_uri: str, parent_run_id: str, stop=None) -> None:
    """Stop the sweep's pools; interrupted (``stop``), the trials in flight are abandoned first (``--resume`` continues
    them from their checkpoints or redoes them), and a Ray going down too (a SIGTERM to the whole node) is no error.
    After a second signal they are left to end with the driver."""
    if stop is None:
        pools.stop()
        return
    if stop.repeated:
        return
    from raygd.pool import cancel_trial

    with contextlib.suppress(Exception):
        for run in child_runs(tracking_uri, parent_run_id, running_only=True):
            cancel_trial(parent_run_id, run.info.run_id)
        pools.stop(timeout_s=INTERRUPTED_POOLS_STOP_S)


def _record_stop(spec: SweepSpec, parent_run_id: str, signal_name: str) -> None:
    """Tag the parent as interrupted as a stop begins (``run_sweep`` tags it again with the final counts)."""
    with contextlib.suppress(Exception):  # best effort: the store may be what is going down
        record_interruption(spec.tracking_uri, parent_run_id, signal_name, _planned_trials(spec, parent_run_id))


def _planned_trials(spec: SweepSpec, parent_run_id: str) -> int:
    """The trials the sweep has planned so far: its search (the grid, or ``num_samples``), each edge round that has
    started (planned again from the trials before it, as ``--resume`` plans it) and the confirm phase, if started."""
    from tuning.rounds import RoundPlanner

    runs = child_runs(spec.tracking_uri, parent_run_id)
    total = len(spec.trial_params()) if spec.search == "grid" else spec.num_samples or 1
    rounds = sorted({int(r.data.tags[EXTEND_ROUND_TAG]) for r in runs if EXTEND_ROUND_TAG in r.data.tags})
    planner = RoundPlanner(spec, parent_run_id)
    total += sum(len(planner(k)) for k in rounds)
    if any(r.data.tags.get(PHASE_TAG) == CONFIRM_PHASE for r in runs):
        total += len(confirm_params(spec, collect_sweep(spec.tracking_uri, parent_run_id).best_rows))
    return max(total, len(runs))


def _check_workloads(configs: list, data) -> None:
    """Build each distinct (model, mechanism) of the space once and check it (``raygd.models.check_workload``):
    a user's model that does not import, build or fit the labels fails here, before Ray or MLflow."""
    from raygd.models import check_workload

    seen = set()
    for cfg in configs:
        key = (cfg.train.model, repr(cfg.train.model_args), cfg.mechanism.name, repr(cfg.mechanism.dropconnect_layers))
        if key not in seen:
            seen.add(key)
            check_workload(cfg, data)


def _say(line: str) -> None:
    """A line for the user waiting on a long step (printed with or without ``verbose``)."""
    print(line, flush=True)


def _run_phases(
    spec: SweepSpec,
    parent_run_id: str,
    tune_dir: str,
    resume: bool,
    verbose: bool,
    pools_name: str | None,
    inline: bool = False,
    preloaded: tuple[str, Any] | None = None,
) -> None:
    """The search with its edge rounds (``inline``: in one Tune experiment, ``tuning.rounds``), then the
    confirm phase (each mechanism's winner with fresh seeds), on Ray Tune."""
    from ray import tune

    from tuning.callbacks import TrialRecorder
    from tuning.console import ConsoleReporter
    from tuning.rounds import EdgeSearcher, RoundPlanner, ordered_grid

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            spec=spec,
            parent_run_id=parent_run_id,
            pools_name=pools_name,
            progress=verbose,
            preloaded=preloaded,
        ),
        {"cpu": 0, "memory": 2**20},
    )  # the trial only waits on its workers
    recorder = TrialRecorder(spec.tracking_uri, parent_run_id)
    stopping = functools.partial(_record_stop, spec, parent_run_id)
    total = len(spec.trial_params()) if spec.search == "grid" else spec.num_samples or 1
    sequential = spec.max_concurrent_trials == 1
    console = None if verbose else ConsoleReporter(total, sequential=sequential)
    if inline or spec.trial_order != "grid":  # a searcher hands out the grid (in its order), then any rounds
        rounds = spec.extend_edges_rounds if inline else 0
        searcher = EdgeSearcher(ordered_grid(spec), RoundPlanner(spec, parent_run_id), rounds, say=_say)
        _fit_tuner(trainable, tune_dir, {}, _tune_config(spec, searcher), resume, recorder, console, stopping)
    else:
        _fit_tuner(trainable, tune_dir, _param_space(spec), _tune_config(spec), resume, recorder, console, stopping)
    if spec.extend_edges and spec.search != "grid":
        _say(f"extend_edges: skipped, {spec.search} search has no grid edges")
    elif spec.extend_edges and not inline:  # a sweep started before tuning.rounds (resumed), or the bench's A side
        _extend_edges(spec, parent_run_id, tune_dir, resume, verbose, trainable, recorder)
    if not spec.confirm_seeds:
        return
    winners = confirm_params(spec, collect_sweep(spec.tracking_uri, parent_run_id).best_rows)
    if winners:
        _say(f"confirm phase: {len(winners)} trials (each mechanism's winner with seeds {spec.confirm_seeds})")
        _fit_tuner(
            trainable,
            tune_dir + "-confirm",
            {CONFIRM_PARAM: tune.grid_search(winners)},
            tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=REUSE_TRIAL_ACTORS),
            resume,
            recorder,
            None if verbose else ConsoleReporter(len(winners), sequential=sequential),
            stopping,
        )


def _extend_edges(
    spec: SweepSpec, parent_run_id: str, tune_dir: str, resume: bool, verbose: bool, trainable, recorder
) -> None:
    """Edge rounds each in a Tune experiment of its own, in the same parent run, until the planner
    (``RoundPlanner``) plans nothing or ``extend_edges_rounds``: how a sweep without ``EXTEND_INLINE_TAG``
    (started before ``tuning.rounds``: the §4 re-run, docs/RESULTS.md) resumes, and the A side of
    ``bench/sweep_overhead.py --ab rounds``."""
    from ray import tune

    from tuning.console import ConsoleReporter
    from tuning.rounds import RoundPlanner

    planner = RoundPlanner(spec, parent_run_id)
    for k in range(1, spec.extend_edges_rounds + 1):
        params = planner(k)  # on --resume, round k's own trials are ignored: Tune restores that round
        if not params:
            return
        _say(f"grid edges, round {k}/{spec.extend_edges_rounds}: {len(params)} trials beyond the winners' edges")
        best = _fastest(planner.records or [])
        _fit_tuner(
            trainable,
            f"{tune_dir}-extend{k}",
            {EXTEND_PARAM: tune.grid_search(params), EXTEND_ROUND_PARAM: k},
            tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=REUSE_TRIAL_ACTORS),
            resume,
            recorder,
            None if verbose else ConsoleReporter(len(params), sequential=spec.max_concurrent_trials == 1, best=best),
            functools.partial(_record_stop, spec, parent_run_id),
        )


def _fastest(records: list) -> tuple[float, str] | None:
    """The fastest reached trial so far, as the console's "best" (time, description)."""
    fastest = min((r for r in records if r.reached), key=lambda r: r.time_to_accuracy_s, default=None)
    if fastest is None:
        return None
    return fastest.time_to_accuracy_s, f"{fastest.mechanism} γ={fastest.step_size:g} B={fastest.global_batch_size}"


def _start_pools(spec: SweepSpec, cfg, parent_run_id: str, tune_dir: str):
    """``max_concurrent_trials`` warm worker groups of the sweep's shape (``raygd.pool``), their Train runs
    beside the Tune folder and named by the parent run, so a resumed sweep finds their checkpoints."""
    from raygd.pool import start_pools
    from raygd.ray_env import use_gpu

    return start_pools(
        cfg, spec.max_concurrent_trials, parent_run_id, split_storage_dir(tune_dir)[0], gpu=use_gpu(cfg.train.device)
    )


def _fit_tuner(
    trainable, tune_dir: str, param_space: dict, tune_config, resume: bool, recorder, console, stopping=None
) -> None:
    """Run (or restore) one Tune experiment; with ``console``, Tune itself prints nothing. ``stopping``: called with
    the signal's name, in a thread of its own, when a stop signal arrives (``stop_tune_on_signal``)."""
    from ray import tune

    callbacks = [recorder] if console is None else [recorder, console]
    with quiet_tune(console is not None), fail_on_lost_state(tune_dir), stop_tune_on_signal(stopping):
        if resume and tune.Tuner.can_restore(tune_dir):
            tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True)
        else:
            storage_path, name = split_storage_dir(tune_dir)
            run_config = tune.RunConfig(
                name=name, storage_path=storage_path, callbacks=callbacks, verbose=0 if console else None
            )
            tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
        tuner.fit()


def confirm_params(spec: SweepSpec, best_rows: list) -> list[dict[str, Any]]:
    """Trial params re-running each mechanism's fastest reached pair with every confirm seed."""
    from tuning.rounds import pair_params

    labels = {mechanism_label(m) for m in spec.space.get("mechanism", [{"name": "vanilla"}])}
    return [
        params
        for row in best_rows
        if row.time_to_accuracy_s is not None and math.isfinite(row.time_to_accuracy_s) and row.mechanism in labels
        for params in pair_params(spec, row.mechanism, row.step_size, row.global_batch_size, spec.confirm_seeds)
    ]


def _spec_params(spec: SweepSpec) -> dict[str, Any]:
    params = {
        f"base.{k}": v
        for k, v in spec.run_config(spec.trial_params()[0]).flat().items()
        if not k.startswith(("train.step_size", "train.global_batch_size", "train.seed"))
    }
    params.update({f"space.{k}": json.dumps(v) for k, v in spec.space.items()})
    params.update(
        search=spec.search,
        scheduler=spec.scheduler,
        num_samples=spec.num_samples,
        search_seed=spec.search_seed,
        num_trials=len(spec.trial_params()) if spec.search == "grid" else spec.num_samples or 1,
    )
    if spec.scheduler == "asha":
        params.update(
            asha_time_attr=spec.asha_time_attr,
            asha_grace_period=spec.asha_grace_period,
            asha_reduction_factor=spec.asha_reduction_factor,
        )
    return params
