"""Gradient diversity Δ_D and the batch-size bound B_D = nΔ_D: exact, under mechanisms, online.

Definitions (Yin et al., "Gradient Diversity", Definitions 1 and 2), with g_i = ∇f_i(w) the
gradient of example i's cross-entropy loss:

    Δ_D(w) = Σ_i ‖g_i‖² / ‖Σ_i g_i‖²,   B_D(w) = n Δ_D(w) = E‖g‖² / ‖E g‖² = 1 + tr(Σ)/‖μ‖²,

where E, μ and Σ are over the uniform distribution on the n examples; tr(Σ)/‖μ‖² is
McCandlish et al.'s simple noise scale.

What is here:

- ``GhostNorms``: per-example ‖g_i‖² of every nn.Linear / nn.Conv2d parameter fused into one
  ordinary backward pass ("ghost" norms, custom autograd functions); the same backward
  produces the summed gradient. ``per_example_sq_norms`` adds torch.func per-example
  gradients for the remaining parameters (e.g. GroupNorm) and ``gradient_diversity`` runs
  it over a data set in batches.
- ``linear_softmax_sq_norms``: the closed form ‖g_i‖² = ‖p_i − e_{y_i}‖²(‖x_i‖² + 1) for logistic
  regression (``linear_softmax`` recognises it), taken by the exact path and by ``GhostNorms``.
- ``sgld_diversity``, ``quantized_diversity``, ``dropconnect_diversity``: B_D^DIM with the
  per-example surrogates of ``raygd.mechanisms`` (ratio of expectations, see each docstring).
- ``differential_diversity``: Definition 2 between two parameter vectors.
- Online estimators for the training loop: ``in_step_moments`` (per-example norms of the
  batch), ``two_batch_moments`` (local vs all-reduced gradient norms, no extra backward),
  ``MomentsEMA`` (smoothing over steps) and ``reduce_gradients`` (DDP's all-reduce, by hand).

Per-example gradients are undefined when a layer mixes examples (BatchNorm in train mode)
and random under a DropConnectLinear in train mode; both raise ``ValueError``: measure
with ``model.eval()``. Run the benchmark with ``python bench/diversity_overhead.py``.

Training-loop use (P workers, global batch B, b = B/P per worker, mean loss; n_wor = n for
``shuffle`` sampling, None for ``with_replacement``):

    ghost, ema = GhostNorms(model), MomentsEMA(0.9)        # once; model = the module DDP wraps
    with ghost:                                            # in-step: this step's per-example norms
        F.cross_entropy(ddp(x), y).backward()
    big = grad_sq_norm(model)                              # ‖G_B‖², before mechanism.after_backward
    sum_sq = mean_over_workers(float(ghost.sq_norms().sum()) * b**2, P) * P
    batch_bound = ema.update(in_step_moments(sum_sq, big * B**2, B, n_wor)).batch_bound

    with ddp.no_sync():                                    # free (P > 1): skip DDP's all-reduce ...
        F.cross_entropy(ddp(x), y).backward()
    small, big = reduce_gradients(model, P)                # ... do it here, reading ‖G_b‖² and ‖G_B‖²
    free = two_batch_moments(small, b, big, B, n_wor)

A step that is not measured runs as usual (DDP's overlapped C++ all-reduce, no context):
``raygd.train`` measures one update in ``train.diversity_every_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from raygd.config import MechanismConfig
from raygd.mechanisms import DropConnectLinear, dropconnect_masks
from raygd.models import BinaryLogisticRegression, LogisticRegression

CHUNK_BYTES = 4 * 2**20
"""Largest block of per-example gradients (or Gram matrices) a ghost layer holds at once."""
FUNC_CHUNK_BYTES = 64 * 2**20
"""Largest block of torch.func per-example gradients (N·d floats) alive at once."""
MAX_CHUNK = 16
"""Most examples per block: measured fastest for the MNIST CNN's convolutions (2 threads)."""

Params = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Diversity:
    """Δ = sum_sq_norms / sum_grad_sq_norm over n examples, and B = nΔ.

    For a mechanism both sums are expectations over its randomness:
    sum_sq_norms = Σ_i E‖g_i^DIM‖², sum_grad_sq_norm = E‖Σ_i g_i^DIM‖².
    """

    n: int
    sum_sq_norms: float
    sum_grad_sq_norm: float

    @property
    def delta(self) -> float:
        """Δ_D = Σ‖g_i‖² / ‖Σ g_i‖² (inf when the summed gradient is zero)."""
        return self.sum_sq_norms / self.sum_grad_sq_norm if self.sum_grad_sq_norm > 0 else math.inf

    @property
    def batch_bound(self) -> float:
        """B_D = n Δ_D."""
        return self.n * self.delta

    def metrics(self, prefix: str = "diversity") -> dict[str, float]:
        """``{prefix}/delta`` and ``{prefix}/batch_bound``."""
        return {f"{prefix}/delta": self.delta, f"{prefix}/batch_bound": self.batch_bound}


class Moments(NamedTuple):
    """Estimates of E‖g‖² and ‖μ‖² = ‖E g‖² (uniform over the n examples)."""

    expected_sq_norm: float
    sq_norm_of_mean: float

    @property
    def batch_bound(self) -> float:
        """B_D = E‖g‖² / ‖μ‖²; inf when the ‖μ‖² estimate is <= 0 (noise dominates), nan if unknown."""
        if math.isnan(self.sq_norm_of_mean) or self.sq_norm_of_mean > 0:
            return self.expected_sq_norm / self.sq_norm_of_mean
        return math.inf

    @property
    def noise_scale(self) -> float:
        """tr(Σ)/‖μ‖² = B_D − 1 (McCandlish et al.'s simple noise scale)."""
        return self.batch_bound - 1.0


