"""Per-layer norm rules: per-example ‖∂f_i/∂θ‖² of one layer's own parameters θ, and their registry.

A rule is a pure function of what one backward pass has at that layer anyway: its input a and the
gradient of the loss with respect to its output, δ = ∂L/∂y. With the examples on dim 0 and the
positions t (sequence, pixels, any other dims) in between, each rule's formula is in its docstring:

    Linear      ‖Σ_t δ_t a_tᵀ‖² = Σ_{t,s}(a_t·a_s)(δ_t·δ_s)  (Gram form, or per-example matrices,
                whichever is cheaper: ``ghost_route``), bias ‖Σ_t δ_t‖²
    Conv2d      the same on the unfolded input (im2col), positions = output pixels
    Embedding   ‖Σ_t e_{id_t} δ_tᵀ‖² = Σ_{t,s}[id_t = id_s](δ_t·δ_s), padding_idx rows excluded
    LayerNorm   weight ‖Σ_t x̂_t ⊙ δ_t‖², bias ‖Σ_t δ_t‖² (x̂ the normalised input)
    RMSNorm     weight ‖Σ_t x̂_t ⊙ δ_t‖²

``GhostNorms`` (``ghost.py``) looks a layer's exact type up in ``NORM_RULES``: Linear and Conv2d run
fused autograd functions built on these maths (the weight gradient comes out of the same kernels),
every other rule runs from a gradient hook on the layer's output; a layer with trainable parameters
and no rule falls back to torch.func (``per_example.py``). A user adds a rule for a layer of their
own with ``register_norm_rule`` (Opacus' ``register_norm_sampler`` is the model); registering a
built-in type replaces the built-in rule.

Why hand-written rather than Opacus' norm samplers: those serve DP-SGD clipping, run inside
Opacus' ``GradSampleModule`` wrapper and its clipping optimizer, and key on the sampler's own
conventions; raygd needs only the norms, inside an ordinary (DDP) training step that computes the
summed gradient anyway, and for its own DropConnectLinear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 4 * 2**20
"""Largest block of per-example gradients (or Gram matrices) a rule holds at once."""
MAX_CHUNK = 16
"""Most examples per block: measured fastest for the MNIST CNN's convolutions (2 threads)."""
LINEAR_BLOCK_BYTES = 4 * 2**20
"""Per-example weight gradients of a sequence Linear held at once (1 MiB was fastest at 1 thread, 4-16 MiB
at 2 threads, where fewer, larger bmm calls split better across the threads)."""

