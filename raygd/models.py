"""Models by name: the paper's networks (``raygd.nets``) built for an input shape and class count, or a user's
factory by import string (``raygd.plugins``), and the checks a workload passes before any Ray work
(``check_workload``) with the sizes it logs (``model_size``, ``workload_params``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raygd.config import MODELS, RunConfig
from raygd.nets import BinaryLogisticRegression, ConvNet, LogisticRegression, MnistCNN, SmallResNet
from raygd.plugins import PluginError, build_user_model

if TYPE_CHECKING:
    from raygd.data import Dataset


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, model_args: dict[str, Any] | None = None
) -> nn.Module:
    """Build a model by name, or by a user's import string (``raygd.plugins.build_user_model``).

    Args:
        name: one of ``raygd.config.MODELS``, or ``module.path:build`` (``train.model``).
        input_shape: shape of one example, (C, H, W) for images, (d,) for features, (T,) for token ids.
        num_classes: number of classes k (``logreg_binary`` needs k = 2; a vocabulary for a language model).
        model_args: ``train.model_args``, the keyword arguments of a user's factory.

    Returns:
        An ``nn.Module`` mapping a batch of examples to (N, k) logits (a user's model: or (N, T, k)).
    """
    if name not in MODELS:
        return build_user_model(name, input_shape, num_classes, model_args)
    in_features = 1
    for s in input_shape:
        in_features *= s
    if name == "logreg":
        return LogisticRegression(in_features, num_classes)
    if name == "logreg_binary":
        if num_classes != 2:
            raise ValueError(f"train.model = 'logreg_binary' needs 2 classes, got {num_classes}.")
        return BinaryLogisticRegression(in_features)
    if len(input_shape) != 3:
        raise ValueError(f"train.model = {name!r} needs image inputs (C, H, W), got shape {input_shape}.")
    channels, height, _ = input_shape
    if name == "mnist_cnn":
        return MnistCNN(channels, num_classes, height)
    if name == "convnet":
        return ConvNet(channels, num_classes, height)
    if name == "resnet":
        return SmallResNet(channels, num_classes)
    raise ValueError(f"train.model = {name!r} is unknown: allowed values are {', '.join(MODELS)}.")


def check_model(cfg: RunConfig, model: nn.Module, data: Dataset) -> None:
    """Run one forward of the model the run trains (``raygd.models.build_model``) on two training examples;
    fail with a ``PluginError`` before Ray starts when its logits do not fit the labels (``[N, C]`` for
    labels ``[N]``, ``[N, T, C]`` for ``[N, T]``, C = the data's class count), or a BatchNorm layer in train
    mode meets the in-step estimator. Built-in models pass in ~10 ms."""
    import torch
    from torch import nn

    est = cfg.online_estimator
    for name, layer in model.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and est == "in_step":
            raise PluginError(
                f"train.diversity_estimator = 'in_step' needs per-example gradients, but layer {name!r} of "
                f"train.model = {cfg.train.model!r} is a {type(layer).__name__} in train mode, whose batch "
                "statistics mix the examples. Estimators that still work: free (needs train.num_workers > 1) or none; "
                "or replace it by GroupNorm/LayerNorm."
            )
    x, y = data.x_train[:2], data.y_train[:2]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except Exception as err:
        raise PluginError(
            f"train.model = {cfg.train.model!r}: forward on two training examples of shape {tuple(x.shape)} raised "
            f"{type(err).__name__}: {err}."
        ) from err
    want = (*y.shape, data.num_classes)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != want:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise PluginError(
            f"train.model = {cfg.train.model!r}: forward on inputs {tuple(x.shape)} gave logits {got}; labels of "
            f"shape {tuple(y.shape)} with {data.num_classes} classes need logits {want}."
        )


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` layers (what ``mechanism.dropconnect_layers`` patterns match)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_workload(cfg: RunConfig, data: Dataset) -> nn.Module:
    """Build the run's model for ``data`` and check it before Ray starts (``raygd.plugins.check_model``: one
    forward, logits against labels; and that every ``mechanism.dropconnect_layers`` pattern names a Linear
    layer). Returns the model (its initial weights are not the run's: the loop seeds its own build)."""
    from fnmatch import fnmatchcase

    model = build_model(cfg.train.model, data.input_shape, data.num_classes, cfg.train.model_args)
    check_model(cfg, model, data)
    patterns = cfg.mechanism.dropconnect_layers
    if cfg.mechanism.name == "dropconnect":
        names = linear_layer_names(model)
        unmatched = [p for p in patterns or [] if not any(fnmatchcase(n, p) for n in names)]
        if unmatched or not names:
            raise PluginError(
                f"mechanism.dropconnect_layers = {patterns!r}: {unmatched or 'the model'} matches no nn.Linear "
                f"layer of train.model = {cfg.train.model!r}; its Linear layers are {names or 'none'}."
            )
    return model


def model_size(model: nn.Module, example: torch.Tensor) -> tuple[int, int, float]:
    """(trainable parameters, bytes of their gradient, forward multiply-accumulates per example) of ``model``,
    counted on one example (``example`` [1, *input_shape]): what ``raygd project`` needs from any model, logged
    with every run as ``model.num_params``, ``model.grad_bytes`` and ``model.macs_per_example``.

    MACs count the nn.Linear layers (in_features per output value, so [N, T, d] inputs count T times) and
    nn.Conv2d layers; attention's own matmuls, embeddings and norms are left out (for a small transformer
    at context T they add ~T·d per token per layer, under 1/6 of the Linear MACs at T ≤ d)."""
    macs = [0.0]

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            macs[0] += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs[0] += output[0].numel() * k

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in trainable), sum(p.numel() * p.element_size() for p in trainable), macs[0]


def workload_params(cfg: RunConfig, data: Dataset) -> dict[str, Any]:
    """What every run records of its model as MLflow params (``raygd project`` reads them for any model):
    ``model.num_params``, ``model.grad_bytes`` (what DDP all-reduces per update, before any compression),
    ``model.macs_per_example``, ``model.class`` (the factory's class name), and which layers' per-example
    norms take a ghost rule and which fall back to torch.func (``diversity.ghost_layers``,
    ``diversity.fallback_layers``: ``raygd.diversity.norm_routes``, up to MLflow's 6000 characters a param)."""
    from raygd.diversity.routes import norm_routes

    model = build_model(cfg.train.model, data.input_shape, data.num_classes, cfg.train.model_args)
    params, grad_bytes, macs = model_size(model, data.x_train[:1])
    routes = norm_routes(model)
    ghost = sorted({route for route in routes.values() if route != "fallback"})
    fallback = [name or "<model>" for name, route in routes.items() if route == "fallback"]
    return {
        "model.num_params": params,
        "model.grad_bytes": grad_bytes,
        "model.macs_per_example": macs,
        "model.class": type(model).__name__,
        "diversity.ghost_layers": ", ".join(ghost)[:6000] or "none",
        "diversity.fallback_layers": ", ".join(fallback)[:6000] or "none",
    }
