"""Which layer takes which route to its per-example gradient norms: a norm rule ("ghost:<rule>") or
torch.func ("fallback"), decided once from the model's structure.

A layer with trainable parameters of its own takes its exact type's rule (``rules.NORM_RULES``)
unless the rule does not support it (e.g. a grouped Conv2d), one of its parameters is also used by
another layer (weight tying: a per-example norm of a shared parameter needs both uses at once), or
its parameters are used by an enclosing module rather than its own forward (nn.MultiheadAttention).
``norm_routes`` is what a run records (e.g. as an MLflow param).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from raygd.diversity.checks import linear_softmax
from raygd.diversity.rules import NORM_RULES, NormRule


class RoutePlan(NamedTuple):
    routes: dict[str, str]
    """Layer name -> "ghost:<rule>" or "fallback", for every layer with its own trainable parameters."""
    reasons: dict[str, str]
    """Fallback layer name -> why."""
    rules: dict[str, NormRule]
    """Ghost layer name -> its rule."""


def plan_routes(model: nn.Module) -> RoutePlan:
    """For every layer with trainable parameters of its own: its route, a fallback's reason, a ghost layer's rule."""
    closed = linear_softmax(model)
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    inside_mha = {
        f"{n}.{c}" if n else c
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for c, _ in m.named_children()
    }
    routes, reasons, rules = {}, {}, {}
    for name, m in model.named_modules():
        own = [(k, p) for k, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        rule = NORM_RULES.get(type(m))
        shared = next(((k, o) for k, p in own for o in owners[id(p)] if o != name), None)
        if shared is not None:
            reason = (
                f"its parameter {shared[0]!r} is also used by layer {shared[1]!r} (weight tying, or one layer "
                "under two names): ghost norms need each parameter in one layer"
            )
        elif name in inside_mha:
            reason = "its parameters are used by the enclosing nn.MultiheadAttention, not by its own forward"
        elif rule is None:
            reason = f"no norm rule for {type(m).__name__} (raygd.diversity.register_norm_rule adds one)"
        else:
            reason = rule.supports(m) if rule.supports is not None else None
        if reason is not None or rule is None:
            routes[name], reasons[name] = "fallback", reason or "unsupported"
            continue
        routes[name] = "ghost:linear_softmax" if closed is not None and m is closed.layer else f"ghost:{rule.name}"
        rules[name] = rule
    return RoutePlan(routes, reasons, rules)


def norm_routes(model: nn.Module) -> dict[str, str]:
    """Layer name -> "ghost:<rule>" (e.g. "ghost:linear", "ghost:embedding") or "fallback" (torch.func),
    for every layer with trainable parameters of its own ("" is the model itself). A layer can still
    fall back at run time (``GhostNorms.fallback_layers``), e.g. an Embedding of positions shared by the batch."""
    return plan_routes(model).routes
