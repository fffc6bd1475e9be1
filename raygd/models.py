"""Models of the paper's experiments, built by name for an input shape and class count; any other
``train.model`` is a user's factory by import string (``raygd.plugins``).

Normalisation and per-example gradients: gradient diversity needs per-example
gradients, and BatchNorm in train mode mixes examples (each example's output depends
on the batch statistics), so no model here uses BatchNorm. The small ResNet uses
GroupNorm, which normalises within one example; the cuda-convnet-style CNN drops the
original's local response normalisation; the others have no normalisation layer.
Every model returns class logits and is trained with cross entropy; binary logistic
regression returns the logits [0, z] so that cross entropy equals the logistic loss
log(1 + exp(-y z)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from raygd.config import MODELS, RunConfig
from raygd.plugins import PluginError, build_user_model, check_model

if TYPE_CHECKING:
    from raygd.data import Dataset


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: logits = W x + b on the flattened input."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class BinaryLogisticRegression(nn.Module):
    """Binary logistic regression with one weight vector: logits [0, w·x + b]."""

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        return torch.cat([torch.zeros_like(z), z], dim=1)


class MnistCNN(nn.Module):
    """The paper's MNIST CNN: two 5x5 conv + max-pool blocks, then two fully connected layers."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        widths: tuple[int, int, int] = (32, 64, 256),
    ):
        super().__init__()
        c1, c2, hidden = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvNet(nn.Module):
    """cuda-convnet-style CNN (layers-18pct): three 5x5 conv/pool blocks and a linear classifier.

    The original's local response normalisation is left out (see the module docstring).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.MaxPool2d(3, 2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, padding=1),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 2, padding=1),
        )
        side = -(-image_size // 8)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(8, out_ch), out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.GroupNorm(min(8, out_ch), out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR ResNet (6n+2 layers, n blocks per stage, widths 16/32/64) with GroupNorm."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.GroupNorm(8, 16), nn.ReLU())
        layers, in_ch = [], 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


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
