"""Character windows of the Python standard library's own source: text every machine has, no download.

Use it with raygd by import string (``load(**data.args)``)::

    data:
      name: examples.charlm.data:load
      args: {context: 64, train_sequences: 4096, test_sequences: 512, seed: 0}

What ``load`` returns: ``(train, test)``, two ``CharWindows`` data sets. Each is a
``torch.utils.data.TensorDataset`` of ``(x, y)`` pairs, x = a window's first T = ``context`` char ids and
y = the next char at every position (the window shifted by one), both LongTensor [T]; ``dataset.tensors``
is ``(x [N, T], y [N, T])``. Each carries

- ``num_classes``: the vocabulary size C = 98, fixed (``VOCAB``): raygd reads it before inferring C from
  the labels, which would miss ids that happen not to occur (a rare char, the unknown id);
- ``source``: which text it is, e.g. ``"python3.11.7 stdlib, 168 files (147 train, 21 test)"``;
- ``vocab``: the characters by id, for ``decode``.

The text: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name. They are
split *by file* (a seeded shuffle of the file list; ``test_fraction`` of the files are test), so a test
window never comes from a file seen in training. Each side's files are cut into non-overlapping windows
of ``context + 1`` chars, and ``train_sequences`` / ``test_sequences`` windows are drawn from them without
replacement (seeded). The vocabulary is printable ASCII plus tab and newline; every other char (non-ASCII,
``\\r``, form feed) maps to one unknown id, 0.

Deterministic: the same Python version (major.minor.micro, which fixes the stdlib's text) and arguments
give the same tensors on any machine; another Python version gives other text, and ``source`` says which.
Loading all 168 files of Python 3.11 takes ~0.2 s.
"""

from __future__ import annotations

import random
import re
import sys
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

UNKNOWN = 0
"""The id of every char outside the vocabulary."""
VOCAB = "\0\t\n" + "".join(chr(c) for c in range(0x20, 0x7F))
"""The chars by id: id 0 (shown as NUL) is unknown, then tab, newline and printable ASCII (space to ~)."""
_OUTSIDE = re.compile(r"[^\t\n\x20-\x7e]")
_LOOKUP = torch.zeros(256, dtype=torch.long)
for _id, _char in enumerate(VOCAB[1:], start=1):
    _LOOKUP[ord(_char)] = _id


class CharWindows(TensorDataset):
    """(x, y) windows of char ids, with the vocabulary size and the text's provenance."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, source: str):
        super().__init__(x, y)
        self.num_classes = len(VOCAB)
        self.source = source
        self.vocab = VOCAB


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The standard library's top-level ``*.py`` files, sorted by name (the first ``max_files`` if given)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return files[:max_files] if max_files is not None else files


def split_files(files: list[Path], seed: int, test_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train files, test files): a seeded shuffle of ``files``, its first ``test_fraction`` (at least one) test."""
    if len(files) < 2:
        raise ValueError(f"{len(files)} stdlib files under {sysconfig.get_paths()['stdlib']}: need at least 2.")
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    n_test = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
    return shuffled[n_test:], shuffled[:n_test]


def encode(text: str) -> torch.Tensor:
    """Char ids of ``text`` (LongTensor [len(text)]); chars outside ``VOCAB`` give ``UNKNOWN``."""
    ascii_bytes = bytearray(_OUTSIDE.sub("\0", text).encode("ascii"))
    if not ascii_bytes:
        return torch.zeros(0, dtype=torch.long)
    return _LOOKUP[torch.frombuffer(ascii_bytes, dtype=torch.uint8).long()]


def decode(ids: torch.Tensor) -> str:
    """The text of char ids (unknown shown as U+FFFD)."""
    return "".join("\ufffd" if i == UNKNOWN else VOCAB[i] for i in ids.tolist())


def _windows(files: list[Path], context: int) -> torch.Tensor:
    """Every non-overlapping (context + 1)-char window of the files, [W, context + 1]."""
    chunks = []
    for path in files:
        ids = encode(path.read_bytes().decode("utf-8", errors="replace"))
        usable = len(ids) // (context + 1) * (context + 1)
        chunks.append(ids[:usable].view(-1, context + 1))
    return torch.cat(chunks) if chunks else torch.zeros(0, context + 1, dtype=torch.long)


def _draw(windows: torch.Tensor, count: int, generator: torch.Generator, side: str, source: str) -> CharWindows:
    if count > len(windows):
        raise ValueError(
            f"{side}_sequences = {count} is more than the {len(windows)} windows of the {side} files "
            f"({source}): ask for fewer, a shorter context, or more files (max_files)."
        )
    chosen = windows[torch.randperm(len(windows), generator=generator)[:count]]
    return CharWindows(chosen[:, :-1].contiguous(), chosen[:, 1:].contiguous(), source)


def load(
    *,
    context: int = 64,
    train_sequences: int = 4096,
    test_sequences: int = 512,
    seed: int = 0,
    max_files: int | None = None,
    test_fraction: float = 0.125,
) -> tuple[CharWindows, CharWindows]:
    """raygd's data factory (``data.name: examples.charlm.data:load``).

    Args:
        context: T, chars per example (the model's context).
        train_sequences, test_sequences: windows drawn for each side (n counts sequences).
        seed: seeds the file split and the draw of windows.
        max_files: use only the first this many files (sorted by name); null: all.
        test_fraction: share of the files (at least one) held out as test.

    Returns:
        (train, test) ``CharWindows``: x, y LongTensor [N, context], y the next char of x.
    """
    if context < 1 or train_sequences < 1 or test_sequences < 1:
        raise ValueError("context, train_sequences and test_sequences must be integers >= 1.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction = {test_fraction} must be in (0, 1).")
    files = stdlib_files(max_files)
    train_files, test_files = split_files(files, seed, test_fraction)
    version = ".".join(str(v) for v in sys.version_info[:3])
    source = f"python{version} stdlib, {len(files)} files ({len(train_files)} train, {len(test_files)} test)"
    generator = torch.Generator().manual_seed(seed)
    train = _draw(_windows(train_files, context), train_sequences, generator, "train", source)
    test = _draw(_windows(test_files, context), test_sequences, generator, "test", source)
    return train, test
