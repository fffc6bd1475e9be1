"""``raygd diversity``: measure Δ_D and B_D = nΔ_D of a model and data set, and record them.

For each replication factor r and mechanism it computes the exact diversity at the
initial weights (``raygd.diversity``: ghost norms for vanilla, closed form for SGLD,
exact QSGD variance, Monte Carlo masks for DropConnect); with ``--along-training`` it
also trains (in this process, vanilla SGD with the config's step size and batch) and
measures the exact B_D every ``--every`` updates. It prints a table and records one
MLflow run (tag ``raygd.kind=diversity``) holding the table as ``diversity.csv`` /
``diversity.md`` and the plots ``batch_bound_vs_r.png`` and ``batch_bound_vs_training.png``.

    raygd diversity configs/quickstart.yaml --replication 1,2,4,8 --mechanism vanilla,sgld
    raygd diversity configs/quickstart.yaml --along-training --every 50
    raygd diversity configs/quickstart.yaml --along-training --every 50 --differential

``--differential`` adds Theorem 5's differential bound B̄_D(w_prev, w) (Definition 2) between each
measured iterate and the one before it: a column of the table and ``diversity/differential_batch_bound``.

Runs on the current process's CPU threads; no Ray is needed for a measurement.
"""

from __future__ import annotations

import csv
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from raygd.config import MECHANISMS, ConfigError, MechanismConfig, RunConfig
from raygd.data import Dataset, load_data
from raygd.diversity import differential_diversity
from raygd.mechanisms import build_mechanism, mechanism_class

DIFFERENTIAL_METRIC = "diversity/differential_batch_bound"
"""B̄_D(w_prev, w) between consecutive measured iterates (``--differential``), logged at the later one's update."""


@dataclass
class DiversityRow:
    """One measurement: B_D of ``mechanism`` on r-replicated data at ``passes`` of training."""

    replication: int
    mechanism: str
    passes: float
    updates: int
    n: int
    delta: float
    batch_bound: float
    estimator: str
    differential_bound: float | None = None
    """B̄_D(w_prev, w) (Definition 2) between the previous row's iterate and this one (along training
    with ``differential``), on the same examples; None elsewhere."""


def parse_list(text: str, kind: type, name: str, allowed: tuple[str, ...] | None = None) -> list:
    """``"1,2,4"`` -> [1, 2, 4]; errors name the flag and what is allowed."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name} {text!r} is invalid: a comma-separated list of {kind.__name__}.") from None
    if not values or (allowed and any(v not in allowed for v in values)):
        raise ConfigError(f"{name} {text!r} is invalid: allowed values are {', '.join(allowed or ('>= 1',))}.")
    if kind is int and any(v < 1 for v in values):
        raise ConfigError(f"{name} {text!r} is invalid: every value must be >= 1.")
    return values


def measure(model: torch.nn.Module, data: Dataset, mech: MechanismConfig, generator: torch.Generator) -> float:
    """B_D of ``model`` on all of ``data``'s training examples under mechanism ``mech`` (float64): the
    mechanism's ``surrogate_diversity`` (its ``estimator`` says how)."""
    was_training = model.training
    model.eval()  # exact per-example gradients: DropConnect layers act as plain Linear layers
    result = build_mechanism(mech).surrogate_diversity(
        model, data.x_train, data.y_train, generator=generator, dtype=torch.float64
    )
    model.train(was_training)
    return result.batch_bound


def measure_replications(cfg: RunConfig, replications: list[int], mechanisms: list[str]) -> list[DiversityRow]:
    """B_D at the initial weights for every (r, mechanism)."""
    from raygd.models import build_model

    rows = []
    for r in replications:
        data = load_data(dataclasses.replace(cfg.data, replication=r), cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.train.model, data.input_shape, data.num_classes, cfg.train.model_args)
        for name in mechanisms:
            mech = dataclasses.replace(cfg.mechanism, name=name)
            bound = measure(model, data, mech, torch.Generator().manual_seed(cfg.train.seed))
            rows.append(DiversityRow(r, name, 0.0, 0, data.n, bound / data.n, bound, mechanism_class(name).estimator))
    return rows


