"""The networks of the paper's experiments (logistic regression, the MNIST CNN, the cuda-convnet-style ConvNet, a
small ResNet): plain ``nn.Module`` classes that import only torch, so the diversity rules can recognise them
(``raygd.diversity.checks``) without importing the factory (``raygd.models``) that builds them by name.

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

import torch
from torch import nn


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
