"""Ghost norms: per-example ‖∇f_i‖² of every nn.Linear / nn.Conv2d, fused into one ordinary backward.

Inside ``GhostNorms``, supported layers run custom autograd functions that compute the usual
gradients and, per example, the squared norm of their weight and bias gradients without
materialising per-example gradients where a Gram form is cheaper (``ghost_route``). Also here:
the checks that per-example gradients are defined (``check_per_example``) and the recognition of
a linear softmax model (``linear_softmax``), whose norms have a closed form.

Why hand-written: the libraries that compute per-example gradient norms (Opacus, with its ghost
clipping) do it for DP-SGD, wrapping model, loss and optimizer to clip; raygd needs only the norms,
measured inside an ordinary (DDP) training step that computes the summed gradient anyway, for its
own DropConnectLinear too. torch.func's vmap(grad) materialises N copies of every gradient
(``per_example.py`` keeps it for the layers not covered here). Cost: about 1.1-1.3x a plain step
(bench/diversity_overhead.py).

Just over 400 lines: the Linear and Conv2d kernels and the GhostNorms context that installs them
share the accumulator and the chunking rules, so they stay together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from raygd.mechanisms.dropconnect_linear import DropConnectLinear
from raygd.models import BinaryLogisticRegression, LogisticRegression

CHUNK_BYTES = 4 * 2**20
"""Largest block of per-example gradients (or Gram matrices) a ghost layer holds at once."""
MAX_CHUNK = 16
"""Most examples per block: measured fastest for the MNIST CNN's convolutions (2 threads)."""


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
                "or use GroupNorm, which normalises within one example (see raygd.models)."
            )
        if isinstance(m, DropConnectLinear) and m.training and m.p > 0:
            raise ValueError(
                f"layer {name or '<model>'!r} (DropConnectLinear, p={m.p}) is in train mode and draws random "
                "masks. Call model.eval() to measure the diversity at w, or use dropconnect_diversity() "
                "for the DropConnect surrogate."
            )


def _ghost_geometry(m: nn.Module) -> tuple | None:
    """(stride, padding, dilation) for a Conv2d the ghost path handles, else None."""
    if type(m) is not nn.Conv2d or m.groups != 1 or isinstance(m.padding, str):
        return None
    padding = list(m.padding) if m.padding_mode == "zeros" else [0, 0]
    return list(m.stride), padding, list(m.dilation)


GHOST_LINEAR = (nn.Linear, DropConnectLinear, nn.modules.linear.NonDynamicallyQuantizableLinear)
"""Linear classes whose forward (in eval mode) is F.linear; subclasses may change it, so exact types."""


def ghost_supported(m: nn.Module) -> TypeGuard[nn.Linear | nn.Conv2d]:
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
    if type(model) is nn.Linear:
        found = LinearSoftmax("", model, False)
    elif type(model) is LogisticRegression or type(model) is BinaryLogisticRegression:
        found = LinearSoftmax("linear", model.linear, type(model) is BinaryLogisticRegression)
    elif (
        type(model) is nn.Sequential
        and len(model) == 2
        and type(model[0]) is nn.Flatten
        and (model[0].start_dim, model[0].end_dim) == (1, -1)
    ):
        found = LinearSoftmax("1", cast(nn.Linear, model[1]), False)  # its exact type is checked below
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
            raise ValueError(
                f"layer {layer!r} sees {sq.shape[0]} examples on dim 0, other layers "
                f"{self.parts[0].shape[0]}: ghost norms need the examples on dim 0 of every layer."
            )
        self.parts.append(sq)

    def total(self) -> torch.Tensor | None:
        if len(self.parts) <= 1:
            return self.parts[0].to(torch.float64) if self.parts else None
        return torch.stack(self.parts).sum(0, dtype=torch.float64)


def ghost_route(positions: int, fan_in: int, fan_out: int) -> str:
    """ "per_example" or "gram", whichever computes ‖Σ_t δ_t a_tᵀ‖² per example in fewer FLOPs.

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
        ga, gd = a[s : s + c] @ a[s : s + c].transpose(1, 2), d[s : s + c] @ d[s : s + c].transpose(1, 2)
        out[s : s + c] = (ga * gd).sum((1, 2))
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
    def forward(ctx, x, weight, bias, acc, name):
        ctx.save_for_backward(x, weight)
        ctx.acc, ctx.name = acc, name
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.dim() == 2:  # the common case, with as few kernel launches as possible
            ctx.acc.add(_linear_sq_norms(x, gy, need_w, need_b), ctx.name)
            return (
                gy @ weight if need_x else None,
                gy.T @ x if need_w else None,
                gy.sum(0) if need_b else None,
                None,
                None,
            )
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
                    sq[s : s + c] += _row_sq_norms(d[s : s + c].transpose(1, 2) @ a[s : s + c])
            else:
                sq += _gram_sq_norms(a, d)
        if need_b:
            per_example = d.sum(1)
            sq += _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, grad_b, None, None


class _GhostMaskedLinear(torch.autograd.Function):
    """DropConnect at W for G consecutive groups of g examples (N = G·g): y_i = (M_k ∘ W) x_i + b for
    example i of group k, masks (G, out, in); backward returns the gradient with respect to W,
    Σ_k M_k ∘ (Σ_{i∈k} δ_i x_iᵀ), and adds per example the masked surrogate's norm
    ‖M_k ∘ (δ_i x_iᵀ)‖² + ‖δ_i‖² (bias unmasked).

    ‖M ∘ (δ xᵀ)‖² = Σ_jk M_jk² δ_j² x_k² = ((δ²) M²) · x²: one batched matmul per group, as cheap as the
    forward; x (N, d) only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, acc, name):
        groups = mask.shape[0]
        masked = mask * weight
        ctx.save_for_backward(x, masked, mask)
        ctx.acc, ctx.name = acc, name
        out = torch.bmm(x.view(groups, -1, x.shape[1]), masked.transpose(1, 2)).view(x.shape[0], -1)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, gy):
        x, masked, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        groups = mask.shape[0]
        x3, gy3 = x.view(groups, -1, x.shape[1]), gy.reshape(groups, -1, gy.shape[1])
        sq = gy.new_zeros(gy.shape[0])
        grad_x = grad_w = None
        if need_w:
            sq = (torch.bmm(gy3.square(), mask.square()) * x3.square()).sum(2).view(-1)
            grad_w = (mask * torch.bmm(gy3.transpose(1, 2), x3)).sum(0)
        if need_x:
            grad_x = torch.bmm(gy3, masked).view_as(x)
        if need_b:
            sq = sq + _row_sq_norms(gy)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, gy.sum(0) if need_b else None, None, None, None