# --------------------------------------------------------------------------- checks


def mode_sensitive_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the BatchNorm and DropConnectLinear layers, whose mode ``check_per_example`` checks."""
    kinds = (nn.modules.batchnorm._BatchNorm, DropConnectLinear)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def check_per_example(model: nn.Module, layers: Iterable[tuple[str, nn.Module]] | None = None) -> None:
    """Raise ValueError if a layer makes per-example gradients undefined or random.

    BatchNorm in train mode mixes the examples of a batch through its statistics; a
    DropConnectLinear in train mode draws masks (its diversity is ``dropconnect_diversity``).
    ``layers``: check only these (name, layer) pairs, e.g. ``mode_sensitive_layers(model)`` kept
    from an earlier call (default: every layer of ``model``).
    """
    for name, m in model.named_modules() if layers is None else layers:
        kind = type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"layer {name or '<model>'!r} ({kind}) is in train mode: its batch statistics mix the "
                "examples, so per-example gradients are undefined. Call model.eval() (running statistics) "
                "or use GroupNorm, which normalises within one example (see raygd.models).")
        if isinstance(m, DropConnectLinear) and m.training and m.p > 0:
            raise ValueError(
                f"layer {name or '<model>'!r} (DropConnectLinear, p={m.p}) is in train mode and draws random "
                "masks. Call model.eval() to measure the diversity at w, or use dropconnect_diversity() "
                "for the DropConnect surrogate.")


def _ghost_geometry(m: nn.Module) -> tuple | None:
    """(stride, padding, dilation) for a Conv2d the ghost path handles, else None."""
    if type(m) is not nn.Conv2d or m.groups != 1 or isinstance(m.padding, str):
        return None
    padding = list(m.padding) if m.padding_mode == "zeros" else [0, 0]
    return list(m.stride), padding, list(m.dilation)


GHOST_LINEAR = (nn.Linear, DropConnectLinear, nn.modules.linear.NonDynamicallyQuantizableLinear)
"""Linear classes whose forward (in eval mode) is F.linear; subclasses may change it, so exact types."""


def ghost_supported(m: nn.Module) -> bool:
    """An nn.Linear (or DropConnectLinear) or a groups=1 nn.Conv2d with numeric padding."""
    return type(m) in GHOST_LINEAR or _ghost_geometry(m) is not None


class LinearSoftmax(NamedTuple):
    """The one nn.Linear of a linear softmax model: its name in the model, the layer, and whether the
    logits are [0, z] with z its single output (``BinaryLogisticRegression``)."""

    name: str
    layer: nn.Linear
    binary: bool


def linear_softmax(model: nn.Module) -> LinearSoftmax | None:
    """The layer of a model whose logits are one nn.Linear of the flattened input, else None.

    Recognised by exact type (a subclass may change forward): raygd's ``LogisticRegression`` and
    ``BinaryLogisticRegression``, a bare nn.Linear (2-D input) and nn.Sequential(nn.Flatten(), nn.Linear),
    each with no other parameters. Their per-example norms have a closed form (``linear_softmax_sq_norms``).
    """
    kind = type(model)
    if kind is nn.Linear:
        found = LinearSoftmax("", model, False)
    elif kind in (LogisticRegression, BinaryLogisticRegression):
        found = LinearSoftmax("linear", model.linear, kind is BinaryLogisticRegression)
    elif (kind is nn.Sequential and len(model) == 2 and type(model[0]) is nn.Flatten
          and (model[0].start_dim, model[0].end_dim) == (1, -1)):
        found = LinearSoftmax("1", model[1], False)
    else:
        return None
    if type(found.layer) is not nn.Linear or (found.binary and found.layer.out_features != 1):
        return None
    if len(list(model.parameters())) != len(list(found.layer.parameters())):
        return None
    return found


# --------------------------------------------------------------------------- ghost norms


class _Accumulator:
    """Per-example squared norms of the ghost layers of one backward pass, summed on demand."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def add(self, sq: torch.Tensor, layer: str) -> None:
        if self.parts and self.parts[0].shape[0] != sq.shape[0]:
            raise ValueError(f"layer {layer!r} sees {sq.shape[0]} examples on dim 0, other layers "
                             f"{self.parts[0].shape[0]}: ghost norms need the examples on dim 0 of every layer.")
        self.parts.append(sq)

    def total(self) -> torch.Tensor | None:
        if len(self.parts) <= 1:
            return self.parts[0].to(torch.float64) if self.parts else None
        return torch.stack(self.parts).sum(0, dtype=torch.float64)


def ghost_route(positions: int, fan_in: int, fan_out: int) -> str:
    """"per_example" or "gram", whichever computes ‖Σ_t δ_t a_tᵀ‖² per example in fewer FLOPs.

    positions T (sequence length, or output pixels of a convolution), a_t of size fan_in,
    δ_t of size fan_out: per-example matrices cost T·fan_in·fan_out, Gram matrices
    T²(fan_in + fan_out).
    """
    return "per_example" if fan_in * fan_out <= positions * (fan_in + fan_out) else "gram"


