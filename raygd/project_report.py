"""``raygd project``'s outputs: the markdown table, the CSVs, the two figures, and their log to the parent run.

Every output says "projected" (``raygd.project`` computes the rows; this module only shows them).
"""

from __future__ import annotations

import csv
from pathlib import Path

from raygd.project import PROJECTED, Projection
from raygd.records import mlflow_client


def _speedup_cell(row: dict) -> str:
    """``0.66 (0.58–0.75)``, ``n.s.`` appended when the interval covers 1.0; the point alone with one seed."""
    ratio, low, high = row["projected_speedup_vs_vanilla"], row["projected_speedup_low"], row["projected_speedup_high"]
    if ratio == "":
        return ""
    if low == "" or high == "":
        return f"{ratio:.2f}"
    return f"{ratio:.2f} ({low:.2f}–{high:.2f})" + (" n.s." if low <= 1.0 <= high else "")


def table(proj: Projection) -> str:
    """The markdown table of the best (γ, B) per mechanism and P, headed by what was projected onto what."""

    targets = sorted({r["target"] for r in proj.trials}) or ["the target"]
    lines = [
        f"PROJECTED onto {proj.target.describe()}",
        f"(time to {' / '.join(targets)}: measured updates to target × modelled time per update; trials that did "
        "not reach the target are not extrapolated; TTA: mean over the pair's seeds; speedup: ratio of means "
        "with its 95% bootstrap interval over seeds; B: the largest B that still gets faster, the B of least "
        "projected TTA, with its 95% interval over seeds)",
        "",
        "| P | mechanism | γ | B | seeds | projected TTA (s) | projected speedup vs vanilla | ρ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in proj.best:
        batch = str(row["global_batch_size"])
        if row["fastest_batch_low"] != "":
            batch += f" ({row['fastest_batch_low']}–{row['fastest_batch_high']})"
        lines.append(
            f"| {row['workers']} | {row['mechanism']} | {row['step_size']:g} | {batch} | "
            f"{row['seeds']} | {row['projected_time_to_accuracy_s']:.3g} | {_speedup_cell(row)} | "
            f"{row['projected_rho']:.2g} |"
        )
    if any(_speedup_cell(r).endswith("n.s.") for r in proj.best):
        lines.append("\nn.s.: the speedup's 95% bootstrap interval over seeds covers 1.0× (not significant).")
    unreached = {r["trial_id"] for r in proj.trials if r["status"].startswith("not reached")}
    if unreached:
        lines.append(f"\n{len(unreached)} trial(s) did not reach the target: no projected time (not extrapolated).")
    if not proj.best:
        lines.append("\nno (γ, B) reached the target with every seed: nothing to rank.")
    return "\n".join(lines)


def _csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _figures(proj: Projection, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if proj.figure1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in proj.workers:
            rows = [r for r in proj.figure1 if r["workers"] == p]
            ax.plot(
                [r["global_batch_size"] for r in rows],
                [r["projected_pass_speedup"] for r in rows],
                "o-",
                label=f"P={p}",
            )
        ax.set(xscale="log", yscale="log", xlabel="B", ylabel="projected speedup per pass")
        ax.set_title(f"PROJECTED: {proj.target.name}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "projected_figure1.png")
        fig.savefig(written[-1])
        plt.close(fig)
    if proj.rho_map:  # one panel per P, a colour per mechanism, its 95% interval over seeds as a band
        ps = sorted({r["workers"] for r in proj.rho_map})
        mechs = sorted({r["mechanism"] for r in proj.rho_map})
        colours = {m: f"C{i % 10}" for i, m in enumerate(mechs)}
        fig, axes = plt.subplots(1, len(ps), figsize=(3.2 * len(ps) + 1, 3.6), sharey=True, squeeze=False)
        for ax, p in zip(axes[0], ps, strict=True):
            for mech in mechs:
                rows = [r for r in proj.rho_map if r["mechanism"] == mech and r["workers"] == p]
                if not rows:
                    continue
                rhos = [r["rho"] for r in rows]
                ax.plot(rhos, [r["projected_speedup_vs_vanilla"] for r in rows], color=colours[mech], label=mech)
                band = [r for r in rows if r["projected_speedup_low"] != ""]
                if band:
                    ax.fill_between(
                        [r["rho"] for r in band],
                        [r["projected_speedup_low"] for r in band],
                        [r["projected_speedup_high"] for r in band],
                        color=colours[mech],
                        alpha=0.15,
                        lw=0,
                    )
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(xscale="log", xlabel="ρ = t_comm / t_compute", title=f"P = {p}")
        axes[0][0].set_ylabel("projected speedup vs vanilla")
        axes[0][-1].legend(fontsize=6)
        fig.suptitle("PROJECTED speedup against ρ of vanilla's best (γ, B) (band: 95% interval over seeds)", fontsize=9)
        fig.tight_layout()
        written.append(folder / "projected_rho_map.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


def write_outputs(proj: Projection, folder: Path) -> list[Path]:
    """projected.md, the four CSVs and the two PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "projected.md").write_text(table(proj) + f"\n\nSources: {proj.target.sources}\n")
    for name, rows in (
        ("projected_trials.csv", proj.trials),
        ("projected_best.csv", proj.best),
        ("projected_figure1.csv", proj.figure1),
        ("projected_rho_map.csv", proj.rho_map),
        ("projected_compute_fits.csv", proj.fits),
    ):
        _csv(folder / name, rows)
    _figures(proj, folder)
    return sorted(folder.iterdir())


def log_to_run(tracking_uri: str, run_id: str, folder: Path) -> None:
    """Log the outputs under ``projected/`` in ``run_id`` (the sweep's parent run), whether it is running or not."""
    client = mlflow_client(tracking_uri)
    client.log_artifacts(run_id, str(folder), PROJECTED)
