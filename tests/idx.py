"""Write small, learnable Fashion-MNIST-shaped idx files so tests exercise the real loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the idx format (magic 0x08 0x<ndim>, big-endian dims)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_images(n: int, seed: int, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images: class k lights a 7x7 block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    images = rng.integers(0, 90, size=(n, 28, 28))
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 4)
        images[i, 7 * r : 7 * r + 7, 7 * c : 7 * c + 7] += 150
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_idx_dataset(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, seed: int = 0) -> Path:
    """Write the four Fashion-MNIST idx files (gzipped like Debian's, or plain) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = make_images(n, s)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
    return folder
