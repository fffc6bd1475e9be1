"""Ghost norms: per-example ‖∇f_i‖² of every layer with a norm rule, fused into one ordinary backward.

Inside ``GhostNorms``, each layer whose exact type has a rule (``rules.NORM_RULES``) adds, per
example, the squared norm of its own parameters' gradient: nn.Linear (on (N, d) or (N, ..., d)
inputs) and nn.Conv2d run custom autograd functions that compute the usual gradients and the norms
without materialising per-example gradients where a Gram form is cheaper (``ghost_route``);
Embedding, LayerNorm, RMSNorm and user rules (``register_norm_rule``) run from a gradient hook on
the layer's output. Layers with trainable parameters and no rule fall back to torch.func
(``per_example.py``); ``norm_routes`` says which layer took which route.

Why hand-written: the libraries that compute per-example gradient norms (Opacus, with its ghost
clipping) do it for DP-SGD, wrapping model, loss and optimizer to clip; raygd needs only the norms,
measured inside an ordinary (DDP) training step that computes the summed gradient anyway, for its
own DropConnectLinear too. torch.func's vmap(grad) materialises N copies of every gradient.
Cost: about 1.1-1.3x a plain step (bench/diversity_overhead.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import nn

from raygd.diversity.checks import WHAT_STILL_WORKS, check_per_example, linear_softmax, mode_sensitive_layers
from raygd.diversity.routes import plan_routes
from raygd.diversity.rules import (
    NormRule,
    _chunk,
    _linear_sq_norms,
    _row_sq_norms,
    conv2d_geometry,
    conv2d_norms,
    conv2d_route,
    conv2d_weight,
    embedding_norms,
    linear_norms,
    sequence_linear_weight,
    shared_ids,
)
from raygd.mechanisms.dropconnect_linear import DropConnectLinear

GHOST_LINEAR = (nn.Linear, DropConnectLinear, nn.modules.linear.NonDynamicallyQuantizableLinear)
"""Linear classes whose forward (in eval mode) is F.linear; subclasses may change it, so exact types."""


def ghost_supported(m: nn.Module) -> TypeGuard[nn.Linear | nn.Conv2d]:
    """An nn.Linear (or DropConnectLinear) or a groups=1 nn.Conv2d with numeric padding: a fused kernel."""
    return type(m) in GHOST_LINEAR or conv2d_geometry(m) is not None


class GhostUnsupported(ValueError):
    """A layer's call that ghost norms cannot measure (called twice, input shared by the batch)."""


# --------------------------------------------------------------------------- fused kernels


class _Accumulator:
    """Per-example squared norms of the ghost layers of one backward pass, summed on demand."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, torch.Tensor]] = []

    def add(self, sq: torch.Tensor, layer: str) -> None:
        if self.parts and self.parts[0][1].shape[0] != sq.shape[0]:
            raise ValueError(
                f"layer {layer!r} sees {sq.shape[0]} examples on dim 0, other layers "
                f"{self.parts[0][1].shape[0]}: ghost norms need the examples on dim 0 of every layer."
            )
        self.parts.append((layer, sq))

    def total(self, exclude: dict[str, str] | None = None) -> torch.Tensor | None:
        parts = [sq for layer, sq in self.parts if not exclude or layer not in exclude]
        if len(parts) <= 1:
            return parts[0].to(torch.float64) if parts else None
        return torch.stack(parts).sum(0, dtype=torch.float64)


class _GhostLinear(torch.autograd.Function):
    """y = x Wᵀ + b; backward also adds ‖g_i‖² of W and b per example to ``acc``.

    x (N, d): ‖g_i^W‖² = ‖x_i‖²‖δ_i‖²; x (N, ..., d), flattened to (N, T, d): ``sequence_linear_weight``
    (per-example δ_iᵀx_i summed into W's gradient, or the Gram form Σ_{t,t'}(x_t·x_t')(δ_t·δ_t') beside
    it, whichever needs fewer FLOPs). Bias: ‖Σ_t δ_it‖².
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
        sq, grad_w, grad_b = gy.new_zeros(n), None, None
        if need_w:
            sq, grad_w = sequence_linear_weight(a, d, True)
        if need_b:
            per_example = d.sum(1)
            sq = sq + _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return gy @ weight if need_x else None, grad_w, grad_b, None, None