def _row_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_i‖² per row i over all other dims (vector_norm needs no temporary the size of t)."""
    return torch.linalg.vector_norm(t if t.dim() == 2 else t.reshape(t.shape[0], -1), dim=1).square()


def _chunk(n: int, bytes_per_example: int) -> int:
    return max(1, min(n, MAX_CHUNK, CHUNK_BYTES // max(bytes_per_example, 1)))


def _gram_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """‖Σ_t d_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(d_t·d_t') per example; a (N, T, p), d (N, T, q)."""
    out = a.new_empty(a.shape[0])
    c = _chunk(a.shape[0], 2 * a.shape[1] ** 2 * a.element_size())
    for s in range(0, a.shape[0], c):
        ga, gd = a[s:s + c] @ a[s:s + c].transpose(1, 2), d[s:s + c] @ d[s:s + c].transpose(1, 2)
        out[s:s + c] = (ga * gd).sum((1, 2))
    return out


def _linear_sq_norms(x: torch.Tensor, gy: torch.Tensor, need_w: bool, need_b: bool) -> torch.Tensor:
    """‖g_i‖² of y = x Wᵀ + b for x (N, d), gy = ∂L/∂y (N, k): ‖x_i‖²‖gy_i‖² for W, ‖gy_i‖² for b."""
    d2 = _row_sq_norms(gy)
    if need_w:
        return torch.addcmul(d2, _row_sq_norms(x), d2) if need_b else _row_sq_norms(x) * d2
    return d2 if need_b else torch.zeros_like(d2)


class _GhostLinear(torch.autograd.Function):
    """y = x Wᵀ + b; backward also adds ‖g_i‖² of W and b per example to ``acc``.

    x (N, d) : ‖g_i^W‖² = ‖x_i‖²‖δ_i‖²; x (N, T, d): per-example δ_iᵀx_i (bmm) or the Gram
    form Σ_{t,t'}(x_t·x_t')(δ_t·δ_t'), whichever needs fewer FLOPs. Bias: ‖Σ_t δ_it‖².
    """

    @staticmethod
    def forward(ctx, x, weight, bias, acc, name):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.acc, ctx.name = acc, name
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.dim() == 2:  # the common case, with as few kernel launches as possible
            ctx.acc.add(_linear_sq_norms(x, gy, need_w, need_b), ctx.name)
            return (gy @ weight if need_x else None, gy.T @ x if need_w else None,
                    gy.sum(0) if need_b else None, None, None)
        n = x.shape[0]
        a, d = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
        sq = gy.new_zeros(n)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = gy @ weight
        if need_w:
            grad_w = d.reshape(-1, d.shape[2]).T @ a.reshape(-1, a.shape[2])
            t, p, q = a.shape[1], a.shape[2], d.shape[2]
            if ghost_route(t, p, q) == "per_example":
                c = _chunk(n, p * q * a.element_size())
                for s in range(0, n, c):
                    sq[s:s + c] += _row_sq_norms(d[s:s + c].transpose(1, 2) @ a[s:s + c])
            else:
                sq += _gram_sq_norms(a, d)
        if need_b:
            per_example = d.sum(1)
            sq += _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, grad_b, None, None


def _conv_per_example(x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor, geometry: tuple,
                      sq: torch.Tensor) -> torch.Tensor:
    """Σ_i g_i^W, adding ‖g_i^W‖² to ``sq``: per-example weight gradients in chunks of c examples,
    computed as the weight gradient of a grouped convolution (groups = c), which is faster on CPU
    than im2col (F.unfold) + bmm."""
    stride, padding, dilation = geometry
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    c = _chunk(n, weight.numel() * weight.element_size())
    tiled = weight.detach().expand(c, *weight.shape).reshape(c * c_out, *weight.shape[1:])
    total = torch.zeros_like(weight).view(-1)
    for s in range(0, n, c):
        k = min(c, n - s)
        xs = x[s:s + k].reshape(1, k * c_in, *x.shape[2:])
        gs = gy[s:s + k].reshape(1, k * c_out, *gy.shape[2:])
        per_example = torch.ops.aten.convolution_backward(
            gs, xs, tiled[:k * c_out], None, stride, padding, dilation, False, [0, 0], k,
            [False, True, False])[1].view(k, -1)
        sq[s:s + k] += _row_sq_norms(per_example)
        total += per_example.sum(0)
    return total.view_as(weight)


class _GhostConv2d(torch.autograd.Function):
    """y = conv2d(x, W, b); backward also adds ‖g_i‖² of W and b per example to ``acc``.

    Weight, per layer by FLOPs (L output positions, K = C_in·kh·kw): per-example
    g_i = δ_i (C_out×L) · unfold(x_i)ᵀ (L×K), L·C_out·K, summed to give W's gradient so it is
    not computed twice; or the Gram form Σ_{l,l'} (u_l·u_l')(δ_l·δ_l'), L²(K + C_out), next to
    the ordinary weight gradient. Bias: ‖Σ_l δ_il‖².
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, acc, name):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.acc, ctx.name = geometry, acc, name
        return F.conv2d(x, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        geometry = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        n, c_out, positions, k = x.shape[0], weight.shape[0], gy.shape[2] * gy.shape[3], weight[0].numel()
        per_example_route = ghost_route(positions, k, c_out) == "per_example"
        sq = gy.new_zeros(n)
        grad_x = grad_w = grad_b = None
        mask = [need_x, need_w and not per_example_route, False]
        if any(mask):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                gy, x, weight, None, *geometry, False, [0, 0], 1, mask)
        if need_w and per_example_route:
            grad_w = _conv_per_example(x, gy, weight, geometry, sq)
        elif need_w:
            stride, padding, dilation = geometry
            c = _chunk(n, positions * (k + positions) * x.element_size())
            for s in range(0, n, c):
                u = F.unfold(x[s:s + c], weight.shape[2:], dilation, padding, stride).transpose(1, 2)
                sq[s:s + c] += _gram_sq_norms(u, gy[s:s + c].view(-1, c_out, positions).transpose(1, 2))
        if need_b:
            per_example = gy.sum((2, 3))
            sq += _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, grad_b, None, None, None


def _ghost_forward(module: nn.Module, name: str, ghost: GhostNorms, light: bool = False):  # noqa: ANN202
    """The forward GhostNorms patches in; ``light``: the layer of a ``linear_softmax`` model, whose
    output gradient is kept (C++ retain_grad, no autograd.Function) for the closed form."""
    geometry = None if type(module) in GHOST_LINEAR else _ghost_geometry(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if name in ghost._called:
            raise ValueError(f"layer {name!r} is called twice in one forward; ghost norms need one call per "
                             "layer: use per_example_sq_norms(..., method='func').")
        ghost._called.add(name)
        if x.dim() < 2:
            raise ValueError(f"layer {name!r} got an unbatched input of shape {tuple(x.shape)}.")
        if geometry is None and light and x.dim() == 2:
            out = F.linear(x, module.weight, module.bias)
            if out.requires_grad:  # backward fills out.grad = ∂L/∂z; GhostNorms.sq_norms reads it
                out.retain_grad()
                ghost._logits = (name, x, out)
            return out
        if geometry is None:
            return _GhostLinear.apply(x, module.weight, module.bias, ghost._acc, name)
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return _GhostConv2d.apply(x, module.weight, module.bias, geometry, ghost._acc, name)

    return forward


class GhostNorms:
    """Per-example squared gradient norms of the Linear/Conv2d parameters, fused into one backward.

    Inside the context, supported layers run custom autograd functions that compute the
    usual gradients and, per example i, ‖∂f_i/∂θ‖² for their weight and bias (see
    ``_GhostLinear`` and ``_GhostConv2d``). Use one forward and one backward per context:

        with GhostNorms(model) as ghost:
            F.cross_entropy(model(x), y, reduction="sum").backward()
        s = ghost.sq_norms()                  # (N,) float64; with the mean loss multiply by N²

    ``sq_norms`` measures the gradient contributions of what was backpropagated: with the
    mean loss each example contributes g_i/N. ``uncovered`` lists trainable parameters the
    ghost path does not see (e.g. GroupNorm); their norms come from ``per_example_sq_norms``.
    The model (not a DDP wrapper) is patched; DDP around it works unchanged.

    A ``linear_softmax`` model (logistic regression) takes a lighter route with the same result:
    its layer keeps the gradient of its output z (``retain_grad``) and ``sq_norms`` applies the
    closed form ‖∂L/∂z_i‖²(‖x_i‖² + 1), whatever the loss scale (mean cross entropy:
    ∂L/∂z_i = (p_i − e_{y_i})/N; binary model: (σ(z_i) − y_i)/N), so a step pays a few small
    kernels instead of a Python autograd.Function (bench/diversity_overhead.py).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = {name: m for name, m in model.named_modules() if ghost_supported(m)}
        covered = {id(p) for m in self.layers.values() for p in m.parameters(recurse=False)}
        self.covered = [n for n, p in model.named_parameters() if id(p) in covered and p.requires_grad]
        self.uncovered = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
        owners: dict[int, str] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for p in m.parameters(recurse=False):
                if id(p) in covered and owners.setdefault(id(p), name) != name:
                    raise ValueError(f"a parameter is shared by layers {owners[id(p)]!r} and {name!r}; "
                                     "use per_example_sq_norms(..., method='func').")
        self._acc, self._called = _Accumulator(), set()
        self._saved: dict[str, object] = {}
        closed = linear_softmax(model)
        self._logits: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._forwards = {name: _ghost_forward(m, name, self, light=closed is not None and m is closed.layer)
                          for name, m in self.layers.items()}
        self._mode_sensitive = mode_sensitive_layers(model)

    # Entered every training step: the patch goes through the layers' __dict__ (nn.Module's
    # __setattr__/__delattr__ cost microseconds, which a logistic-regression step feels).
    def __enter__(self) -> GhostNorms:
        check_per_example(self.model, self._mode_sensitive)
        self._acc, self._called, self._logits = _Accumulator(), set(), None
        for name, m in self.layers.items():
            self._saved[name] = m.__dict__.get("forward")  # an instance-level forward, rarely set
            m.__dict__["forward"] = self._forwards[name]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, m in self.layers.items():
            saved = self._saved.pop(name, None)
            if saved is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = saved

    def sq_norms(self) -> torch.Tensor | None:
        """(N,) float64 per-example squared norms over the covered parameters; None before backward."""
        if self._logits is not None and self._logits[2].grad is not None:
            name, x, z = self._logits
            layer = self.layers[name]
            bias = layer.bias is not None and layer.bias.requires_grad
            self._acc.add(_linear_sq_norms(x, z.grad, layer.weight.requires_grad, bias), name)
            self._logits = None
        return self._acc.total()


# --------------------------------------------------------------------------- torch.func path


def functional_state(model: nn.Module, dtype: torch.dtype | None = None) -> tuple[Params, Params]:
    """(params, buffers) for ``torch.func.functional_call``: detached copies of the trainable
    parameters (requiring grad) and of the buffers and frozen parameters, cast to ``dtype``."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()

    params = {n: cast(p).requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: cast(p) for n, p in model.named_parameters() if not p.requires_grad}
    return params, {**frozen, **{n: cast(b) for n, b in model.named_buffers()}}


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params,
                      buffers: Params, names: Sequence[str] | None = None,
                      weight_masks: Params | None = None) -> Params:
    """g_i = ∇_θ f_i for each example, by torch.func (vmap of grad of functional_call).

    Cost: a batched forward and backward that holds N copies of every gradient (N·d floats);
    pass small chunks of examples.

    Args:
        model: the architecture (its own parameters are ignored).
        x, y: N examples and labels.
        params: name -> tensor for the trainable parameters; buffers: everything else.
        names: differentiate only these parameters (default: all of ``params``).
        weight_masks: name -> (N, *shape) per-example masks M_i; f_i is then evaluated at
            M_i ∘ θ and g_i = M_i ∘ ∇f_i(M_i ∘ θ) (DropConnect's surrogate).

    Returns:
        name -> (N, *shape) per-example gradients, in ``params`` order.
    """
    names = list(params) if names is None else list(names)
    diff = {n: params[n].detach() for n in names}
    fixed = {n: t.detach() for n, t in params.items() if n not in diff}

    def loss_one(diff: Params, masks: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        full = {**fixed, **diff}
        full = {n: t * masks[n] if n in masks else t for n, t in full.items()}
        logits = functional_call(model, (full, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0), reduction="sum")

    return vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")(
        diff, weight_masks or {}, x, y)


def _flat(grads: Params, n: int) -> torch.Tensor:
    """(N, d): per-example gradients concatenated in parameter order."""
    return torch.cat([g.reshape(n, -1) for g in grads.values()], 1)


def _func_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params, buffers: Params,
                   names: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Σ over ``names`` of ‖g_i‖² per example, Σ_i g_i per name) by torch.func in memory-bounded chunks."""
    d = sum(params[n].numel() for n in names)
    c = max(1, FUNC_CHUNK_BYTES // (d * params[names[0]].element_size()))
    sq, summed = [], None
    for s in range(0, x.shape[0], c):
        grads = per_example_grads(model, x[s:s + c], y[s:s + c], params, buffers, names)
        sq.append(_row_sq_norms(_flat(grads, x[s:s + c].shape[0])).to(torch.float64))
        part = [g.sum(0) for g in grads.values()]
        summed = part if summed is None else [a + b for a, b in zip(summed, part)]
    return torch.cat(sq), summed


# --------------------------------------------------------------------------- exact Δ_D


def linear_softmax_sq_norms(found: LinearSoftmax, x: torch.Tensor, y: torch.Tensor, params: Params,
                            buffers: Params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Closed-form s_i = ‖∇f_i‖² and G = Σ_i ∇f_i of a ``linear_softmax`` model, f_i its cross entropy.

    With a_i = x_i flattened, z_i = W a_i + b, p_i = softmax(z_i) and δ_i = p_i − e_{y_i} = ∂f_i/∂z_i:
    ∇_W f_i = δ_i a_iᵀ and ∇_b f_i = δ_i, so s_i = ‖δ_i‖²(‖a_i‖² + 1) (no +1 without a trainable
    bias, no ‖a_i‖² with a frozen weight) and G = (δᵀA, Σ_i δ_i). Binary model, logits [0, z_i]
    with z_i = w·a_i + b: f_i = log(1 + e^{z_i}) − y_i z_i, so δ_i = σ(z_i) − y_i (y_i ∈ {0, 1}), a
    scalar, and s_i = (σ(z_i) − y_i)²(‖a_i‖² + 1), half of ‖p_i − e_{y_i}‖²(‖a_i‖² + 1) over its two
    logits. One forward, no backward.

    Args:
        found: ``linear_softmax(model)``.
        x, y: N examples and labels; params, buffers: as from ``functional_state``.

    Returns:
        (s, G) as ``per_example_sq_norms``.
    """
    prefix = f"{found.name}." if found.name else ""
    weight = params.get(f"{prefix}weight", buffers.get(f"{prefix}weight"))
    bias = params.get(f"{prefix}bias", buffers.get(f"{prefix}bias"))
    with torch.no_grad():
        a = x.flatten(1).to(weight.dtype)
        z = F.linear(a, weight, bias)
        if found.binary:
            if bool(((y != 0) & (y != 1)).any()):
                raise ValueError("binary logistic regression needs labels in {0, 1}.")
            delta = torch.sigmoid(z) - y.unsqueeze(1).to(z.dtype)
        else:
            delta = torch.softmax(z, 1)
            delta[torch.arange(z.shape[0], device=z.device), y] -= 1
        sq = _linear_sq_norms(a, delta, f"{prefix}weight" in params, f"{prefix}bias" in params)
        grads = {f"{prefix}weight": delta.T @ a, f"{prefix}bias": delta.sum(0)}
    return sq.to(torch.float64), [grads[n] for n in params]


def per_example_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         params: Params | None = None, buffers: Params | None = None,
                         method: str = "ghost") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """s_i = ‖∇f_i(w)‖² for each example and the summed gradient G = Σ_i ∇f_i(w).

    ``method="ghost"``: one forward and one backward of Σ_i f_i with ``GhostNorms`` give G and
    the norms of the Linear/Conv2d parameters; the other trainable parameters (``uncovered``,
    e.g. GroupNorm) get torch.func per-example gradients, a second batched pass that stops at
    the earliest such parameter. A ``linear_softmax`` model (logistic regression) takes the
    closed form instead (``linear_softmax_sq_norms``: one forward, no backward).
    ``method="func"``: torch.func for all parameters.

    Args:
        model: maps x to logits; f_i is the cross entropy of example i.
        x, y: N examples and labels (on the model's device).
        params, buffers: as from ``functional_state`` (default: the model's own, detached).
        method: "ghost" or "func".

    Returns:
        (s, G): s (N,) float64; G one tensor per trainable parameter, in ``params`` order.
    """
    check_per_example(model)
    if params is None or buffers is None:
        params, buffers = functional_state(model, None)
    if method == "func":
        return _func_sq_norms(model, x, y, params, buffers, list(params))
    if method != "ghost":
        raise ValueError(f"method = {method!r} is invalid: use 'ghost' or 'func'.")
    closed = linear_softmax(model)
    if closed is not None and (closed.name or x.dim() == 2):
        return linear_softmax_sq_norms(closed, x, y, params, buffers)
    ghost = GhostNorms(model)
    with ghost:
        loss = F.cross_entropy(functional_call(model, (params, buffers), (x,)), y, reduction="sum")
        summed = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    sq = ghost.sq_norms()
    sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device) if sq is None else sq
    if ghost.uncovered:
        sq = sq + _func_sq_norms(model, x, y, params, buffers, ghost.uncovered)[0]
    return sq, [torch.zeros_like(p) if g is None else g for g, p in zip(summed, params.values())]


def _dot(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² in t's dtype without temporaries (a fresh float64 copy costs page faults on CPU)."""
    flat = t.detach().reshape(-1)
    return torch.dot(flat, flat)


def _sq_norm(tensors: Iterable[torch.Tensor]) -> float:
    return sum(float(_dot(t)) for t in tensors)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, device: torch.device,
             dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, x.shape[0], size):
        xb = x[s:s + size].to(device)
        yield (xb.to(dtype) if dtype is not None and xb.is_floating_point() else xb), y[s:s + size].to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _flat_grad_chunks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: Params, buffers: Params,
                      chunk_size: int, dtype: torch.dtype | None,
                      masks: Callable[[int], Params] | None = None) -> Iterator[torch.Tensor]:
    """(c, d) per-example gradients (torch.func) of successive chunks of c <= chunk_size examples."""
    check_per_example(model)
    for xb, yb in _batches(x, y, chunk_size, _device(model), dtype):
        grads = per_example_grads(model, xb, yb, params, buffers, weight_masks=masks(xb.shape[0]) if masks else None)
        yield _flat(grads, xb.shape[0])


def gradient_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                       dtype: torch.dtype | None = None, method: str = "ghost") -> Diversity:
    """Exact Δ_D(w) = Σ_i‖∇f_i(w)‖² / ‖Σ_i ∇f_i(w)‖² and B_D = nΔ_D over (x, y), one pass.

    Cost with ``method="ghost"``: about 1.1-1.3x one forward+backward per batch for Linear/Conv2d
    models, plus a torch.func pass for uncovered layers; about 1.0x for logistic regression
    (closed form, no backward). See bench/diversity_overhead.py.

    Args:
        model: maps x to logits, in eval mode if it has BatchNorm or DropConnect layers.
        x, y: the n examples (a data set or a fixed sample) and labels.
        batch_size: examples per forward/backward.
        dtype: compute in this dtype (e.g. torch.float64); the model is not modified.
        method: "ghost" (fused norms + torch.func for the rest) or "func" (torch.func only).

    Returns:
        ``Diversity`` with n, Σ‖g_i‖² and ‖Σ g_i‖².
    """
    params, buffers = functional_state(model, dtype)
    total_sq, summed = 0.0, None
    for xb, yb in _batches(x, y, batch_size, _device(model), dtype):
        sq, grads = per_example_sq_norms(model, xb, yb, params=params, buffers=buffers, method=method)
        total_sq += float(sq.sum())
        summed = grads if summed is None else [a + b for a, b in zip(summed, grads)]
    return Diversity(int(x.shape[0]), total_sq, _sq_norm(summed))


# --------------------------------------------------------------------------- mechanisms


def sgld_diversity(base: Diversity, sigma: float, num_params: int) -> Diversity:
    """B_D^SGLD for surrogates g_i + ξ_i, ξ_i ~ N(0, σ²I_d) independent (closed form).

    Σ_i E‖g_i + ξ_i‖² = Σ_i‖g_i‖² + n d σ²;  E‖Σ_i (g_i + ξ_i)‖² = ‖Σ_i g_i‖² + n d σ².
    B^SGLD = n (Σ‖g_i‖² + ndσ²) / (‖Σg_i‖² + ndσ²) ≥ B_D exactly when B_D ≤ n.

    Args:
        base: ``gradient_diversity`` at w.
        sigma: per-example noise standard deviation σ.
        num_params: d, the number of trainable parameters.
    """
    noise = base.n * num_params * sigma**2
    return Diversity(base.n, base.sum_sq_norms + noise, base.sum_grad_sq_norm + noise)


def qsgd_variance(v: torch.Tensor, levels: int, bucket_size: int) -> torch.Tensor:
    """E‖Q(v)‖² − ‖v‖² of QSGD for each row of v (N, d), buckets of ``bucket_size`` entries.

    Per bucket b and entry j: r_j = |v_j| s / ‖v_b‖, p_j = r_j − ⌊r_j⌋;
    Var Q(v)_j = (‖v_b‖/s)² p_j (1 − p_j). A zero bucket has no variance.
    """
    n, d = v.shape
    rows = F.pad(v, (0, -d % bucket_size)).view(n, -1, bucket_size)
    norms = torch.linalg.vector_norm(rows, dim=2, keepdim=True)
    scaled = rows.abs() * levels / norms.clamp_min(torch.finfo(v.dtype).tiny)
    frac = scaled - scaled.floor()
    return ((norms.squeeze(2) / levels) ** 2 * (frac * (1 - frac)).sum(2)).sum(1)


def quantized_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, levels: int, bucket_size: int,
                        *, chunk_size: int = 8, dtype: torch.dtype | None = None) -> Diversity:
    """B_D^Quant for per-example QSGD surrogates Q(g_i) (exact, no sampling).

    Q is unbiased and independent across examples, so with V = Σ_i E‖Q(g_i) − g_i‖²
    (``qsgd_variance``): Σ_i E‖Q(g_i)‖² = Σ‖g_i‖² + V and E‖Σ Q(g_i)‖² = ‖Σ g_i‖² + V.
    Buckets run over the per-example gradient flattened in parameter order, as
    ``raygd.mechanisms.Quantize`` does for the concatenated gradient (per example here: the
    paper's surrogate, not the per-worker granularity that training uses).
    Cost: per-example gradients by torch.func, chunk_size·d floats at a time.
    """
    params, buffers = functional_state(model, dtype)
    total_sq = variance = 0.0
    summed = None
    for g in _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype):
        total_sq += float(_dot(g))
        variance += float(qsgd_variance(g, levels, bucket_size).sum())
        summed = g.sum(0) if summed is None else summed + g.sum(0)
    return Diversity(int(x.shape[0]), total_sq + variance, _sq_norm([summed]) + variance)


def dropconnect_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, p: float, *,
                          num_draws: int = 8, generator: torch.Generator | None = None, chunk_size: int = 8,
                          dtype: torch.dtype | None = None) -> Diversity:
    """B_D^DC for per-example DropConnect surrogates, by Monte Carlo over the masks.

    g_i^DC = M_i ∘ ∇f_i(M_i ∘ W) with independent masks M_i = Bernoulli(1−p)/(1−p) on the
    weight of every nn.Linear (biases unmasked), as ``raygd.mechanisms.DropConnect``.
    No closed form exists for cross entropy (the loss derivative depends on M_i through
    the logits, even for logistic regression), and E g_i^DC ≠ g_i in general. Each draw k
    gives every example its own mask; the estimate is the ratio of the two unbiased means
    (1/K)Σ_k Σ_i‖g_ik‖² → Σ_i E‖g_i^DC‖² and (1/K)Σ_k ‖Σ_i g_ik‖² → E‖Σ_i g_i^DC‖²,
    consistent as K grows. Cost: K torch.func passes over the data.
    """
    params, buffers = functional_state(model, dtype)
    linear = {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    masked = [n for n in params if n in linear]
    if generator is None:
        generator = torch.Generator(device=_device(model)).manual_seed(0)

    def masks(c: int) -> Params:
        return {n: dropconnect_masks((c, *params[n].shape), p, generator, params[n].dtype) for n in masked}

    total_sq = total_grad_sq = 0.0
    for _ in range(num_draws):
        summed = None
        for g in _flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype, masks):
            total_sq += float(_dot(g))
            summed = g.sum(0) if summed is None else summed + g.sum(0)
        total_grad_sq += _sq_norm([summed])
    return Diversity(int(x.shape[0]), total_sq / num_draws, total_grad_sq / num_draws)


