"""Ray Tune sweeps for the fastest wall-clock time to a target accuracy.

A trial is a Tune function that builds and fits a ``TorchTrainer`` through
``raygd.train.fit`` (the Train V2 pattern: Tune never receives a trainer object).
Every trial stops at the target inside the training loop; with a scheduler (ASHA), rank
zero's evaluations reach Tune through ``TuneReportCallback`` (with the provisional objective
added, see ``tuning.callbacks``), and the trial's final summary is its last report. Search is a
grid, random draws, or Optuna's TPE (``OptunaSearch``) minimising ``objective_s``, the
time to accuracy with a finite penalty for misses (``tuning.objective``); ASHA may stop
trials that lag, and their MLflow runs are ended ``stopped_early`` as they stop.
MLflow holds one parent run per sweep and one child run per trial (``mlflow.parentRunId``),
created by raygd itself rather than Ray's MLflow callback, whose nesting does not give one
child per trial under a parent we own.

    raygd sweep quickstart                     # a preset from tuning/presets/
    raygd sweep my-sweep.yaml --set train.target_accuracy=0.85
    raygd sweep quickstart --resume            # finish the latest interrupted sweep
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raygd.config import ConfigError
from raygd.tracking import PARENT_TAG, Tracker, create_run, provenance_tags
from tuning import analysis
from tuning.objective import objective_s
from tuning.spec import SweepSpec, mechanism_label

KIND_TAG, TRIAL_TAG, KEY_TAG, TUNE_DIR_TAG = "raygd.kind", "raygd.trial_id", "raygd.trial_key", "raygd.tune_dir"
PHASE_TAG, STATUS_TAG, STOPPED_STEP_TAG = "raygd.phase", "raygd.status", "raygd.stopped_at_step"
REUSE_TRIAL_ACTORS = True
"""Run trials in one warm Tune actor (its imports of torch, Ray Train and MLflow done once), not one each:
~5 CPU s less per trial (bench/sweep_overhead.py --ab reuse). Not with a scheduler: Tune would hand the
actor of a stopped trial, still inside fit(), to the next trial, whose reset then fails."""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    """All child runs of a sweep's parent run (any status)."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10000)


def _trial_metrics(summary_metrics: dict[str, float], status: str) -> dict[str, Any]:
    """A trial's final Tune result: its summary, status and objective, and the per-evaluation keys
    (train/accuracy, time/train_s, progress/passes) that ASHA reads from every result."""
    acc = summary_metrics.get("final_train_accuracy")
    return {**summary_metrics, "status": status,
            "objective_s": objective_s(status, summary_metrics.get("time_to_accuracy_s"), acc),
            "train/accuracy": acc if acc is not None else float("nan"),
            "time/train_s": summary_metrics.get("train_time_s", 0.0),
            "progress/passes": summary_metrics.get("passes", 0.0)}


_DATA_CACHE: dict[str, Any] = {}
"""The last data set a trial loaded in this process, by data config and seed: a reused trial actor
(``REUSE_TRIAL_ACTORS``) skips reloading it (~0.9 s for 10k Fashion-MNIST examples)."""


def _trial_data(cfg):
    from raygd.data import load_data

    key = json.dumps([dataclasses.asdict(cfg.data), cfg.train.seed], sort_keys=True, default=str)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one data set at a time: trials of a grid mostly share it
        _DATA_CACHE[key] = load_data(cfg.data, cfg.train.seed)
    return _DATA_CACHE[key]


