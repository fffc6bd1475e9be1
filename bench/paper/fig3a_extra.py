"""Figure 3a, what lies behind the ratio: each B's own loss per r, the control's identity, the curvature.

    python -m bench.paper.fig3a_extra                  # the latest paper-fig3a parent run in the default store
    python -m bench.paper.fig3a_extra --parent RUN_ID --tracking-uri sqlite:///...   --curvature-seeds 0 1 2

Read-only on MLflow (the run of ``python -m bench.paper.run fig3a``). Prints:

- per (mechanism, r, arm, B) at that B's tuned step size γ* (``results.tuned_step``): the training loss
  averaged over the evaluation points and at the end, mean ± std over seeds;
- replicated vs control runs of the same (mechanism, r, B, γ, seed): how many have the same loss curve,
  bit for bit, and the largest difference;
- λ_max of the full-data Hessian of the logistic loss at the initial weights, per seed and r (float64):
  H = (1/n) Σ σ'(z_i) x̃_i x̃_iᵀ, x̃ = [x; 1]; gradient descent with step γ (raygd's mean convention) is
  stable along the top direction only for γ < 2 / λ_max.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from bench.paper import results
from bench.paper.run import DEFAULT_URI, PRESETS, _curves
from raygd.records import latest_sweep


def _ms(xs: list[float]) -> str:
    mean, std = statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))
    return f"{mean:.4f} ± {std:.4f}"


def losses_by_batch(runs: list[dict]) -> list[str]:
    by: dict[tuple, dict[float, dict[int, results.Curve]]] = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        key = (
            r["mechanism"] != results.BASELINE,
            r["mechanism"],
            r["replication"],
            r["control"],
            r["global_batch_size"],
        )
        by[key][r["step_size"]][r["seed"]] = r["curve"]
    lines = [
        "| mechanism | r | arm | B | γ* | seeds | avg loss | final loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key in sorted(by):
        _, mech, rep, ctrl, b = key
        step = results.tuned_step({s: list(c.values()) for s, c in by[key].items()})
        if step is None:
            continue
        cs = list(by[key][step].values())
        arm = "control" if ctrl else ("replicated" if rep > 1 else "full data")
        lines.append(
            f"| {mech} | {rep} | {arm} | {b} | {step:g} | {len(cs)} | {_ms([c.mean_loss() for c in cs])} "
            f"| {_ms([c.loss[-1] for c in cs])} |"
        )
    return lines


def control_identity(runs: list[dict]) -> str:
    key = ("replication", "mechanism", "global_batch_size", "step_size", "seed")
    replicated = {tuple(r[k] for k in key): r["curve"] for r in runs if not r["control"]}
    same, diffs = 0, []
    for r in runs:
        other = replicated.get(tuple(r[k] for k in key)) if r["control"] else None
        if other is None:
            continue
        curve = r["curve"]
        if other.passes == curve.passes and other.loss == curve.loss:
            same += 1
        n = min(len(other.loss), len(curve.loss))
        diffs.append(max(abs(a - b) for a, b in zip(other.loss[:n], curve.loss[:n], strict=True)))
    return (
        f"control runs with a replicated twin: {len(diffs)}; identical loss curves: {same}; "
        f"max |ΔL| {max(diffs, default=0):g}"
    )


def curvature(uri: str, seeds: list[int], replications: list[int]) -> list[str]:
    import torch

    from raygd.data import load_data
    from raygd.models import build_model
    from tuning.spec import load_sweep_spec

    torch.set_num_threads(1)
    spec = load_sweep_spec(PRESETS["fig3a"], [f"tracking.tracking_uri={uri}"])
    lines = []
    for seed in seeds:
        for r in replications:
            params = {**spec.trial_params()[0], "replication": r, "seed": seed}
            cfg = spec.run_config(params)
            data = load_data(cfg.data, seed)
            torch.manual_seed(seed)  # build_state's seeding: the runs' initial weights
            model = build_model(cfg.train.model, data.input_shape, data.num_classes)
            x = torch.cat([data.x_train.flatten(1), torch.ones(data.n, 1)], 1).double()
            lin = model.linear  # BinaryLogisticRegression: logits [0, w·x + b]
            w = torch.cat([lin.weight.detach().flatten(), lin.bias.detach()]).double()
            p = torch.sigmoid(x @ w)
            eig = torch.linalg.eigvalsh((x * (p * (1 - p))[:, None]).T @ x / data.n)
            lines.append(f"seed {seed} r {r}: λ_max = {eig[-1]:.1f}, 2/λ_max = {2 / eig[-1]:.4f}, λ_2 = {eig[-2]:.1f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=DEFAULT_URI)
    parser.add_argument("--parent", help="paper-fig3a parent run id (default: the latest)")
    parser.add_argument("--curvature-seeds", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args(argv)
    parent = args.parent or latest_sweep(args.tracking_uri, "paper-fig3a")
    runs = _curves(args.tracking_uri, parent)
    print(f"parent {parent}: {len(runs)} runs\n")
    print("\n".join(losses_by_batch(runs)) + "\n")
    print(control_identity(runs) + "\n")
    reps = sorted({r["replication"] for r in runs})
    print("\n".join(curvature(args.tracking_uri, args.curvature_seeds, [reps[0], reps[-1]] if reps else [1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