def mechanism_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: MechanismConfig, *,
                        dtype: torch.dtype | None = None, num_draws: int = 8,
                        generator: torch.Generator | None = None) -> Diversity:
    """B_D^DIM of the mechanism ``cfg`` names, always with per-example surrogates (the paper's),
    whatever granularity training uses; vanilla: ``gradient_diversity``."""
    name = cfg.name
    if name == "sgld":
        d = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return sgld_diversity(gradient_diversity(model, x, y, dtype=dtype), cfg.sgld_sigma, d)
    if name == "quantize":
        return quantized_diversity(model, x, y, cfg.quant_levels, cfg.quant_bucket_size, dtype=dtype)
    if name == "dropconnect":
        return dropconnect_diversity(model, x, y, cfg.drop_prob, num_draws=num_draws, generator=generator,
                                     dtype=dtype)
    return gradient_diversity(model, x, y, dtype=dtype)


# --------------------------------------------------------------------------- differential diversity


def differential_diversity(model: nn.Module, other: nn.Module | Mapping[str, torch.Tensor], x: torch.Tensor,
                           y: torch.Tensor, *, chunk_size: int = 16,
                           dtype: torch.dtype | None = None) -> Diversity:
    """Definition 2: Δ̄(w, w′) = Σ_i‖∇f_i(w) − ∇f_i(w′)‖² / ‖Σ_i (∇f_i(w) − ∇f_i(w′))‖², B̄ = nΔ̄.

    Args:
        model: the architecture with parameters w.
        other: a model of the same architecture, or a name -> tensor mapping, holding w′.
        x, y: the sample; chunk_size: examples per torch.func pass (two passes per chunk).
        dtype: compute dtype.

    Returns:
        ``Diversity`` with n, Σ‖Δg_i‖² and ‖Σ Δg_i‖².
    """
    params, buffers = functional_state(model, dtype)
    theirs = dict(other.named_parameters()) if isinstance(other, nn.Module) else dict(other)
    missing = [n for n in params if n not in theirs]
    if missing:
        raise ValueError(f"other has no parameters named {missing[:3]}: it must share model's architecture.")
    other_params = {n: theirs[n].detach().to(params[n].dtype) for n in params}
    total_sq, summed = 0.0, None
    chunks = zip(_flat_grad_chunks(model, x, y, params, buffers, chunk_size, dtype),
                 _flat_grad_chunks(model, x, y, other_params, buffers, chunk_size, dtype))
    for mine, others in chunks:
        diff = mine - others
        total_sq += float(_dot(diff))
        summed = diff.sum(0) if summed is None else summed + diff.sum(0)
    return Diversity(int(x.shape[0]), total_sq, _sq_norm([summed]))