def measure_along_training(cfg: RunConfig, every: int, differential: bool = False) -> list[DiversityRow]:
    """Exact vanilla B_D every ``every`` updates of in-process SGD (raygd's loop, one worker, the config's B),
    at the initial weights and after the last update; trains for ``train.max_passes`` whatever the accuracy.
    ``differential``: each row after the first also gets B̄_D(w_prev, w) between its iterate and the
    previous row's (Theorem 5's quantity, ``raygd.diversity.differential_diversity``, float64)."""
    from raygd.loop import build_state, every_steps, run_loop

    single = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, num_workers=1, diversity_estimator="none"),
        mechanism=MechanismConfig(),
    )
    data = load_data(cfg.data, cfg.train.seed)
    state = build_state(single, data)
    rows, g = [], torch.Generator().manual_seed(0)
    previous: dict[str, torch.Tensor] = {}

    def row(step: int) -> None:
        bound = measure(state.model, data, single.mechanism, g)
        passes = step * cfg.train.global_batch_size / data.n
        differential_bound = None
        if differential:
            if previous:
                differential_bound = differential_diversity(
                    state.model, previous, data.x_train, data.y_train, dtype=torch.float64
                ).batch_bound
            previous.update({n: p.detach().clone() for n, p in state.model.named_parameters()})
        rows.append(
            DiversityRow(
                cfg.data.replication,
                "vanilla",
                passes,
                step,
                data.n,
                bound / data.n,
                bound,
                mechanism_class("vanilla").estimator,
                differential_bound,
            )
        )

    row(0)
    run_loop(state, report=lambda metrics: row(int(metrics["step"])), eval_due=every_steps(every), stop_at_target=False)
    return rows


def table(rows: list[DiversityRow]) -> str:
    """The markdown table; a column B̄_D(w_prev, w) when some row has the differential bound."""
    extra = any(r.differential_bound is not None for r in rows)
    lines = [
        "| r | mechanism | passes | updates | n | Δ_D | B_D | estimator |" + (" B̄_D(w_prev, w) |" if extra else ""),
        "|---:|---|---:|---:|---:|---:|---:|---|" + ("---:|" if extra else ""),
    ]
    for r in rows:
        line = (
            f"| {r.replication} | {r.mechanism} | {r.passes:.2f} | {r.updates} | {r.n} | {r.delta:.4g} | "
            f"{r.batch_bound:.4g} | {r.estimator} |"
        )
        if extra:
            line += f" {r.differential_bound:.4g} |" if r.differential_bound is not None else " – |"
        lines.append(line)
    return "\n".join(lines)


def _plots(rows: list[DiversityRow], along: list[DiversityRow], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    if rows:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        for name in dict.fromkeys(r.mechanism for r in rows):
            pts = [(r.replication, r.batch_bound) for r in rows if r.mechanism == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="replication factor r",
            ylabel="B_D = nΔ_D",
            title="batch-size bound vs replication (initial w)",
        )
        ax.legend()
        paths.append(out / "batch_bound_vs_r.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
    if along:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        ax.plot([r.passes for r in along], [r.batch_bound for r in along], marker="o", label="B_D(w)")
        differential = [(r.passes, r.differential_bound) for r in along if r.differential_bound is not None]
        if differential:
            ax.plot(*zip(*differential, strict=True), marker="s", label="B̄_D(w_prev, w)")
            ax.legend()
        ax.set(
            yscale="log", xlabel="passes over the data", ylabel="B_D = nΔ_D", title="batch-size bound along training"
        )
        paths.append(out / "batch_bound_vs_training.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
    return paths


def record(cfg: RunConfig, rows: list[DiversityRow], along: list[DiversityRow]) -> str:
    """Log the measurements to one MLflow run; returns its run id."""
    from raygd.tracking import Tracker, create_run, provenance_tags

    run_id = create_run(
        cfg.tracking.tracking_uri,
        cfg.tracking.experiment_name,
        f"diversity-{cfg.train.model}-{cfg.data.name}",
        cfg.flat(),
        provenance_tags({"raygd.kind": "diversity"}),
    )
    tracker = Tracker(cfg.tracking.tracking_uri, run_id, enabled=True)
    for r in rows:
        tracker.log_metrics(
            {f"diversity/{r.mechanism}/batch_bound": r.batch_bound, f"diversity/{r.mechanism}/delta": r.delta},
            step=r.replication,
        )
    for r in along:
        tracker.log_metrics({"diversity/batch_bound": r.batch_bound, "diversity/delta": r.delta}, step=r.updates)
        if r.differential_bound is not None:
            tracker.log_metrics(
                {
                    DIFFERENTIAL_METRIC: r.differential_bound,
                    "diversity/differential_delta": r.differential_bound / r.n,
                },
                step=r.updates,
            )
    tracker.set_tags({"diversity/estimator": "exact"})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "diversity.md").write_text(table(rows + along) + "\n")
        with open(out / "diversity.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(DiversityRow)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(r) for r in rows + along)
        for path in [out / "diversity.md", out / "diversity.csv", *_plots(rows, along, out)]:
            tracker.log_artifact(path)
    tracker.finish()
    return run_id


def check_mechanisms(names: list[str]) -> list[str]:
    return parse_list(",".join(names), str, "--mechanism", MECHANISMS)
