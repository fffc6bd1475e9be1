"""Gradient diversity Δ_D and the batch-size bound B_D = nΔ_D: exact, under mechanisms, online.

Definitions (Yin et al., "Gradient Diversity", Definitions 1 and 2), with g_i = ∇f_i(w) the
gradient of example i's loss f_i (``raygd.loss``: cross entropy; for a sequence model the mean
cross entropy over its positions, so n and B_D count sequences):

    Δ_D(w) = Σ_i ‖g_i‖² / ‖Σ_i g_i‖²,   B_D(w) = n Δ_D(w) = E‖g‖² / ‖E g‖² = 1 + tr(Σ)/‖μ‖²,

where E, μ and Σ are over the uniform distribution on the n examples; tr(Σ)/‖μ‖² is
McCandlish et al.'s simple noise scale.

What is here, one module per concept (every public name is re-exported: ``dv.X`` works):

- ``rules``: per-layer norm rules, pure functions of a layer's input and output gradient (Linear on
  (N, d) and (N, T, d), Conv2d, Embedding, LayerNorm, RMSNorm), the registry ``NORM_RULES`` and
  ``register_norm_rule`` for a user's own layer.
- ``ghost``: ``GhostNorms``, per-example ‖g_i‖² of every layer with a rule fused into one ordinary
  backward pass ("ghost" norms: custom autograd functions for Linear/Conv2d, gradient hooks for the
  others); the same backward produces the summed gradient. ``norm_routes(model)``: which layer takes
  which route ("ghost:<rule>" or "fallback"); ``GhostNorms.fallback_layers`` adds those that fell back
  at run time.
- ``checks``: ``check_per_example`` (BatchNorm in train mode, DropConnect in train mode) and
  ``linear_softmax`` (a logistic regression, whose norms have a closed form).
- ``per_example``: ``per_example_sq_norms`` adds torch.func per-example gradients for the
  remaining parameters (e.g. GroupNorm, tied weights); ``linear_softmax_sq_norms``, the closed form
  ‖g_i‖² = ‖p_i − e_{y_i}‖²(‖x_i‖² + 1) for logistic regression, taken by the exact path and by
  ``GhostNorms``.
- ``exact``: ``gradient_diversity`` over a data set in batches (``gradient_sums`` keeps the summed
  gradient, to add up across ranks); ``sgld_diversity``, ``quantized_diversity``,
  ``dropconnect_diversity``: B_D^DIM with the per-example surrogates of ``raygd.mechanisms`` (ratio
  of expectations, see each docstring; DropConnect also at a group granularity, Monte Carlo with a
  standard error, ``ratio_of_means``); ``differential_diversity``: Definition 2 between two
  parameter vectors.
- ``online``: estimators for the training loop, ``in_step_moments`` (per-example norms of the
  batch), ``two_batch_moments`` (local vs all-reduced gradient norms, no extra backward),
  ``MomentsEMA`` (smoothing over steps) and ``reduce_gradients`` (DDP's all-reduce, by hand).

Per-example gradients are undefined when a layer mixes examples (BatchNorm in train mode)
and random under a DropConnectLinear in train mode; both raise ``ValueError``: measure
with ``model.eval()``. Run the benchmark with ``python -m bench.diversity_overhead``.

Training-loop use (P workers, global batch B, b = B/P per worker, mean loss; n_wor = n for
``shuffle`` sampling, None for ``with_replacement``):

    ghost, ema = GhostNorms(model), MomentsEMA(0.9)        # once; model = the module DDP wraps
    with ghost:                                            # in-step: this step's per-example norms
        mean_loss(ddp(x), y).backward()                    # raygd.loss.mean_loss
    big = grad_sq_norm(model)                              # ‖G_B‖², before mechanism.after_backward
    sum_sq = mean_over_workers(float(ghost.sq_norms().sum()) * b**2, P) * P
    batch_bound = ema.update(in_step_moments(sum_sq, big * B**2, B, n_wor)).batch_bound

    with ddp.no_sync():                                    # free (P > 1): skip DDP's all-reduce ...
        mean_loss(ddp(x), y).backward()
    small, big = reduce_gradients(model, P)                # ... do it here, reading ‖G_b‖² and ‖G_B‖²
    free = two_batch_moments(small, b, big, B, n_wor)

``ghost.sq_norms()`` covers the ghost layers only: the in-step estimate leaves out the parameters
of ``ghost.fallback_layers`` (log them; the free estimator has no such gap).
A step that is not measured runs as usual (DDP's overlapped C++ all-reduce, no context):
``raygd.loop`` measures one update in ``train.diversity_every_steps``.
"""

from raygd.diversity.checks import LinearSoftmax, check_per_example, linear_softmax, mode_sensitive_layers
from raygd.diversity.exact import (
    Diversity,
    differential_diversity,
    dropconnect_diversity,
    dropconnect_draw,
    gradient_diversity,
    gradient_sums,
    qsgd_variance,
    quantized_diversity,
    ratio_of_means,
    sgld_diversity,
)
from raygd.diversity.ghost import GHOST_LINEAR, GhostNorms, GhostUnsupported, ghost_supported
from raygd.diversity.online import (
    Moments,
    MomentsEMA,
    OnlineDiversity,
    grad_sq_norm,
    in_step_moments,
    mean_over_workers,
    reduce_gradients,
    two_batch_moments,
)
from raygd.diversity.per_example import (
    Params,
    functional_state,
    linear_softmax_sq_norms,
    per_example_grads,
    per_example_sq_norms,
)
from raygd.diversity.routes import norm_routes
from raygd.diversity.rules import NORM_RULES, NormRule, ghost_route, register_norm_rule

__all__ = [
    "GHOST_LINEAR",
    "NORM_RULES",
    "Diversity",
    "GhostNorms",
    "GhostUnsupported",
    "LinearSoftmax",
    "Moments",
    "MomentsEMA",
    "NormRule",
    "OnlineDiversity",
    "Params",
    "check_per_example",
    "differential_diversity",
    "dropconnect_diversity",
    "dropconnect_draw",
    "functional_state",
    "ghost_route",
    "ghost_supported",
    "grad_sq_norm",
    "gradient_diversity",
    "gradient_sums",
    "in_step_moments",
    "linear_softmax",
    "linear_softmax_sq_norms",
    "mean_over_workers",
    "mode_sensitive_layers",
    "norm_routes",
    "per_example_grads",
    "per_example_sq_norms",
    "qsgd_variance",
    "quantized_diversity",
    "ratio_of_means",
    "reduce_gradients",
    "register_norm_rule",
    "sgld_diversity",
    "two_batch_moments",
]