# --------------------------------------------------------------------------- online estimators


def in_step_moments(sum_sq_norms: float, grad_sum_sq_norm: float, batch_size: int,
                    population_size: int | None = None) -> Moments:
    """Unbiased E‖g‖² and ‖μ‖² from one batch's per-example norms s_i and summed gradient G.

    With replacement (the paper's sampling): E‖g‖² ≈ Σs_i / b and
    ‖μ‖² ≈ (‖G‖² − Σs_i) / (b(b−1)) (the mean of g_i·g_j over pairs i ≠ j), both unbiased.
    Without replacement from n (``population_size``), the pair mean estimates
    c = (n‖μ‖² − E‖g‖²)/(n−1), so ‖μ‖² ≈ ((n−1)c + E‖g‖²)/n (finite-population correction).

    Args:
        sum_sq_norms: Σ_i ‖g_i‖² over the b examples (all workers).
        grad_sum_sq_norm: ‖Σ_i g_i‖² (with the mean loss: b²‖grad‖² after the all-reduce).
        batch_size: b >= 2.
        population_size: n when the batch was drawn without replacement, else None.
    """
    if batch_size < 2:
        return Moments(math.nan, math.nan)
    m2 = sum_sq_norms / batch_size
    pairs = (grad_sum_sq_norm - sum_sq_norms) / (batch_size * (batch_size - 1))
    if population_size is not None:
        pairs = ((population_size - 1) * pairs + m2) / population_size
    return Moments(m2, pairs)


