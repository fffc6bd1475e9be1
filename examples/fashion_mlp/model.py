"""An MLP with LayerNorm for Fashion-MNIST, a model of your own by import string (README "Bring your own model"):

raygd train configs/quickstart.yaml --set train.model=examples.fashion_mlp.model:build
"""

from torch import nn


def build(input_shape, num_classes, width=256):
    """raygd calls build((1, 28, 28), 10, **train.model_args); the forward returns logits [N, 10]."""
    c, h, w = input_shape
    layers = [nn.Flatten(), nn.Linear(c * h * w, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)
