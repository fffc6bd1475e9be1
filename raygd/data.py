"""Data sets as in-memory tensors, r-replication and per-worker sharding.

Fashion-MNIST, MNIST and CIFAR-10 load through torchvision's dataset classes from
local files: ``data.data_dir``, else ``$RAYGD_DATA_DIR``, else the Debian path
(``apt-get install dataset-fashion-mnist`` puts Fashion-MNIST under
/usr/share/datasets/fashion-mnist), else torchvision's download where there is
internet. torchvision wants the *decompressed* idx files under
``root/<Class>/raw/``; Debian ships ``.gz`` files, so they are decompressed once
into a cache (``$RAYGD_CACHE_DIR``, default ``~/.cache/raygd``) keyed by the source.

A user's data set (``data.name`` an import string, ``raygd.plugins.load_user_data``) is taken as it comes:
inputs of any shape and dtype (token ids stay integers; no normalisation), labels [N] or [N, T]; its
class count is the train set's ``num_classes`` attribute, else 1 + the largest label. Everything is held
as in-memory tensors that Ray's object store carries to every worker (each holds a copy): a data set over
``max_data_bytes()`` (default 4 GiB, ``$RAYGD_MAX_DATA_BYTES``) is refused with a ``DataError`` before Ray
starts. Beyond that the path is Ray Data (``ray.data`` datasets streamed to the workers with
``ray.train.get_dataset_shard``), which raygd does not build yet: its (seed, step) sampler needs random
access by index.

Sampling is written by hand because it must be a pure function of the training state, (seed, step) and
the ``Cursor`` (epoch, position, examples consumed) that B advances: every worker computes the same global
batch of B indices and takes its own B/P slice, so P workers see exactly the examples one worker would (the
exactness test relies on it), B may change between updates (``raygd.batch_schedule``), and a restarted
worker needs no sampler state but the step and the cursor.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import torch

from raygd.config import DataConfig

DEBIAN_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
HOW_TO_GET = (
    "Install it with `sudo apt-get install dataset-fashion-mnist` (files under /usr/share/datasets/fashion-mnist), "
    "or put the four idx files (.gz or decompressed) in a folder and set RAYGD_DATA_DIR or data.data_dir to it."
)


class DataError(ValueError):
    """The data set cannot be found or read; the message names the path and the fix."""


@dataclass
class Dataset:
    """Training and test examples as tensors; x is float32 (N, C, H, W) or (N, d)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    paired_eval_index: torch.Tensor | None = None
    """The replication control only (``data.replication_control``): the r-replicated set's evaluation
    sample (``eval_indices`` of its n) mapped to this set's distinct examples (``control_eval_indices``),
    so a caller can evaluate the control on exactly the examples the replicated arm evaluates on."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])


def _cache_root() -> Path:
    return Path(os.environ.get("RAYGD_CACHE_DIR", Path.home() / ".cache" / "raygd"))


def resolve_data_dir(cfg: DataConfig) -> Path | None:
    """The folder to read ``cfg.name`` from, or None to let torchvision download it."""
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data.data_dir = {cfg.data_dir!r} is not a folder. {HOW_TO_GET}")
        return path
    env = os.environ.get("RAYGD_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"RAYGD_DATA_DIR = {env!r} is not a folder. {HOW_TO_GET}")
        return path
    debian = DEBIAN_DIRS.get(cfg.name)
    if debian and Path(debian).is_dir():
        return Path(debian)
    return None


def _stage_idx(src: Path, class_name: str) -> Path:
    """Copy or decompress the four idx files of ``src`` into ``cache/<key>/<class_name>/raw``."""
    found = {}
    for name in IDX_FILES:
        plain, packed = src / name, src / f"{name}.gz"
        if plain.is_file():
            found[name] = plain
        elif packed.is_file():
            found[name] = packed
        else:
            raise DataError(f"{src} has no {name} or {name}.gz (needs all of {', '.join(IDX_FILES)}). {HOW_TO_GET}")
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in found.values())
    root = _cache_root() / hashlib.sha1(stamp.encode()).hexdigest()[:16]
    raw = root / class_name / "raw"
    if not (raw / ".complete").exists():
        raw.mkdir(parents=True, exist_ok=True)
        for name, path in found.items():
            tmp = raw / f"{name}.tmp"
            try:
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(cast(BinaryIO, fin), fout)  # both openers read bytes in "rb"
            except (OSError, EOFError, gzip.BadGzipFile) as err:
                raise DataError(f"cannot read {path}: {err}. Replace the file. {HOW_TO_GET}") from None
            tmp.replace(raw / name)
        (raw / ".complete").touch()
    return root


def _load_torchvision(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw (uint8 images, int64 labels) for train and test through torchvision."""
    import torchvision.datasets as tvd

    cls = {"fashion_mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10}[cfg.name]
    src = resolve_data_dir(cfg)
    if src is None:
        root, download = _cache_root() / "download", True
    elif cls is tvd.CIFAR10:
        root, download = src, False
    else:
        root, download = _stage_idx(src, cls.__name__), False
    try:
        train, test = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError/AssertionError/URLError for missing or bad files
        where = f"files in {src}" if src else "a download (no local files found)"
        raise DataError(
            f"cannot load data.name = {cfg.name!r} from {where}: {type(err).__name__}: {err}. {HOW_TO_GET}"
        ) from None
    out = []
    for ds in (train, test):
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"data.name = {cfg.name!r} in {src}: {images.shape[0]} images but "
                f"{labels.shape[0]} labels. Replace the files. {HOW_TO_GET}"
            )
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