def trial_key(params: dict[str, Any]) -> str:
    """A stable key for a trial's parameters: a resumed sweep finds its earlier child run by it."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_trial(params: dict[str, Any], *, spec: SweepSpec, parent_run_id: str) -> None:
    """One Tune trial: fit one run (or reuse a finished child run of this trial) and report its summary.

    An interrupted sweep may re-run a trial: a child run with the same parameters that
    finished is reported again without training. A partial one is reattached when the
    trial checkpoints (``train.max_failures`` or ``train.checkpoint_every_steps``): the same
    MLflow run continues from the Ray Train checkpoint of the same name, logging only the
    steps after those already recorded. Without checkpoints it is deleted and redone from
    step 0, so that its time-to-accuracy is not charged for the work the kill threw away.
    Either way the parent keeps exactly one child per trial.
    """
    from ray import tune

    from raygd.train import fit
    from tuning.callbacks import TrialReportCallback

    entry_wall = time.time()
    phase = "confirm" if "confirm" in params else "search"
    params = spec.decode(params.get("confirm", params))
    cfg = spec.run_config(params)
    trial_id, key = tune.get_context().get_trial_id(), trial_key({**params, "phase": phase})
    client = _client(cfg.tracking.tracking_uri)
    reattach = None
    for run in child_runs(cfg.tracking.tracking_uri, parent_run_id):
        if run.data.tags.get(KEY_TAG) != key:
            continue
        if run.info.status == "FINISHED":  # finished before an interruption: report it, do not train again
            tune.report(_trial_metrics(run.data.metrics, run.data.tags.get("raygd.status", "max_passes")))
            return
        if cfg.train.checkpoint_interval and reattach is None:
            reattach = run.info.run_id  # a partial run of an interrupted trial: continue it from its checkpoint
        else:
            client.delete_run(run.info.run_id)  # nothing to continue from: this trial starts over
    label = mechanism_label(params.get("mechanism", cfg.mechanism.__dict__))
    cfg.tracking.run_name = (f"{trial_id}-{label}-B{cfg.train.global_batch_size}-lr{cfg.train.step_size:g}"
                             f"-s{cfg.train.seed}")
    # Evaluations reach Tune only for a scheduler: each report is a barrier across the workers, and the
    # channel to the trial is one more actor process per trial; a searcher needs only the final report.
    callbacks = [TrialReportCallback()] if spec.scheduler != "none" else None
    summary = fit(cfg, data=_trial_data(cfg), parent_run_id=parent_run_id, train_callbacks=callbacks,
                  run_tags={TRIAL_TAG: trial_id, KEY_TAG: key, PHASE_TAG: phase, "raygd.mechanism_label": label},
                  run_id=reattach)
    client.log_metric(summary.run_id, "overhead/trial_to_first_step_s", summary.walls["first_step"] - entry_wall,
                      step=summary.steps)
    tune.report(_trial_metrics(summary.summary_metrics(), summary.status))


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


def _tune_config(spec: SweepSpec):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if spec.scheduler == "asha":
        # Train accuracy at equal budget (training seconds by default: the objective's own clock);
        # every evaluation is a Tune result, and trials also stop at the target by themselves.
        scheduler = ASHAScheduler(metric="train/accuracy", mode="max", time_attr=spec.asha_time_attr, max_t=1e9,
                                  grace_period=spec.asha_grace_period, reduction_factor=spec.asha_reduction_factor)
    return tune.TuneConfig(num_samples=(spec.num_samples or 1) if spec.search != "grid" else 1,
                           max_concurrent_trials=spec.max_concurrent_trials, scheduler=scheduler,
                           search_alg=_search_alg(spec), reuse_actors=REUSE_TRIAL_ACTORS and scheduler is None)


def _latest_unfinished_parent(spec: SweepSpec) -> tuple[str, str]:
    client = _client(spec.tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"--resume: sweep {spec.name!r} has no interrupted run in {spec.tracking_uri}; "
                          "run it without --resume to start a new one.")
    return runs[0].info.run_id, runs[0].data.tags[TUNE_DIR_TAG]


@dataclass
class SweepOutcome:
    """What a sweep produced: its parent run, trial records, best rows and summary table."""

    parent_run_id: str
    records: list
    best_rows: list
    table: str


def run_sweep(spec: SweepSpec, resume: bool = False) -> SweepOutcome:
    """Run (or resume) a sweep on Ray Tune and record it in MLflow; returns its summary."""
    from ray import tune

    from raygd.data import load_data
    from raygd.ray_env import ensure_ray
    from tuning.callbacks import TrialRecorder

    configs = [spec.run_config(p) for p in spec.trial_params()]
    load_data(configs[0].data, configs[0].train.seed)  # a missing or broken data set fails here, before Ray
    per_trial = max(c.train.num_workers * c.train.cpus_per_worker for c in configs)
    if resume:
        parent_run_id, tune_dir = _latest_unfinished_parent(spec)
    else:
        parent_run_id = create_run(spec.tracking_uri, spec.name, f"sweep-{spec.name}", _spec_params(spec),
                                   provenance_tags({KIND_TAG: "sweep"}))
        storage = Path(spec.storage_path or Path.home() / "ray_results").expanduser().resolve()
        tune_dir = str(storage / f"{spec.name}-{parent_run_id[:12]}")
        Tracker(spec.tracking_uri, parent_run_id, enabled=True).set_tags({TUNE_DIR_TAG: tune_dir})
    ensure_ray(per_trial * spec.max_concurrent_trials)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec, parent_run_id=parent_run_id),
                                    {"cpu": 0, "memory": 2**20})  # the trial only waits on its workers
    recorder = TrialRecorder(spec.tracking_uri, parent_run_id)
    _fit_tuner(trainable, tune_dir, _param_space(spec), _tune_config(spec), resume, recorder)
    if spec.confirm_seeds:
        winners = confirm_params(spec, finish_sweep(spec.tracking_uri, parent_run_id, spec.name, log=False).best_rows)
        if winners:
            _fit_tuner(trainable, tune_dir + "-confirm", {"confirm": tune.grid_search(winners)},
                       tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials,
                                       reuse_actors=REUSE_TRIAL_ACTORS), resume, recorder)
    return finish_sweep(spec.tracking_uri, parent_run_id, spec.name)


def _fit_tuner(trainable, tune_dir: str, param_space: dict, tune_config, resume: bool, recorder) -> None:
    from ray import tune

    if resume and tune.Tuner.can_restore(tune_dir):
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True)
    else:
        path = Path(tune_dir)
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent),
                                                     callbacks=[recorder]))
    tuner.fit()


def confirm_params(spec: SweepSpec, best_rows: list) -> list[dict[str, Any]]:
    """Trial params re-running each mechanism's fastest reached pair with every confirm seed."""
    mechs = {mechanism_label(m): m for m in spec.space.get("mechanism", [{"name": "vanilla"}])}
    out = []
    for row in best_rows:
        if row.time_to_accuracy_s is None or not math.isfinite(row.time_to_accuracy_s) or row.mechanism not in mechs:
            continue
        for seed in spec.confirm_seeds:
            params = {"step_size": row.step_size, "global_batch_size": row.global_batch_size,
                      "mechanism": mechs[row.mechanism], "seed": seed}
            if "replication" in spec.space:
                params["replication"] = min(spec.space["replication"])
            out.append(params)
    return out