def two_batch_moments(small_sq_norm: float, small_batch: int, big_sq_norm: float, big_batch: int,
                      population_size: int | None = None) -> Moments:
    """E‖g‖² and ‖μ‖² from mean-gradient norms at two batch sizes (McCandlish et al., App. A).

    E‖G_b‖² = ‖μ‖² + v_b tr(Σ) with v_b = 1/b (with replacement) or (n−b)/(b(n−1))
    (without, ``population_size`` = n). Solving for b < B:
    tr(Σ) = (‖G_b‖² − ‖G_B‖²)/(v_b − v_B), ‖μ‖² = ‖G_B‖² − v_B tr(Σ), both unbiased; with
    replacement ‖μ‖² = (B‖G_B‖² − b‖G_b‖²)/(B − b). E‖g‖² = ‖μ‖² + tr(Σ).

    Args:
        small_sq_norm: ‖G_b‖² of a b-example mean gradient (averaged over the P workers).
        small_batch: b = B/P.
        big_sq_norm: ‖G_B‖² of the all-reduced B-example mean gradient.
        big_batch: B > b (else the result is nan).
        population_size: n for sampling without replacement, else None.
    """
    if big_batch <= small_batch:
        return Moments(math.nan, math.nan)

    def v(b: int) -> float:
        return 1.0 / b if population_size is None else (population_size - b) / (b * (population_size - 1))

    trace = (small_sq_norm - big_sq_norm) / (v(small_batch) - v(big_batch))
    mu2 = big_sq_norm - v(big_batch) * trace
    return Moments(mu2 + trace, mu2)


