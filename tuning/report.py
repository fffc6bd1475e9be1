"""A sweep's results from MLflow: its trial records and tables, written to files and logged to its parent run.

    outcome = collect_sweep(uri, parent_run_id)   # read only: raygd report, the confirm phase, bench/paper
    outcome = close_sweep(uri, parent_run_id)     # the end of a sweep: also log its outputs and end the parent
    record_interruption(uri, parent_run_id, "SIGINT", total)   # an interrupted sweep: its parent stays RUNNING
    write_outputs(Path("out"), outcome.records, outcome.best_rows, outcome.table)

Every number comes from the child runs in MLflow (``raygd.records``), so a report rebuilt later
shows what the sweep printed. Tests: ``pytest tests/test_sweep.py`` (with real sweeps).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from raygd import critical
from raygd.records import (
    CONFIRM_PHASE,
    INTERRUPTED_TAG,
    PHASE_TAG,
    STOPPED_STEP_TAG,
    TRIALS_FINISHED_TAG,
    TRIALS_TOTAL_TAG,
    Status,
    TrialRecord,
    child_runs,
    end_run,
    mlflow_client,
    params_target,
)
from raygd.tracking import Tracker
from tuning import confirm, edges, figures, loss_ratio, stats, tables


@dataclass
class SweepOutcome:
    """What a sweep produced: its parent run, trial records, best rows and summary table."""

    parent_run_id: str
    records: list
    best_rows: list
    table: str
    """Everything: the summary (with B_D and notes), the per-batch table, the confirm table."""
    console_table: str = ""
    """What the terminal shows: the summary, the critical batch size and the confirm table (the per-batch table
    is in summary.md)."""
    critical: list = field(default_factory=list)
    """``raygd.critical.CriticalFit`` per (mechanism, replication) when the sweep tried several batch sizes."""


def target_label(runs: list) -> str | None:
    """The sweep's target from its children's params (``train loss <= 1.5``, ``train accuracy >= 0.8``);
    None when they disagree or record none."""
    labels = {params_target(run.data.params) for run in runs} - {None}
    return labels.pop() if len(labels) == 1 else None


def collect_sweep(tracking_uri: str, parent_run_id: str) -> SweepOutcome:
    """A sweep's records, best pair per mechanism and summary table (with the confirm phase's, if any),
    read from its child runs; changes nothing in MLflow."""
    runs = child_runs(tracking_uri, parent_run_id)
    confirm_runs = [r for r in runs if r.data.tags.get(PHASE_TAG) == CONFIRM_PHASE]
    records = [TrialRecord.from_run(r) for r in runs if r.data.tags.get(PHASE_TAG) != CONFIRM_PHASE]
    # With several replication factors the table ranks the unreplicated data (the smallest r).
    replication = min((r.replication for r in records), default=1)
    best = stats.best_per_mechanism(records, replication=replication)
    table = console = tables.summary_markdown(best, target_label(runs), edges.describe_extensions(records))
    by_batch = stats.per_batch(records, replication=replication)
    fits = critical_fits(records)
    if fits:
        table += "\n" + tables.critical_markdown(fits)
        console = table
    if len({r.global_batch_size for r in by_batch}) > 1:
        table += "\n" + tables.batch_markdown(by_batch)
    if confirm_runs:
        confirmed = tables.confirm_markdown(confirm.confirm_summary([TrialRecord.from_run(r) for r in confirm_runs]))
        table += "\n\n" + confirmed
        console += "\n" + confirmed
    return SweepOutcome(parent_run_id, records, best, table, console.rstrip("\n"), fits)


def critical_fits(records: list) -> list:
    """B_crit per (mechanism, replication) (``raygd.critical``) when the records hold several batch sizes, else []."""
    if len({r.global_batch_size for r in records}) < 2:
        return []
    return critical.critical_batch(records)


def end_unfinished_children(tracking_uri: str, parent_run_id: str) -> None:
    """End the child runs that nothing else ended: only at the end of a sweep (never touch a live one).

    ``tuning.callbacks.TrialRecorder`` ends stopped and errored trials; a run still RUNNING now
    belongs to a trial that died unrecorded (failed). A run the scheduler stopped is set back to
    stopped_early, as its dying trial's ``fit()`` may have marked it failed since.
    """
    client = mlflow_client(tracking_uri)
    for run in child_runs(tracking_uri, parent_run_id):
        if run.info.status != "FINISHED" and STOPPED_STEP_TAG in run.data.tags:
            end_run(client, run.info.run_id, Status.STOPPED_EARLY)
        elif run.info.status == "RUNNING":
            end_run(client, run.info.run_id, Status.FAILED)


def finished_for_good(run) -> bool:
    """Whether a child run's trial has ended for good: FINISHED, or stopped early by the scheduler (ASHA). A resumed
    sweep reports such a trial again without training (``tuning.trial``); a partial or failed one runs again."""
    return run.info.status == "FINISHED" or STOPPED_STEP_TAG in run.data.tags


def record_interruption(tracking_uri: str, parent_run_id: str, signal_name: str, total: int) -> tuple[int, int]:
    """Tag an interrupted sweep's parent run with the signal and its trials finished of ``total``, leaving it RUNNING
    for ``raygd sweep --resume``, and return (finished, total). No table: the grid is not done."""
    finished = sum(finished_for_good(r) for r in child_runs(tracking_uri, parent_run_id))
    total = max(total, finished)
    Tracker(tracking_uri, parent_run_id, enabled=True).set_tags(
        {INTERRUPTED_TAG: signal_name, TRIALS_FINISHED_TAG: finished, TRIALS_TOTAL_TAG: total}
    )
    return finished, total


def clear_interruption(tracking_uri: str, parent_run_id: str) -> None:
    """Remove ``record_interruption``'s tags from a sweep that resumes: the tags say what is interrupted now."""
    client = mlflow_client(tracking_uri)
    tags = client.get_run(parent_run_id).data.tags
    for key in (INTERRUPTED_TAG, TRIALS_FINISHED_TAG, TRIALS_TOTAL_TAG):
        if key in tags:
            client.delete_tag(parent_run_id, key)


