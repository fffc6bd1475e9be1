"""Ray Train's Fashion-MNIST example with raygd.attach: train_fashion_mnist.py."""