def _synthetic(cfg: DataConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian features labelled by a random linear teacher (with 5% label noise)."""
    g = torch.Generator().manual_seed(seed + 7919)
    k = cfg.num_classes
    teacher = torch.randn(cfg.synthetic_features, k, generator=g)
    total = cfg.synthetic_size + max(cfg.synthetic_size // 4, 2)
    x = torch.randn(total, cfg.synthetic_features, generator=g)
    y = (x @ teacher).argmax(1)
    flip = torch.rand(total, generator=g) < 0.05
    y[flip] = torch.randint(k, (int(flip.sum()),), generator=g)
    n = cfg.synthetic_size
    return x[:n], y[:n], x[n:], y[n:]


def _select_classes(x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    relabel = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))
    return x[keep], relabel[y[keep]]


def replicated_distinct(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """The ceil(n/r) distinct indices that ``replicate`` repeats, in its order (r = 1: all n, in order).

    Draws from ``generator`` exactly what ``replicate`` draws, so the same generator state gives the
    same examples: ``replicate(n, r, g)[i] == replicated_distinct(n, r, g)[i % ceil(n/r)]``.
    """
    if r == 1:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[: -(-n // r)]


def replicate(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of an r-replicated data set of size n (the paper's r-replication).

    A random ceil(n/r) of the n examples is picked (``replicated_distinct``) and repeated r times;
    the result is cut to n indices, so n is unchanged and each picked example appears r times (the
    last ones fewer when r does not divide n). r = 1 is the identity.
    """
    if r == 1:
        return torch.arange(n)
    return replicated_distinct(n, r, generator).repeat(r)[:n]


def control_eval_indices(n: int, r: int, eval_size: int, seed: int) -> torch.Tensor:
    """The evaluation sample of the r-replicated set of size n, as indices into its ceil(n/r) distinct
    examples (the replication control's training set, in ``replicated_distinct`` order).

    Index i of ``replicate`` is distinct example i mod ceil(n/r), so the control evaluated on
    ``x_distinct[control_eval_indices(...)]`` sees the replicated arm's ``x[eval_indices(n, ...)]``,
    the same examples with the same multiplicities.
    """
    return eval_indices(n, eval_size, seed) % -(-n // r)


DEFAULT_MAX_DATA_BYTES = 4 * 2**30


def max_data_bytes() -> int:
    """The largest data set (train + test tensors) raygd holds in memory: ``$RAYGD_MAX_DATA_BYTES`` or 4 GiB."""
    raw = os.environ.get("RAYGD_MAX_DATA_BYTES", "")
    if not raw:
        return DEFAULT_MAX_DATA_BYTES
    if not raw.isdigit():
        raise DataError(f"RAYGD_MAX_DATA_BYTES = {raw!r} is invalid: a number of bytes, e.g. 8589934592 for 8 GiB.")
    return int(raw)


def _check_size(cfg: DataConfig, tensors: tuple[torch.Tensor, ...]) -> None:
    size = sum(t.numel() * t.element_size() for t in tensors)
    limit = max_data_bytes()
    if size > limit:
        raise DataError(
            f"data.name = {cfg.name!r} holds {size / 2**30:.2f} GiB of tensors, over the {limit / 2**30:.2f} GiB raygd "
            "keeps in memory (every Ray worker holds a copy). Use data.train_size, a smaller data set, or raise "
            "RAYGD_MAX_DATA_BYTES if every node has the memory; streaming with Ray Data is not supported yet."
        )


def _user_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A user's (x_train, y_train, x_test, y_test) and its class count, labels checked against it."""
    from raygd.plugins import load_user_data

    x_tr, y_tr, x_te, y_te, declared = load_user_data(cfg.name, cfg.args)
    _check_size(cfg, (x_tr, y_tr, x_te, y_te))
    if y_tr.dim() != y_te.dim() or x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"data.name = {cfg.name!r}: train inputs {tuple(x_tr.shape[1:])} / labels {y_tr.dim()}-D differ from "
            f"test inputs {tuple(x_te.shape[1:])} / labels {y_te.dim()}-D; both sets need the same shapes."
        )
    largest = int(max(y_tr.max(), y_te.max()))
    num_classes = declared if declared is not None else max(largest + 1, 2)
    smallest = int(min(y_tr.min(), y_te.min()))
    if smallest < 0 or largest >= num_classes:
        raise DataError(
            f"data.name = {cfg.name!r}: labels range over {smallest}..{largest}, outside 0..{num_classes - 1} "
            f"({'its num_classes' if declared is not None else 'classes'} = {num_classes}); labels must be class "
            "indices in 0..num_classes-1."
        )
    if cfg.classes and y_tr.dim() != 1:
        raise DataError(
            f"data.classes = {cfg.classes} selects examples by class: it needs labels [N], not one per position."
        )
    return x_tr, y_tr, x_te, y_te, num_classes


def load_data(cfg: DataConfig, seed: int) -> Dataset:
    """Load, subset, normalise and replicate the data set described by ``cfg``.

    Images are scaled to [0, 1] and standardised per channel with the training set's
    mean and std (a user's data set is taken as it is). Class subsets apply to train and test;
    the train subset and the replication are drawn with ``seed``.
    """
    num_classes = cfg.num_classes
    if cfg.user_data:
        x_tr, y_tr, x_te, y_te, num_classes = _user_data(cfg)
        num_classes = len(cfg.classes) if cfg.classes else num_classes
    elif cfg.name == "synthetic":
        x_tr, y_tr, x_te, y_te = _synthetic(cfg, seed)
    else:
        x_tr, y_tr, x_te, y_te = _load_torchvision(cfg)
        x_tr, x_te = x_tr.float() / 255.0, x_te.float() / 255.0
        mean = x_tr.mean(dim=(0, 2, 3), keepdim=True)
        std = x_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if cfg.classes:
        missing = set(cfg.classes) - set(y_tr.unique().tolist())
        if missing:
            raise DataError(
                f"data.classes = {cfg.classes} names labels {sorted(missing)} that data.name = "
                f"{cfg.name!r} does not have."
            )
        x_tr, y_tr = _select_classes(x_tr, y_tr, cfg.classes)
        x_te, y_te = _select_classes(x_te, y_te, cfg.classes)
    g = torch.Generator().manual_seed(seed)
    if cfg.train_size is not None:
        if cfg.train_size > x_tr.shape[0]:
            raise DataError(
                f"data.train_size = {cfg.train_size} is larger than the {x_tr.shape[0]} training "
                f"examples of data.name = {cfg.name!r}: use at most {x_tr.shape[0]} or null."
            )
        keep = torch.randperm(x_tr.shape[0], generator=g)[: cfg.train_size]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    n = x_tr.shape[0]
    if cfg.replication_control:
        idx = replicated_distinct(n, cfg.replication, g)
        paired = control_eval_indices(n, cfg.replication, cfg.eval_size, seed)
    else:
        idx, paired = replicate(n, cfg.replication, g), None
    return Dataset(
        x_tr[idx].contiguous(),
        y_tr[idx].contiguous(),
        x_te.contiguous(),
        y_te.contiguous(),
        num_classes,
        paired,
    )


def eval_indices(n: int, eval_size: int, seed: int) -> torch.Tensor:
    """The fixed sample of training indices on which train accuracy is measured."""
    if eval_size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))[:eval_size]


