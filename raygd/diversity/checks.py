"""Which models have per-example gradients at all, and which have a closed form for their norms.

``check_per_example`` refuses a model whose per-example gradients are undefined (BatchNorm in train
mode mixes the examples) or random (DropConnectLinear in train mode); ``linear_softmax`` recognises
a logistic regression, whose norms ‖g_i‖² = ‖p_i − e_{y_i}‖²(‖x_i‖² + 1) need no backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, cast

from torch import nn

from raygd.mechanisms.dropconnect_linear import DropConnectLinear
from raygd.nets import BinaryLogisticRegression, LogisticRegression

WHAT_STILL_WORKS = (
    "train.diversity_estimator=free (P > 1 workers) needs no per-example gradients: it compares the "
    "local and all-reduced gradients"
)
"""The online estimator that works for any model, named in the errors of the per-example paths."""


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
                "examples, so per-example gradients (exact B_D, the in_step estimator) are undefined. Call "
                "model.eval() (running statistics), or use GroupNorm or LayerNorm, which normalise within one "
                f"example (see raygd.models); {WHAT_STILL_WORKS}."
            )
        if isinstance(m, DropConnectLinear) and m.training and m.p > 0:
            raise ValueError(
                f"layer {name or '<model>'!r} (DropConnectLinear, p={m.p}) is in train mode and draws random "
                "masks. Call model.eval() to measure the diversity at w, or use dropconnect_diversity() "
                "for the DropConnect surrogate."
            )


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
