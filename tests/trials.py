"""Trial records for the tests of tuning/stats.py, tuning/tables.py and tuning/figures.py: one plain dict per trial,
as a trial reports it."""

from __future__ import annotations

import itertools
import math

_ids = itertools.count()


def rec(mechanism="vanilla", step_size=0.1, global_batch_size=256, seed=0, time=None, status=None, **kw) -> dict:
    """A trial record dict; a given time means the target was reached."""
    status = status or ("reached_target" if time is not None else "max_passes")
    reached = status == "reached_target" and time is not None
    d = {
        "trial_id": kw.pop("trial_id", f"t_{next(_ids):05d}"),
        "run_id": "r",
        "mechanism": mechanism,
        "step_size": step_size,
        "global_batch_size": global_batch_size,
        "seed": seed,
        "replication": kw.pop("replication", 1),
        "status": status,
        "time_to_accuracy_s": time,
        "passes_to_accuracy": kw.pop("passes_to_accuracy", time / 10 if reached else None),
        "updates_to_accuracy": 100 if reached else None,
        "final_train_loss": kw.pop("loss", 0.4),
        "final_train_accuracy": kw.pop("acc", 0.96 if reached else 0.8),
        "passes": kw.pop("passes", 5.0),
        "train_time_s": time or 50.0,
    }
    optional = {"batch_bound_w0", "batch_bound_w0_se", "batch_bound_median", "generalization_gap_at_target"}
    optional |= {"eval_resolution_passes", "phase", "bound_of", "extend_round"}
    assert set(kw) <= optional, kw
    return {**d, **kw}


def seeds(mechanism, step_size, batch, times, **kw) -> list[dict]:
    """One record per seed; a None time is a seed that did not reach (max_passes)."""
    return [rec(mechanism, step_size, batch, seed=s, time=t, **kw) for s, t in enumerate(times)]


def sweep_records() -> list[dict]:
    """Three mechanisms over a few (step size, B) pairs and three seeds, vanilla with an unreached pair."""
    return (
        seeds("vanilla", 0.1, 256, [10.0, 12.0, 11.0])
        + seeds("vanilla", 0.2, 512, [14.0, 13.0, 15.0])
        + seeds("vanilla", 0.4, 1024, [None, None, None])
        + seeds("dc(p=0.4)", 0.1, 256, [9.0, 9.5, 10.0])
        + seeds("dc(p=0.4)", 0.2, 512, [7.0, 8.0, 8.5])
        + seeds("dc(p=0.4)", 0.4, 512, [2.0, 3.0, None])  # fastest seeds, but one did not reach
        + seeds("sgld", 0.1, 256, [20.0, 21.0, 25.0])
    )


def loss_record(mech, batch, step, seed, loss, replication=1, **kw):
    """A record for the loss ratio: a nan or None loss is a diverged trial."""
    status = "diverged" if loss is None or math.isnan(loss) else "max_passes"
    return rec(mech, step, batch, seed=seed, status=status, loss=loss, replication=replication, **kw)