@dataclass(frozen=True)
class Cursor:
    """Where training is in the data: the epoch, the examples of its permutation already taken, and the
    examples consumed in all (passes = ``examples / n``). With B fixed, update s takes positions
    [(s % (n // B))·B, (s % (n // B) + 1)·B) of epoch s // (n // B) (``Cursor.at_step``)."""

    epoch: int = 0
    position: int = 0
    examples: int = 0

    @classmethod
    def at_step(cls, step: int, n: int, batch: int, sampling: str = "shuffle") -> Cursor:
        """The cursor after ``step`` updates at a fixed B, as ``GlobalBatchSampler.take`` leaves it (a
        checkpoint from before the cursor existed): an epoch's last update leaves its position at the end."""
        if sampling == "with_replacement" or step == 0:
            return cls(0, 0, step * batch)
        epoch, k = divmod(step - 1, n // batch)
        return cls(epoch, (k + 1) * batch, step * batch)


class GlobalBatchSampler:
    """Global batch indices as a pure function of the training state, sliced per worker.

    ``shuffle``: epoch e is a permutation seeded by (seed, e); an update of B examples takes the next B
    positions of it, and starts epoch e + 1 when fewer than B are left (the epoch's remainder is dropped:
    at a fixed B, n // B batches per epoch). The state is a ``Cursor`` (epoch, position, examples), so B may
    change between updates and each example is still taken at most once per epoch. ``with_replacement``:
    B indices drawn uniformly with replacement, seeded by (seed, step). Worker ``rank`` of P gets
    positions [rank·B/P, (rank+1)·B/P) of the global batch.

    ``global_batch(step)`` / ``worker_batch(step, ...)`` are the fixed-B view (``Cursor.at_step``): the
    same indices as ``take`` gives along a run at B = ``global_batch_size``.
    """

    def __init__(self, n: int, global_batch_size: int, sampling: str, seed: int):
        if global_batch_size > n:
            raise DataError(
                f"train.global_batch_size = {global_batch_size} is larger than the {n} training "
                "examples: lower it or use more data."
            )
        self.n, self.batch, self.sampling, self.seed = n, global_batch_size, sampling, seed
        self.steps_per_epoch = n // global_batch_size
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch or self._perm is None:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, cursor: Cursor, step: int, batch: int) -> tuple[torch.Tensor, Cursor]:
        """The global batch of ``batch`` examples for update ``step`` (0-based) at ``cursor``; the cursor after it."""
        if not 1 <= batch <= self.n:
            raise DataError(f"a global batch of {batch} examples does not fit the {self.n} training examples.")
        if self.sampling == "with_replacement":
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randint(self.n, (batch,), generator=g)
            return idx, Cursor(cursor.epoch, cursor.position, cursor.examples + batch)
        epoch, pos = cursor.epoch, cursor.position
        if pos + batch > self.n:  # the rest of this epoch does not hold the batch: drop it
            epoch, pos = epoch + 1, 0
        idx = self._permutation(epoch)[pos : pos + batch]
        return idx, Cursor(epoch, pos + batch, cursor.examples + batch)

    def global_batch(self, step: int) -> torch.Tensor:
        return self.take(Cursor.at_step(step, self.n, self.batch, self.sampling), step, self.batch)[0]

    def worker_batch(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        return worker_slice(self.global_batch(step), rank, world_size)


def worker_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Worker ``rank``'s B/P positions [rank·B/P, (rank+1)·B/P) of a global batch of B."""
    per_worker = global_batch.shape[0] // world_size
    return global_batch[rank * per_worker : (rank + 1) * per_worker]
