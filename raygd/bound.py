"""The batch-size bound B_D = nΔ_D of a trial at its initial weights, for the mechanism as trained.

Every trial (``raygd.train.train_loop_per_worker`` and ``raygd.pool``'s trial loop) measures, after
building its state and before the training clock starts, on a fresh start only:

    B_D(w0) = n Σ_i E‖g_i‖² / E‖Σ_i g_i‖²   over the first ``train.bound_sample`` examples of the
                                            evaluation sample (``bound_indices``), n of them,

with g_i the gradient of example i's cross entropy, or its surrogate under the trial's mechanism:

- vanilla: g_i = ∇f_i(w0), exact (ghost norms; closed form for logistic regression); tag ``gradient``.
- SGLD(σ): g_i + ξ_i, ξ_i ~ N(0, σ²I_d), exact closed form n(Σ‖g_i‖² + ndσ²)/(‖Σg_i‖² + ndσ²)
  (``Mechanism.surrogate_moments``); tag ``surrogate``.
- DropConnect(p) at its mask granularity: consecutive groups of examples share one mask (1 per
  example, ``dropconnect_group_size`` per group, B/P per worker batch), as in training; Monte Carlo
  over ``train.bound_draws`` draws, B = n ā/b̄ with a_k = Σ_i‖g_ik‖², b_k = ‖Σ_i g_ik‖² and the
  delta-method standard error (n/b̄)·sqrt(Var(a_k − (ā/b̄) b_k)/K); tag ``surrogate``.
- quantize: training quantizes each worker's mean gradient, which has no per-example surrogate: the
  plain gradient's exact B_D, tag ``plain_gradient``.

Each rank sums over its slice of that sample (``state.x_eval`` holds the evaluation sample's entries
rank, rank + P, ...), and one all-reduce of [Σ_i‖g_ik‖², Σ_i g_ik (flattened), count] per draw
combines them, so the value equals ``raygd.diversity.gradient_diversity`` on the whole sample (and
is the same at any P). Rank zero logs ``BOUND_W0_METRIC``, ``BOUND_W0_SE_METRIC`` (0 when exact),
``diversity/batch_bound`` and ``diversity/delta`` at step 0, ``time/bound_s`` and ``BOUND_OF_TAG``.

Written here because it is the paper's quantity on raygd's own sharding; the per-example
machinery is ``raygd.diversity``'s.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from raygd.data import eval_indices
from raygd.diversity import dropconnect_draw, gradient_sums, ratio_of_means
from raygd.diversity.online import Moments
from raygd.mechanisms import DropConnect, make_generator
from raygd.records import BOUND_OF_TAG, BOUND_W0_METRIC, BOUND_W0_SE_METRIC
from raygd.state import TrainState
from raygd.tracking import Tracker

ONLINE_ESTIMATOR_TAG = "raygd.online_estimator"
"""The online estimator ``train.diversity_estimator`` resolved to (auto: free, in_step or none)."""


def bound_indices(n: int, eval_size: int, seed: int, bound_sample: int) -> torch.Tensor:
    """Training-set indices of the examples B_D(w0) is measured on: the first ``bound_sample`` of the
    evaluation sample (``raygd.data.eval_indices``), in its order."""
    return eval_indices(n, eval_size, seed)[:bound_sample]


def _rank_slice(state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's examples of the bound sample: entries rank, rank + P, ... below its size."""
    total = min(state.cfg.data.eval_size, state.data.n)
    size = min(state.cfg.train.bound_sample, total)
    mine = len(range(state.rank, size, state.world_size))
    return state.x_eval[:mine], state.y_eval[:mine]


def _draws(state: TrainState, x: torch.Tensor, y: torch.Tensor, draws: int) -> list[torch.Tensor]:
    """Per draw: [Σ_i‖g_ik‖², Σ_i g_ik...] over this rank's examples (float64; zeros without examples)."""
    mech, tc = state.mechanism, state.cfg.train
    num_params = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
    if x.shape[0] == 0:
        return [torch.zeros(1 + num_params, dtype=torch.float64, device=state.device)] * draws
    if isinstance(mech, DropConnect):
        generator = make_generator(state.device, tc.seed, "bound", state.rank)
        group = mech.examples_per_mask or tc.batch_size_per_worker
        rows = [dropconnect_draw(state.model, x, y, mech.p, group, generator) for _ in range(draws)]
    else:
        rows = [gradient_sums(state.model, x, y)]
    return [torch.cat([torch.tensor([sq], dtype=torch.float64, device=g.device), g]) for sq, g in rows]


def initial_bound(state: TrainState, draws: int | None = None) -> dict[str, float]:
    """B_D of ``state``'s model (its current, untrained weights) on the bound sample, every rank together.

    Args:
        state: this rank's built ``TrainState`` (world size > 1 needs the process group).
        draws: Monte Carlo mask draws under DropConnect (default ``train.bound_draws``).

    Returns:
        ``BOUND_W0_METRIC``, ``BOUND_W0_SE_METRIC``, ``diversity/batch_bound`` and ``diversity/delta``
        (= B_D / data.n, as the online estimate logs it); empty when ``train.bound_sample`` is 0.
    """
    if state.cfg.train.bound_sample == 0:
        return {}
    dropconnect = isinstance(state.mechanism, DropConnect)
    draws = (draws or state.cfg.train.bound_draws) if dropconnect else 1
    x, y = _rank_slice(state)
    was_training = state.model.training
    state.model.eval()  # per-example gradients at w0: DropConnect layers act as plain Linear, masks are ours
    try:
        rows = _draws(state, x, y, draws)
    finally:
        state.model.train(was_training)
    flat = torch.cat([torch.stack(rows).reshape(-1), torch.tensor([float(x.shape[0])], device=rows[0].device)])
    if state.world_size > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    count = int(flat[-1])
    table = flat[:-1].view(draws, -1)
    sum_sq = table[:, 0].tolist()
    grad_sq = [float(row[1:] @ row[1:]) for row in table]
    est = ratio_of_means(count, sum_sq, grad_sq)
    num_params = table.shape[1] - 1
    m2, mu2 = state.mechanism.surrogate_moments(
        est.sum_sq_norms / count, est.sum_grad_sq_norm / count**2, n=count, num_params=num_params
    )
    bound = Moments(m2, mu2).batch_bound
    return {
        BOUND_W0_METRIC: bound,
        BOUND_W0_SE_METRIC: est.batch_bound_se,
        "diversity/batch_bound": bound,
        "diversity/delta": bound / state.data.n,
    }


def log_initial_bound(state: TrainState, tracker: Tracker) -> dict[str, float]:
    """``initial_bound`` on every rank; rank zero's ``tracker`` logs it at step 0 with ``time/bound_s``
    (this rank's seconds, outside the training clock) and the ``BOUND_OF_TAG`` and estimator tags."""
    t0 = time.perf_counter()
    values = initial_bound(state)
    if not values:
        return values
    values["time/bound_s"] = time.perf_counter() - t0
    tracker.log_metrics(values, step=0)
    tracker.set_tags({BOUND_OF_TAG: state.mechanism.bound_of, ONLINE_ESTIMATOR_TAG: state.cfg.online_estimator})
    return values