NormRuleFn = Callable[[nn.Module, tuple[Any, ...], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""fn(layer, inputs, grad_output, params) -> (N,) per-example squared norms (see ``register_norm_rule``)."""


@dataclass(frozen=True)
class NormRule:
    """A registered rule: ``fn`` computes the norms; ``supports(layer)`` returns why a particular layer
    of the type cannot use it (its parameters then fall back to torch.func), or None."""

    name: str
    fn: NormRuleFn
    supports: Callable[[nn.Module], str | None] | None = None
    check_call: Callable[[nn.Module, tuple[Any, ...]], str | None] | None = None
    """Per forward call: why these inputs cannot use the rule (e.g. ids shared by the batch), or None."""


NORM_RULES: dict[type[nn.Module], NormRule] = {}
"""Exact layer type -> its rule (a subclass may change forward, so subclasses are not matched)."""


def register_norm_rule(
    layer_type: type[nn.Module], *, name: str | None = None, supports: Callable[[nn.Module], str | None] | None = None
) -> Callable[[NormRuleFn], NormRuleFn]:
    """Decorator: ``fn`` gives the per-example squared gradient norms of ``layer_type``'s own parameters.

        @register_norm_rule(MyScale)
        def my_scale_norms(layer, inputs, grad_output, params):
            (x,) = inputs                              # y = x * gain, x (N, ..., d)
            prod = (x * grad_output).reshape(x.shape[0], -1, x.shape[-1])
            return prod.sum(1).square().sum(1)         # ‖Σ_t x_t ⊙ δ_t‖², (N,)

    ``fn(layer, inputs, grad_output, params) -> Tensor``, called once per forward call in the backward
    pass (under ``torch.no_grad``), with

    - ``layer``: the module; ``inputs``: the positional arguments its forward received (keyword
      arguments are not passed); ``grad_output``: ∂L/∂y for its output y (one tensor, examples on dim
      0), L being whatever was backpropagated (with the mean loss, example i contributes g_i/N);
    - ``params``: name -> tensor for the layer's own parameters (``recurse=False``) that require
      grad, the tensors its forward used (under ``torch.func.functional_call``, the swapped ones);
      the rule covers exactly these;
    - returns (N,): for each example i, Σ over ``params`` of ‖∂L_i/∂θ‖², L_i example i's part of L.

    Exact type match; registering a type again (a built-in included) replaces its rule; a registered
    rule takes precedence over the torch.func fallback. Returns ``fn`` unchanged.
    """

    def register(fn: NormRuleFn) -> NormRuleFn:
        NORM_RULES[layer_type] = NormRule(name or getattr(fn, "__name__", type(fn).__name__), fn, supports)
        return fn

    return register


# --------------------------------------------------------------------------- shared maths


def _row_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_i‖² per row i over all other dims (vector_norm needs no temporary the size of t)."""
    return torch.linalg.vector_norm(t if t.dim() == 2 else t.reshape(t.shape[0], -1), dim=1).square()


def _chunk(n: int, bytes_per_example: int) -> int:
    return max(1, min(n, MAX_CHUNK, CHUNK_BYTES // max(bytes_per_example, 1)))


PER_EXAMPLE_ENTRY_FLOPS = 20
"""What writing and reading one entry of a per-example weight gradient costs, in FLOPs of a Gram matmul
(x86 CPU: per-example δ_iᵀa_i in blocks of ``LINEAR_BLOCK_BYTES``, summed into W's gradient, against the
Gram form; char-LM shapes, T = 64, d = 128..512)."""


def ghost_route(positions: int, fan_in: int, fan_out: int, layer: str = "conv2d") -> str:
    """ "per_example" or "gram", whichever computes ‖Σ_t δ_t a_tᵀ‖² per example for less.

    positions T (sequence length, or output pixels of a convolution), a_t of size fan_in, δ_t of size
    fan_out. Gram matrices cost T²(fan_in + fan_out) FLOPs next to the ordinary weight gradient.
    Conv2d: per-example matrices (a grouped convolution's weight gradient) cost T·fan_in·fan_out, a
    second weight gradient. Linear: per-example matrices (bmm) replace W's gradient GEMM at the same FLOPs,
    so they cost only their memory traffic, ``PER_EXAMPLE_ENTRY_FLOPS``·fan_in·fan_out.
    """
    per_example = positions * fan_in * fan_out if layer == "conv2d" else PER_EXAMPLE_ENTRY_FLOPS * fan_in * fan_out
    return "per_example" if per_example <= positions**2 * (fan_in + fan_out) else "gram"


def _gram_sq_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """‖Σ_t d_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(d_t·d_t') per example; a (N, T, p), d (N, T, q)."""
    out = a.new_empty(a.shape[0])
    c = _chunk(a.shape[0], 2 * a.shape[1] ** 2 * a.element_size())
    for s in range(0, a.shape[0], c):
        ga, gd = a[s : s + c] @ a[s : s + c].transpose(1, 2), d[s : s + c] @ d[s : s + c].transpose(1, 2)
        out[s : s + c] = torch.linalg.vecdot(ga.flatten(1), gd.flatten(1))
    return out


def _linear_sq_norms(x: torch.Tensor, gy: torch.Tensor, need_w: bool, need_b: bool) -> torch.Tensor:
    """‖g_i‖² of y = x Wᵀ + b for x (N, d), gy = ∂L/∂y (N, k): ‖x_i‖²‖gy_i‖² for W, ‖gy_i‖² for b."""
    d2 = _row_sq_norms(gy)
    if need_w:
        return torch.addcmul(d2, _row_sq_norms(x), d2) if need_b else _row_sq_norms(x) * d2
    return d2 if need_b else torch.zeros_like(d2)


# --------------------------------------------------------------------------- Linear and Conv2d


def sequence_linear_weight(
    a: torch.Tensor, d: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(‖Σ_t d_t a_tᵀ‖² per example, Σ_i Σ_t d_t a_tᵀ or None) for y = x Wᵀ on a (N, T, p), d = ∂L/∂y (N, T, q).

    Route by ``ghost_route(..., "linear")``: per-example matrices P_i = d_iᵀ a_i (bmm, blocks of about
    ``LINEAR_BLOCK_BYTES``), whose sum is W's gradient (so it is not computed twice), or the Gram form
    Σ_{t,s}(a_t·a_s)(d_t·d_s) (T×T matrices, O(T²(p + q))) beside one GEMM for the gradient.
    """
    n, t, p = a.shape
    q = d.shape[2]
    if ghost_route(t, p, q, "linear") == "gram":
        return _gram_sq_norms(a, d), (d.reshape(-1, q).T @ a.reshape(-1, p) if need_grad else None)
    sq, total = a.new_empty(n), None
    c = max(1, min(n, LINEAR_BLOCK_BYTES // (p * q * a.element_size())))
    for s in range(0, n, c):
        per_example = torch.bmm(d[s : s + c].transpose(1, 2), a[s : s + c])
        sq[s : s + c] = _row_sq_norms(per_example)
        if need_grad:
            part = per_example.sum(0)
            total = part if total is None else total.add_(part)
    return sq, total


def linear_norms(
    layer: nn.Module, inputs: tuple[Any, ...], grad_output: torch.Tensor, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """y = x Wᵀ + b, x (N, d) or (N, ..., d) flattened to (N, T, d): ‖x_i‖²‖δ_i‖² (2-D) or
    ``sequence_linear_weight`` for W, ‖Σ_t δ_it‖² for b."""
    x, gy = inputs[0], grad_output
    need_w, need_b = "weight" in params, "bias" in params
    if x.dim() == 2:
        return _linear_sq_norms(x, gy, need_w, need_b)
    n = x.shape[0]
    a, d = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
    sq = sequence_linear_weight(a, d, False)[0] if need_w else gy.new_zeros(n)
    return sq + _row_sq_norms(d.sum(1)) if need_b else sq


def conv2d_geometry(m: nn.Module) -> tuple | None:
    """(stride, padding, dilation) for a Conv2d the ghost path handles (groups = 1, numeric padding), else None."""
    if type(m) is not nn.Conv2d or m.groups != 1 or isinstance(m.padding, str):
        return None
    padding = list(m.padding) if m.padding_mode == "zeros" else [0, 0]
    return list(m.stride), padding, list(m.dilation)


def conv2d_route(x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor) -> str:
    """``ghost_route`` for a convolution: positions = output pixels, fan_in = C_in·kh·kw, fan_out = C_out."""
    return ghost_route(gy.shape[2] * gy.shape[3], weight[0].numel(), weight.shape[0])


def conv2d_weight(
    x: torch.Tensor, gy: torch.Tensor, weight: torch.Tensor, geometry: tuple, sq: torch.Tensor
) -> torch.Tensor | None:
    """Adds ‖g_i^W‖² of y = conv2d(x, W) to ``sq``; returns Σ_i g_i^W on the per-example route, else None.

    Per-example route: g_i = δ_i (C_out×L) · unfold(x_i)ᵀ (L×K), computed in chunks of c examples as
    the weight gradient of a grouped convolution (groups = c, faster on CPU than im2col + bmm) and
    summed to give W's gradient. Gram route: Σ_{l,l'} (u_l·u_l')(δ_l·δ_l') on the unfolded input u.
    ``x`` is already padded for a padding mode other than zeros (``geometry`` then has padding 0).
    """
    stride, padding, dilation = geometry
    n, c_in = x.shape[:2]
    c_out, positions = weight.shape[0], gy.shape[2] * gy.shape[3]
    if conv2d_route(x, gy, weight) == "gram":
        c = _chunk(n, positions * (weight[0].numel() + positions) * x.element_size())
        for s in range(0, n, c):
            u = F.unfold(x[s : s + c], weight.shape[2:], dilation, padding, stride).transpose(1, 2)
            sq[s : s + c] += _gram_sq_norms(u, gy[s : s + c].reshape(-1, c_out, positions).transpose(1, 2))
        return None
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


def conv2d_norms(
    layer: nn.Module, inputs: tuple[Any, ...], grad_output: torch.Tensor, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """y = conv2d(x, W) + b: ``conv2d_weight`` for W, ‖Σ_l δ_il‖² for b (l the output pixels)."""
    x, gy = inputs[0], grad_output.contiguous()
    geometry = conv2d_geometry(layer)
    assert geometry is not None and isinstance(layer, nn.Conv2d), "supports() admitted only such layers"
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    sq = gy.new_zeros(gy.shape[0])
    if "weight" in params:
        conv2d_weight(x, gy, params["weight"], geometry, sq)
    return sq + _row_sq_norms(gy.sum((2, 3))) if "bias" in params else sq


def _conv2d_supports(m: nn.Module) -> str | None:
    if conv2d_geometry(m) is None:
        return "Conv2d with groups > 1 or string padding"
    return None


# --------------------------------------------------------------------------- Embedding and norms


def embedding_sq_norms(
    ids: torch.Tensor, grad: torch.Tensor, num_embeddings: int, padding_idx: int | None
) -> torch.Tensor:
    """‖Σ_t e_{id_t} δ_tᵀ‖² = Σ_{t,s}[id_t = id_s](δ_t·δ_s) per example: ids (N, ...), grad = ∂L/∂y (N, ..., d).

    Example i's weight gradient has one row per distinct id, the sum of δ_t over the positions
    holding it (none for ``padding_idx``, whose row gets no gradient). The rows are summed by
    (example, id) key after one sort (``torch.unique``): O(NT·d), never an N×V×d tensor.
    """
    n = ids.shape[0]
    flat_ids = ids.reshape(-1)
    rows = grad.reshape(flat_ids.shape[0], -1)
    keys = flat_ids + num_embeddings * torch.arange(n, device=ids.device).repeat_interleave(flat_ids.shape[0] // n)
    if padding_idx is not None:
        keep = flat_ids != padding_idx
        keys, rows = keys[keep], rows[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = rows.new_zeros(unique.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
    return rows.new_zeros(n).index_add_(0, unique // num_embeddings, _row_sq_norms(summed))


def embedding_norms(
    layer: nn.Module, inputs: tuple[Any, ...], grad_output: torch.Tensor, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """nn.Embedding: ``embedding_sq_norms`` of its weight."""
    assert isinstance(layer, nn.Embedding)
    return embedding_sq_norms(inputs[0], grad_output, layer.num_embeddings, layer.padding_idx)


def _embedding_supports(m: nn.Module) -> str | None:
    if isinstance(m, nn.Embedding) and m.scale_grad_by_freq:
        return "Embedding with scale_grad_by_freq (its gradient divides by counts over the whole batch)"
    return None


def shared_ids(ids: Any, out: torch.Tensor, n: int | None, root: Any) -> tuple[Any, torch.Tensor] | str | None:
    """Embedding ids shared by the batch (positions arange(T), or arange(T)[None]): (ids, output) as views
    expanded over the N examples, whose gradient is per example; every consumer that broadcasts the
    output against the batch sees the same values. None: the ids are per example; a string: ambiguous.

    Shared: ids (1, ...) with N > 1, or 1-D ids of a length other than N, or 1-D ids equal to arange(N)
    that are not the model's input (``root``): positions when T = N. Other 1-D ids of length N are
    ambiguous (one id per example, or positions?) and fall back to torch.func."""
    if n is None or not isinstance(ids, torch.Tensor) or ids.dim() == 0 or (ids.dim() >= 2 and ids.shape[0] == n):
        return None
    if ids.dim() >= 2 and ids.shape[0] == 1:
        return ids.expand(n, *ids.shape[1:]), out.expand(n, *out.shape[1:])
    if ids.dim() == 1 and ids is root:
        return None
    if ids.dim() == 1 and (ids.shape[0] != n or torch.equal(ids, torch.arange(n, device=ids.device))):
        return ids.expand(n, *ids.shape), out.expand(n, *out.shape)
    return (
        f"got ids of shape {tuple(ids.shape)} with N = {n} examples: per example (one id each) or shared by the "
        "batch (positions)? Pass positions as arange(T)[None] or arange(T).expand(N, T)"
    )


def _rows(t: torch.Tensor, dims: int) -> torch.Tensor:
    """t as (N, T, D): D the product of its last ``dims`` (normalised) dims, T of those in between."""
    d = 1
    for size in t.shape[t.dim() - dims :]:
        d *= size
    return t.reshape(t.shape[0], -1, d)


def layer_norm_sq_norms(
    x: torch.Tensor, gy: torch.Tensor, normalized_shape: tuple[int, ...], eps: float, need_w: bool, need_b: bool
) -> torch.Tensor:
    """y = x̂ ⊙ w + b, x̂ = (x − mean)/√(var + eps) over the normalised dims: per example
    ‖Σ_t x̂_t ⊙ δ_t‖² for w and ‖Σ_t δ_t‖² for b (t over the dims between the batch and the normalised ones)."""
    sq, dims = gy.new_zeros(x.shape[0]), len(normalized_shape)
    if need_w:
        ones = x.new_ones(normalized_shape)  # F.layer_norm without weight takes a path twice as slow (CPU)
        xhat = F.layer_norm(x, normalized_shape, ones, torch.zeros_like(ones), eps)
        sq += _row_sq_norms(_rows(xhat * gy, dims).sum(1))
    if need_b:
        sq += _row_sq_norms(_rows(gy, dims).sum(1))
    return sq


def rms_norm_sq_norms(
    x: torch.Tensor, gy: torch.Tensor, normalized_shape: tuple[int, ...], eps: float | None
) -> torch.Tensor:
    """y = x̂ ⊙ w, x̂ = x/√(mean(x²) + eps) over the normalised dims: ‖Σ_t x̂_t ⊙ δ_t‖² per example."""
    xhat = F.rms_norm(x, list(normalized_shape), None, eps)
    return _row_sq_norms(_rows(xhat * gy, len(normalized_shape)).sum(1))


def layer_norm_norms(
    layer: nn.Module, inputs: tuple[Any, ...], grad_output: torch.Tensor, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """nn.LayerNorm: ``layer_norm_sq_norms`` of its weight and bias."""
    assert isinstance(layer, nn.LayerNorm)
    shape = tuple(layer.normalized_shape)
    return layer_norm_sq_norms(inputs[0], grad_output, shape, layer.eps, "weight" in params, "bias" in params)


def rms_norm_norms(
    layer: nn.Module, inputs: tuple[Any, ...], grad_output: torch.Tensor, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """nn.RMSNorm: ``rms_norm_sq_norms`` of its weight."""
    assert isinstance(layer, nn.RMSNorm)
    if "weight" not in params:
        return grad_output.new_zeros(grad_output.shape[0])
    return rms_norm_sq_norms(inputs[0], grad_output, tuple(layer.normalized_shape), layer.eps)


def _register_builtins() -> None:
    from raygd.mechanisms.dropconnect_linear import DropConnectLinear

    for linear in (nn.Linear, DropConnectLinear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        NORM_RULES[linear] = NormRule("linear", linear_norms)
    NORM_RULES[nn.Conv2d] = NormRule("conv2d", conv2d_norms, _conv2d_supports)
    NORM_RULES[nn.Embedding] = NormRule("embedding", embedding_norms, _embedding_supports)
    NORM_RULES[nn.LayerNorm] = NormRule("layer_norm", layer_norm_norms)
    NORM_RULES[nn.RMSNorm] = NormRule("rms_norm", rms_norm_norms)


_register_builtins()
BUILTIN_RULES = dict(NORM_RULES)
"""The rules raygd ships, by type (``NORM_RULES`` as imported, before any user registration)."""