def mean_over_workers(value: float, world_size: int, device: torch.device | str = "cpu") -> float:
    """(1/P) Σ_ranks value with one all-reduce; the value itself at world size 1."""
    if world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world_size


def grad_sq_norm(model: nn.Module) -> float:
    """Σ over parameters of ‖p.grad‖², e.g. ‖G_B‖² after DDP's all-reduce.

    One fused kernel for all the norms (``torch._foreach_norm``, as ``clip_grad_norm_`` uses), squared
    and summed in float64: fewer kernel launches than a dot product per tensor, which a small
    model's training step (the free and in-step estimators read this every step) feels.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return math.fsum(float(n) ** 2 for n in torch._foreach_norm(grads)) if grads else 0.0


class MomentsEMA:
    """Smoothed B_D over steps: the ratio of exponential moving averages of E‖g‖² and ‖μ‖².

    Averaging numerator and denominator separately (not the per-step ratio) is less biased:
    the per-step ‖μ‖² estimate is noisy and can be ≤ 0, and E[a/b] ≠ E[a]/E[b]. Steps whose
    estimate is nan are skipped. Values are bias-corrected (1 − decay^t), which cancels in
    the ratio.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay = {decay} must be in [0, 1).")
        self.decay, self.steps = decay, 0
        self._num = self._den = 0.0

    def update(self, m: Moments) -> Moments:
        """Fold in one step's estimate; return the smoothed moments (``.batch_bound`` for B_D)."""
        if not (math.isnan(m.expected_sq_norm) or math.isnan(m.sq_norm_of_mean)):
            self.steps += 1
            self._num = self.decay * self._num + (1 - self.decay) * m.expected_sq_norm
            self._den = self.decay * self._den + (1 - self.decay) * m.sq_norm_of_mean
        return self.value

    @property
    def value(self) -> Moments:
        if self.steps == 0:
            return Moments(math.nan, math.nan)
        correction = 1 - self.decay**self.steps
        return Moments(self._num / correction, self._den / correction)


def reduce_gradients(model: nn.Module, world_size: int) -> tuple[float, float]:
    """The free estimator's two norms around DDP's all-reduce, done by hand in one flat all-reduce.

    For a backward run under ``ddp.no_sync()``: reads ‖G_b‖² of this rank's gradient, averages every
    ``.grad`` over the ranks in place (what DDP does after a backward) and reads ‖G_B‖² of the result.
    ‖G_b‖² rides in the same all-reduce as one extra entry, so the measured update pays one collective,
    like an ordinary one. Without a process group the gradients stay as they are.

    Returns:
        (mean over ranks of ‖G_b‖², ‖G_B‖²).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0, 0.0
    flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_zeros(1)])
    body = flat[:-1]
    flat[-1] = torch.dot(body, body)
    if dist.is_initialized():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        for g, part in zip(grads, body.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
    return float(flat[-1]), float(torch.dot(body, body))
