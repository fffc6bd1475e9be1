"""Models: shapes, the binary logistic loss, and no layer that mixes examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raygd.config import MODELS
from raygd.models import build_model

SHAPES = {
    "logreg": (1, 28, 28),
    "logreg_binary": (1, 28, 28),
    "mnist_cnn": (1, 28, 28),
    "convnet": (3, 32, 32),
    "resnet": (3, 32, 32),
}


@pytest.mark.parametrize("name", MODELS)
def test_models_map_a_batch_to_logits(name):
    k = 2 if name == "logreg_binary" else 10
    model = build_model(name, SHAPES[name], k)
    out = model(torch.randn(5, *SHAPES[name]))
    assert out.shape == (5, k) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_no_batchnorm_so_examples_do_not_mix(name):
    k = 2 if name == "logreg_binary" else 10
    model = build_model(name, SHAPES[name], k)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    x = torch.randn(4, *SHAPES[name])
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_binary_logreg_cross_entropy_is_the_logistic_loss():
    torch.manual_seed(0)
    model = build_model("logreg_binary", (6,), 2)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    z = model.linear(x).squeeze(1)
    expected = F.binary_cross_entropy_with_logits(z, y.float())
    assert torch.allclose(F.cross_entropy(model(x), y), expected, atol=1e-6)


def test_binary_logreg_needs_two_classes_and_cnn_needs_images():
    with pytest.raises(ValueError, match="2 classes"):
        build_model("logreg_binary", (6,), 3)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("mnist_cnn", (784,), 10)