class _GhostMaskedLinear(torch.autograd.Function):
    """DropConnect at W for G consecutive groups of g examples (N = G·g): y_i = (M_k ∘ W) x_i + b for
    example i of group k (every position of x_i, for inputs (N, ..., d)), masks (G, out, in); backward
    returns the gradient with respect to W, Σ_k M_k ∘ (Σ_{i∈k} P_i) with P_i = Σ_t δ_it x_itᵀ, and adds
    per example the masked surrogate's norm ‖M_k ∘ P_i‖² + ‖Σ_t δ_it‖² (bias unmasked).

    x (N, d): P_i = δ_i x_iᵀ is rank one and ‖M ∘ (δ xᵀ)‖² = ((δ²) M²) · x², one batched matmul per
    group, as cheap as the forward. x (N, T, d): P_i materialised in chunks of examples.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask, acc, name):
        groups = mask.shape[0]
        masked = mask * weight
        ctx.save_for_backward(x, masked, mask)
        ctx.acc, ctx.name = acc, name
        out = torch.bmm(x.reshape(groups, -1, x.shape[-1]), masked.transpose(1, 2))
        out = out.view(*x.shape[:-1], -1)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, gy):
        x, masked, mask = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        groups, n = mask.shape[0], x.shape[0]
        x3, gy3 = x.reshape(groups, -1, x.shape[-1]), gy.reshape(groups, -1, gy.shape[-1])
        sq, grad_x, grad_w = gy.new_zeros(n), None, None
        if need_w and x.dim() == 2:
            sq = (torch.bmm(gy3.square(), mask.square()) * x3.square()).sum(2).view(-1)
            grad_w = (mask * torch.bmm(gy3.transpose(1, 2), x3)).sum(0)
        elif need_w:
            a, d = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
            grad_w, per_group = torch.zeros_like(masked[0]), n // groups
            c = _chunk(n, 2 * masked[0].numel() * masked.element_size())
            for s in range(0, n, c):
                rows = torch.arange(s, min(s + c, n), device=mask.device) // per_group
                part = mask[rows] * (d[s : s + c].transpose(1, 2) @ a[s : s + c])
                sq[s : s + c] = _row_sq_norms(part)
                grad_w += part.sum(0)
        if need_x:
            grad_x = torch.bmm(gy3, masked).view_as(x)
        if need_b:
            sq = sq + _row_sq_norms(gy.reshape(n, -1, gy.shape[-1]).sum(1))
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, gy.reshape(-1, gy.shape[-1]).sum(0) if need_b else None, None, None, None


class _GhostConv2d(torch.autograd.Function):
    """y = conv2d(x, W, b); backward also adds ‖g_i‖² of W and b per example to ``acc``.

    Weight, per layer by FLOPs (``conv2d_weight``): per-example gradients summed to give W's gradient
    (so it is not computed twice), or the Gram form next to the ordinary weight gradient.
    Bias: ‖Σ_l δ_il‖² over the output pixels l.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, acc, name):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.acc, ctx.name = geometry, acc, name
        return F.conv2d(x, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        per_example_route = conv2d_route(x, gy, weight) == "per_example"
        sq = gy.new_zeros(x.shape[0])
        grad_x = grad_w = grad_b = None
        mask = [need_x, need_w and not per_example_route, False]
        if any(mask):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                gy, x, weight, None, *ctx.geometry, False, [0, 0], 1, mask
            )
        if need_w:
            total = conv2d_weight(x, gy, weight, ctx.geometry, sq)
            grad_w = total if per_example_route else grad_w
        if need_b:
            per_example = gy.sum((2, 3))
            sq += _row_sq_norms(per_example)
            grad_b = per_example.sum(0)
        ctx.acc.add(sq, ctx.name)
        return grad_x, grad_w, grad_b, None, None, None