def _conv_per_example(
    x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor, geometry: tuple, sq: torch.Tensor
) -> torch.Tensor:
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
        xs = x[s : s + k].reshape(1, k * c_in, *x.shape[2:])
        gs = gy[s : s + k].reshape(1, k * c_out, *gy.shape[2:])
        per_example = torch.ops.aten.convolution_backward(
            gs, xs, tiled[: k * c_out], None, stride, padding, dilation, False, [0, 0], k, [False, True, False]
        )[1].view(k, -1)
        sq[s : s + k] += _row_sq_norms(per_example)
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
    def forward(ctx, x, weight, bias, geometry, acc, name):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.acc, ctx.name = geometry, acc, name
        return F.conv2d(x, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, gy):
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
                gy, x, weight, None, *geometry, False, [0, 0], 1, mask
            )
        if need_w and per_example_route:
            grad_w = _conv_per_example(x, gy, weight, geometry, sq)
        elif need_w:
            stride, padding, dilation = geometry
            c = _chunk(n, positions * (k + positions) * x.element_size())
            for s in range(0, n, c):
                u = F.unfold(x[s : s + c], weight.shape[2:], dilation, padding, stride).transpose(1, 2)
                sq[s : s + c] += _gram_sq_norms(u, gy[s : s + c].view(-1, c_out, positions).transpose(1, 2))
        if need_b:
            per_example = gy.sum((2, 3))
            sq += _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, grad_b, None, None, None


def _ghost_forward(
    module: nn.Linear | nn.Conv2d, name: str, ghost: GhostNorms, light: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward GhostNorms patches in; ``light``: the layer of a ``linear_softmax`` model, whose
    output gradient is kept (C++ retain_grad, no autograd.Function) for the closed form."""
    geometry = None if type(module) in GHOST_LINEAR else _ghost_geometry(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if name in ghost._called:
            raise ValueError(
                f"layer {name!r} is called twice in one forward; ghost norms need one call per "
                "layer: use per_example_sq_norms(..., method='func')."
            )
        ghost._called.add(name)
        if x.dim() < 2:
            raise ValueError(f"layer {name!r} got an unbatched input of shape {tuple(x.shape)}.")
        if isinstance(module, nn.Conv2d):  # the ghost path's convolutions (geometry is set)
            if module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return _GhostConv2d.apply(x, module.weight, module.bias, geometry, ghost._acc, name)
        mask = ghost.weight_masks.get(name)
        if mask is not None:
            if x.dim() != 2:
                raise ValueError(f"layer {name!r}: masked ghost norms need (N, features) inputs, got {tuple(x.shape)}.")
            return _GhostMaskedLinear.apply(x, module.weight, module.bias, mask, ghost._acc, name)
        if light and x.dim() == 2:
            out = F.linear(x, module.weight, module.bias)
            if out.requires_grad:  # backward fills out.grad = ∂L/∂z; GhostNorms.sq_norms reads it
                out.retain_grad()
                ghost._logits = (name, x, out)
            return out
        return _GhostLinear.apply(x, module.weight, module.bias, ghost._acc, name)

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
                    raise ValueError(
                        f"a parameter is shared by layers {owners[id(p)]!r} and {name!r}; "
                        "use per_example_sq_norms(..., method='func')."
                    )
        self._acc, self._called = _Accumulator(), set()
        self._saved: dict[str, object] = {}
        closed = linear_softmax(model)
        self._logits: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self._forwards = {
            name: _ghost_forward(m, name, self, light=closed is not None and m is closed.layer)
            for name, m in self.layers.items()
        }
        self._mode_sensitive = mode_sensitive_layers(model)
        self.weight_masks: dict[str, torch.Tensor] = {}
        """Linear layer name -> the DropConnect masks (G, out, in) of this forward, one per consecutive group
        of N/G examples: the layer computes at M_k ∘ W, its gradient is the surrogate's
        Σ_i M_k(i) ∘ ∂f_i/∂(M_k(i) ∘ W) and its norms ‖M_k(i) ∘ ∂f_i/∂(M_k(i) ∘ W)‖² (``_GhostMaskedLinear``)."""

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
        if self._logits is not None:
            name, x, z = self._logits
            if z.grad is not None:
                layer = self.layers[name]
                bias = layer.bias is not None and layer.bias.requires_grad
                self._acc.add(_linear_sq_norms(x, z.grad, layer.weight.requires_grad, bias), name)
                self._logits = None
        return self._acc.total()