def _spec_params(spec: SweepSpec) -> dict[str, Any]:
    params = {f"base.{k}": v for k, v in spec.run_config(spec.trial_params()[0]).flat().items()
              if not k.startswith(("train.step_size", "train.global_batch_size", "train.seed"))}
    params.update({f"space.{k}": json.dumps(v) for k, v in spec.space.items()})
    params.update(search=spec.search, scheduler=spec.scheduler, num_samples=spec.num_samples,
                  search_seed=spec.search_seed,
                  num_trials=len(spec.trial_params()) if spec.search == "grid" else spec.num_samples or 1)
    if spec.scheduler == "asha":
        params.update(asha_time_attr=spec.asha_time_attr, asha_grace_period=spec.asha_grace_period,
                      asha_reduction_factor=spec.asha_reduction_factor)
    return params


def record_from_run(run) -> dict[str, Any]:
    """An ``analysis.TrialRecord`` dict from an MLflow child run."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    status = t.get(STATUS_TAG)
    if run.info.status != "FINISHED" and (STOPPED_STEP_TAG in t or (status is None and run.info.status == "KILLED")):
        status = "stopped_early"  # stopped by the scheduler (untagged: by an older raygd)
    elif status is None or status == "failed" or run.info.status == "FAILED":
        status = "error"
    return {
        "trial_id": t.get(TRIAL_TAG, run.info.run_id), "run_id": run.info.run_id,
        "mechanism": t.get("raygd.mechanism_label", p.get("mechanism.name", "vanilla")),
        "step_size": float(p.get("train.step_size", "nan")),
        "global_batch_size": int(p.get("train.global_batch_size", 0)),
        "seed": int(p.get("train.seed", 0)), "replication": int(p.get("data.replication", 1)),
        "status": status, "time_to_accuracy_s": m.get("time_to_accuracy_s"),
        "passes_to_accuracy": m.get("passes_to_accuracy"), "updates_to_accuracy": m.get("updates_to_accuracy"),
        "final_train_loss": m.get("final_train_loss"), "final_train_accuracy": m.get("final_train_accuracy"),
        "passes": m.get("passes"), "train_time_s": m.get("train_time_s"),
    }


def finish_sweep(tracking_uri: str, parent_run_id: str, name: str, log: bool = True) -> SweepOutcome:
    """Analyse a sweep's child runs; with ``log``, first end child runs nothing else ended (their
    trial died unrecorded) and afterwards log table, CSVs and figures to the parent run and end it."""
    client = _client(tracking_uri)
    runs = child_runs(tracking_uri, parent_run_id)
    for run in runs if log else []:  # only at the end of a sweep: a report must not touch a live one
        if run.info.status != "FINISHED" and STOPPED_STEP_TAG in run.data.tags:
            # stopped by the scheduler (TrialRecorder); the dying trial's fit() may have marked it failed since
            client.set_tag(run.info.run_id, STATUS_TAG, "stopped_early")
            client.set_terminated(run.info.run_id, "KILLED")
        elif run.info.status == "RUNNING":  # TrialRecorder ends stopped and errored trials; this one died
            client.set_tag(run.info.run_id, STATUS_TAG, "failed")
            client.set_terminated(run.info.run_id, "FAILED")
    runs = child_runs(tracking_uri, parent_run_id)
    confirm_runs = [r for r in runs if r.data.tags.get(PHASE_TAG) == "confirm"]
    runs = [r for r in runs if r.data.tags.get(PHASE_TAG) != "confirm"]
    records = [analysis.TrialRecord.from_dict(record_from_run(r)) for r in runs]
    # With several replication factors the table ranks the unreplicated data (the smallest r).
    replication = min((r.replication for r in records), default=1)
    best = analysis.best_per_mechanism(records, replication=replication)
    table = analysis.summary_markdown(best)
    if confirm_runs:
        confirmed = analysis.confirm_summary([analysis.TrialRecord.from_dict(record_from_run(r))
                                              for r in confirm_runs])
        table += "\n\n" + confirm_markdown(confirmed)
    if log:
        _log_outputs(client, parent_run_id, records, best, table)
    return SweepOutcome(parent_run_id, records, best, table)


def confirm_markdown(rows: list) -> str:
    """The confirm phase as a table: mean ± std over fresh seeds, speedup with its bootstrap spread."""
    def pm(mean, std, fmt):
        return "–" if mean is None else f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")

    lines = ["Confirmed with fresh seeds (mean ± std over seeds; speedup = ratio of mean times, bootstrap std):",
             "", "| mechanism | step size | B | seeds | reached | time to acc (s) | passes | speedup vs vanilla |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.mechanism} | {r.step_size:g} | {r.global_batch_size} | {r.n_seeds} | "
                     f"{r.reached_frac:.0%} | {pm(r.time_mean_s, r.time_std_s, '.3g')} | "
                     f"{pm(r.passes_mean, r.passes_std, '.3g')} | {pm(r.speedup, r.speedup_std, '.2f')} |")
    return "\n".join(lines)


def _log_outputs(client, parent_run_id: str, records: list, best: list, table: str) -> None:
    tracker = Tracker(client.tracking_uri, parent_run_id, enabled=True)
    metrics = {"num_trials": len(records), "num_reached": sum(r.reached for r in records)}
    for row in best:
        key = row.mechanism.replace("(", "_").replace(")", "").replace("=", "").replace(", ", "_")
        if row.time_to_accuracy_s is not None and math.isfinite(row.time_to_accuracy_s):
            metrics[f"best/{key}/time_to_accuracy_s"] = row.time_to_accuracy_s
            metrics[f"best/{key}/global_batch_size"] = row.global_batch_size
            metrics[f"best/{key}/step_size"] = row.step_size
        if row.speedup is not None:
            metrics[f"speedup/{key}"] = row.speedup
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_outputs(Path(tmp), records, best, table):
            tracker.log_artifact(path)
    tracker.finish("FINISHED")


def write_outputs(out: Path, records: list, best: list, table: str) -> list[Path]:
    """summary.md, summary.csv, trials.csv and the figures of a sweep, written into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    paths = [out / "summary.md", analysis.write_summary_csv(best, out / "summary.csv"),
             analysis.write_trials_csv(records, out / "trials.csv")]
    reps = {r.replication for r in records}
    paths.append(analysis.plot_time_vs_batch(records, out / "time_vs_batch.png", replication=min(reps, default=1)))
    paths.append(analysis.plot_speedup_bars(best, out / "speedup.png"))
    batches = sorted({r.global_batch_size for r in records})
    if len(reps) > 1 and len(batches) > 1:
        # runs at different B stop after ceil(passes * n / B) updates: passes agree to within B/n
        rows = analysis.loss_ratios(records, small_batch=batches[0], large_batch=batches[-1], passes_tol=0.05)
        paths.append(analysis.plot_loss_ratio(rows, out / "loss_ratio_vs_r.png"))
    return paths


def latest_sweep(tracking_uri: str, experiment: str) -> str:
    """The run id of the newest sweep parent run in ``experiment``."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
                                                     order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ConfigError(f"experiment {experiment!r} has no raygd sweep in {tracking_uri}.")
    return runs[0].info.run_id