# --------------------------------------------------------------------------- patched forwards


def _fused_forward(
    module: nn.Module, name: str, ghost: GhostNorms, light: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward GhostNorms patches into a Linear/Conv2d; ``light``: the layer of a ``linear_softmax``
    model, whose output gradient is kept (C++ retain_grad, no autograd.Function) for the closed form."""
    geometry = None if type(module) in GHOST_LINEAR else conv2d_geometry(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        problem = ghost._problem(name, x.shape[0] if x.dim() >= 2 else None)
        mask = ghost.weight_masks.get(name)
        if problem is not None:
            ghost._unsupported(name, problem, force_raise=mask is not None)
            return ghost._original(name, module)(x)
        ghost._called.add(name)
        if isinstance(module, nn.Conv2d):  # the ghost path's convolutions (geometry is set)
            if module.padding_mode != "zeros":
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            return _GhostConv2d.apply(x, module.weight, module.bias, geometry, ghost._acc, name)
        if mask is not None:
            return _GhostMaskedLinear.apply(x, module.weight, module.bias, mask, ghost._acc, name)
        if light and x.dim() == 2:
            layer = cast(nn.Linear, module)
            out = F.linear(x, layer.weight, layer.bias)
            if out.requires_grad:  # backward fills out.grad = ∂L/∂z; GhostNorms.sq_norms reads it
                out.retain_grad()
                ghost._logits = (name, x, out)
            return out
        return _GhostLinear.apply(x, module.weight, module.bias, ghost._acc, name)

    return forward


def _hook_forward(module: nn.Module, name: str, rule: NormRule, ghost: GhostNorms) -> Callable[..., Any]:
    """The forward GhostNorms patches into a layer with a hook rule: the layer's own forward, then a
    gradient hook on its output that calls the rule with the inputs, ∂L/∂y and the parameters used.
    The built-in Embedding rule also measures ids shared by the batch (``rules.shared_ids``)."""
    attrs = [k for k, p in module.named_parameters(recurse=False) if p.requires_grad]
    embedding = rule.fn is embedding_norms

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = ghost._original(name, module)(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return out
        params = {k: t for k in attrs if isinstance(t := getattr(module, k), torch.Tensor) and t.requires_grad}
        if not params:
            return out
        shared = shared_ids(args[0], out, ghost._n, ghost._root) if embedding and args else None
        if isinstance(shared, str):
            ghost._unsupported(name, shared)
            return out
        if shared is not None:
            args, out = (shared[0], *args[1:]), shared[1]
        problem = ghost._problem(name, out.shape[0] if out.dim() else None)
        if problem is None and rule.check_call is not None:
            problem = rule.check_call(module, args)
        if problem is not None:
            ghost._unsupported(name, problem)
            return out
        ghost._called.add(name)
        out.register_hook(partial(ghost._run_rule, name, module, rule, args, params))
        return out

    return forward


class GhostNorms:
    """Per-example squared gradient norms of every layer with a norm rule, fused into one backward.

    Inside the context, layers with a rule (``norm_routes``: "ghost:...") add, per example i,
    ‖∂f_i/∂θ‖² over their own trainable parameters θ. Use one forward and one backward per context:

        with GhostNorms(model) as ghost:
            summed_loss(model(x), y).backward()  # raygd.loss; for logits [N, C] or [N, T, C]
        s = ghost.sq_norms()                     # (N,) float64; with the mean loss multiply by N²

    ``sq_norms`` measures the gradient contributions of what was backpropagated: with the
    mean loss each example contributes g_i/N. ``uncovered`` lists trainable parameters of the
    layers that fall back (no rule, e.g. GroupNorm; a parameter shared by two layers), which
    ``per_example_sq_norms`` measures with torch.func; ``fallback_layers`` lists those layers, and
    after a forward also the layers that fell back at run time (``fallback_reasons`` says why).
    The model (not a DDP wrapper) is patched; DDP around it works unchanged.

    An Embedding of ids shared by the batch (positions arange(T) or arange(T)[None], T ≠ N) returns its
    output expanded over the N examples (a view: a broadcasting consumer sees the same values), whose
    gradient gives its per-example norms. A call ghost norms cannot measure (a layer called twice in one
    forward, another layer whose input is shared by the batch) raises ``GhostUnsupported``
    when ``on_unsupported="raise"`` (default); with ``"fallback"`` the layer runs unpatched, its
    norms are left out of ``sq_norms`` and its parameters are listed by ``fallback_parameters``.

    A ``linear_softmax`` model (logistic regression) takes a lighter route with the same result:
    its layer keeps the gradient of its output z (``retain_grad``) and ``sq_norms`` applies the
    closed form ‖∂L/∂z_i‖²(‖x_i‖² + 1), whatever the loss scale, so a step pays a few small kernels.
    """

    def __init__(self, model: nn.Module, *, on_unsupported: str = "raise") -> None:
        if on_unsupported not in ("raise", "fallback"):
            raise ValueError(f"on_unsupported = {on_unsupported!r} is invalid: use 'raise' or 'fallback'.")
        self.model, self.strict = model, on_unsupported == "raise"
        plan = plan_routes(model)
        self.routes, self._static_reasons = plan.routes, plan.reasons
        self.layers = {name: m for name, m in model.named_modules() if name in plan.rules}
        canonical = {id(p): n for n, p in model.named_parameters()}
        self._param_names = {
            name: [canonical[id(p)] for p in m.parameters(recurse=False) if p.requires_grad]
            for name, m in model.named_modules()
            if name in plan.routes
        }
        covered = {id(p) for m in self.layers.values() for p in m.parameters(recurse=False)}
        self.covered = [n for n, p in model.named_parameters() if id(p) in covered and p.requires_grad]
        self.uncovered = [n for n, p in model.named_parameters() if id(p) not in covered and p.requires_grad]
        closed = linear_softmax(model)
        self.fused = {
            name
            for name, m in self.layers.items()
            if (type(m) in GHOST_LINEAR and plan.rules[name].fn is linear_norms)
            or (type(m) is nn.Conv2d and plan.rules[name].fn is conv2d_norms)
        }
        """The layers that run raygd's fused Linear/Conv2d kernels (the others run their rule from a hook)."""
        self._forwards = {
            name: _fused_forward(m, name, self, light=closed is not None and m is closed.layer)
            if name in self.fused
            else _hook_forward(m, name, plan.rules[name], self)
            for name, m in self.layers.items()
        }
        self._needs_batch_size = closed is None
        self._mode_sensitive = mode_sensitive_layers(model)
        self._acc, self._called, self._runtime = _Accumulator(), set(), {}
        self._saved: dict[str, Any] = {}
        self._n: int | None = None
        self._root: torch.Tensor | None = None
        self._pre_hook: Any = None
        self._logits: tuple[str, torch.Tensor, torch.Tensor] | None = None
        self.weight_masks: dict[str, torch.Tensor] = {}
        """Linear layer name -> the DropConnect masks (G, out, in) of this forward, one per consecutive group
        of N/G examples (shared by all positions of an example): the layer computes at M_k ∘ W, its gradient
        is the surrogate's Σ_i M_k(i) ∘ ∂f_i/∂(M_k(i) ∘ W) and its norms ‖M_k(i) ∘ ∂f_i/∂(M_k(i) ∘ W)‖²
        (``_GhostMaskedLinear``)."""

    @property
    def fallback_reasons(self) -> dict[str, str]:
        """Layer name -> why it falls back to torch.func: by construction, and in the last forward."""
        return {**self._static_reasons, **self._runtime}

    @property
    def fallback_layers(self) -> list[str]:
        """The layers whose parameters ghost norms do not measure (``fallback_reasons`` says why)."""
        return list(self.fallback_reasons)

    def fallback_parameters(self) -> list[str]:
        """Trainable parameter names the last forward and backward left out of ``sq_norms``: ``uncovered``,
        those of layers that fell back at run time and those of ghost layers whose forward did not run
        (e.g. a layer whose weight another module uses directly)."""
        skipped = [n for n in self.layers if n in self._runtime or n not in self._called]
        names = set(self.uncovered) | {p for n in skipped for p in self._param_names[n]}
        return [n for n, p in self.model.named_parameters() if n in names]

    # Entered every training step: the patch goes through the layers' __dict__ (nn.Module's
    # __setattr__/__delattr__ cost microseconds, which a logistic-regression step feels).
    def __enter__(self) -> GhostNorms:
        check_per_example(self.model, self._mode_sensitive)
        self._acc, self._called, self._runtime, self._logits, self._n = _Accumulator(), set(), {}, None, None
        for name, m in self.layers.items():
            self._saved[name] = m.__dict__.get("forward")  # an instance-level forward, rarely set
            m.__dict__["forward"] = self._forwards[name]
        if self._needs_batch_size:
            self._pre_hook = self.model.register_forward_pre_hook(self._batch_size, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, m in self.layers.items():
            saved = self._saved.pop(name, None)
            if saved is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = saved
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        self._root = None

    def _batch_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: N is dim 0 of its first tensor input."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if self._n is None and first is not None and first.dim() > 0:
            self._n, self._root = int(first.shape[0]), first

    def _original(self, name: str, module: nn.Module) -> Callable[..., Any]:
        saved = self._saved.get(name)
        return saved if saved is not None else partial(type(module).forward, module)

    def _problem(self, name: str, rows: int | None) -> str | None:
        """Why this call of layer ``name`` cannot be measured (``rows``: its dim 0, None if unbatched)."""
        if name in self._called:
            return "is called twice in one forward (its per-example gradient sums both calls)"
        if rows is None:
            return "got an unbatched input (no examples dim)"
        if self._n is not None and rows != self._n:
            return (
                f"sees {rows} rows on dim 0 where the model's input has {self._n} examples: an input shared by "
                "the batch has no per-example gradient at this layer"
            )
        return None

    def _unsupported(self, name: str, problem: str, force_raise: bool = False) -> None:
        if self.strict or force_raise:
            kind = type(self.layers[name]).__name__
            raise GhostUnsupported(
                f"layer {name or '<model>'!r} ({kind}) {problem}; ghost norms cannot measure it. The exact path "
                "(gradient_diversity, per_example_sq_norms) measures its parameters with torch.func "
                f"(method='func' for the whole model); {WHAT_STILL_WORKS}."
            )
        self._runtime[name] = problem

    def _run_rule(
        self, name: str, module: nn.Module, rule: NormRule, args: tuple, params: dict, grad: torch.Tensor
    ) -> None:
        with torch.no_grad():
            self._acc.add(rule.fn(module, args, grad, params).detach(), name)

    def sq_norms(self) -> torch.Tensor | None:
        """(N,) float64 per-example squared norms over the measured parameters; None before backward."""
        if self._logits is not None:
            name, x, z = self._logits
            if z.grad is not None:
                layer = cast(nn.Linear, self.layers[name])
                bias = layer.bias is not None and layer.bias.requires_grad
                self._acc.add(_linear_sq_norms(x, z.grad, layer.weight.requires_grad, bias), name)
                self._logits = None
        return self._acc.total(self._runtime)