NOTE_TAG = "mlflow.note.content"
"""MLflow's run description (markdown), shown at the top of the run's page."""


def close_sweep(tracking_uri: str, parent_run_id: str) -> SweepOutcome:
    """End a sweep: end its unfinished child runs, collect it, log its table, CSVs, figures and best
    pairs to the parent run, and end the parent run FINISHED."""
    end_unfinished_children(tracking_uri, parent_run_id)
    outcome = collect_sweep(tracking_uri, parent_run_id)
    tracker = Tracker(tracking_uri, parent_run_id, enabled=True)
    tracker.log_metrics(_parent_metrics(outcome) | _critical_metrics(outcome.critical), step=0)
    tracker.set_tags({NOTE_TAG: outcome.table})  # the run page's description shows the answer
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_outputs(Path(tmp), outcome.records, outcome.best_rows, outcome.table):
            tracker.log_artifact(path)
    tracker.finish("FINISHED")
    return outcome


def _parent_metrics(outcome: SweepOutcome) -> dict[str, float]:
    """Trial counts, and per mechanism its best pair and speedup (keys without MLflow's forbidden characters)."""
    metrics: dict[str, float] = {
        "num_trials": len(outcome.records),
        "num_reached": sum(r.reached for r in outcome.records),
    }
    for row in outcome.best_rows:
        key = _metric_key(row.mechanism)
        if row.time_to_accuracy_s is not None and math.isfinite(row.time_to_accuracy_s):
            metrics[f"best/{key}/time_to_accuracy_s"] = row.time_to_accuracy_s
            metrics[f"best/{key}/global_batch_size"] = row.global_batch_size
            metrics[f"best/{key}/step_size"] = row.step_size
        if row.speedup is not None:
            metrics[f"speedup/{key}"] = row.speedup
        if row.batch_bound_w0 is not None:
            metrics[f"bound/{key}/batch_bound_w0"] = row.batch_bound_w0
        if row.batch_over_bound is not None:
            metrics[f"bound/{key}/batch_over_bound"] = row.batch_over_bound
    return metrics


def _metric_key(mechanism: str) -> str:
    """A mechanism label without MLflow's forbidden characters: ``dropconnect(p=0.4)`` → ``dropconnect_p0.4``."""
    return mechanism.replace("(", "_").replace(")", "").replace("=", "").replace(", ", "_")


def _critical_metrics(fits: list) -> dict[str, float]:
    """``critical_batch/<mechanism>`` with ``_low``/``_high`` (95% over seeds), ``_over_bound`` (B_crit / B_D at
    w0), ``_s_min``, ``_e_min`` and ``_b_opt``; ``_r<r>`` after the mechanism for r > 1. Finite values only."""
    metrics: dict[str, float] = {}
    for f in fits:
        key = "critical_batch/" + _metric_key(f.mechanism) + (f"_r{f.replication}" if f.replication != 1 else "")
        values = {"": f.b_crit, "_low": f.b_crit_low, "_high": f.b_crit_high, "_over_bound": f.over_bound(f.b_crit)}
        values |= {"_s_min": f.s_min, "_e_min": f.e_min, "_b_opt": f.b_opt}
        metrics |= {key + k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    return metrics


def write_outputs(out: Path, records: list, best: list, table: str) -> list[Path]:
    """summary.md, summary.csv, pairs.md, pairs.csv, trials.csv and the figures of a sweep, written into ``out``;
    with several batch sizes also critical.csv and critical_batch.png (``raygd.critical``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    reps = {r.replication for r in records}
    pairs = stats.every_pair(records, replication=min(reps, default=1))
    (out / "pairs.md").write_text(tables.pairs_markdown(pairs))
    paths = [
        out / "summary.md",
        tables.write_summary_csv(best, out / "summary.csv"),
        out / "pairs.md",
        tables.write_pairs_csv(pairs, out / "pairs.csv"),
        tables.write_trials_csv(records, out / "trials.csv"),
    ]
    bounds = {r.mechanism: r.batch_bound_w0 for r in best if r.batch_bound_w0 is not None}
    paths.append(
        figures.plot_time_vs_batch(records, out / "time_vs_batch.png", replication=min(reps, default=1), bounds=bounds)
    )
    paths.append(figures.plot_speedup_bars(best, out / "speedup.png"))
    batches = sorted({r.global_batch_size for r in records})
    if len(reps) > 1 and len(batches) > 1:
        # runs at different B stop after ceil(passes * n / B) updates: passes agree to within B/n
        rows = loss_ratio.loss_ratios(records, small_batch=batches[0], large_batch=batches[-1], passes_tol=0.05)
        paths.append(figures.plot_loss_ratio(rows, out / "loss_ratio_vs_r.png"))
    fits = critical_fits(records)
    if fits:
        paths.append(tables.write_critical_csv(fits, out / "critical.csv"))
        paths.append(figures.plot_critical_batch(fits, out / "critical_batch.png"))
    return paths
