"""The real torchvision loader on idx files the tests write; replication; sharding."""

from __future__ import annotations

import gzip
from collections import Counter

import pytest
import torch

from raygd.config import ConfigError, DataConfig
from raygd.data import (
    DataError,
    GlobalBatchSampler,
    control_eval_indices,
    eval_indices,
    load_data,
    replicate,
    replicated_distinct,
)
from tests.idx import make_images, write_idx_dataset


def test_loads_gzipped_idx_files_through_torchvision(idx_dir):
    data = load_data(DataConfig(data_dir=str(idx_dir)), seed=0)
    images, labels = make_images(600, 0)
    assert data.x_train.shape == (600, 1, 28, 28) and data.x_test.shape == (200, 1, 28, 28)
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert torch.equal(data.y_train, torch.as_tensor(labels, dtype=torch.long))
    raw = torch.as_tensor(images, dtype=torch.float32) / 255
    standardised = (raw - raw.mean()) / raw.std()
    assert torch.allclose(data.x_train[:, 0], standardised, atol=1e-5)


def test_plain_and_gzipped_files_give_the_same_tensors(tmp_path, idx_dir):
    plain = write_idx_dataset(tmp_path / "plain", n_train=600, n_test=200, gz=False)
    a = load_data(DataConfig(data_dir=str(plain)), seed=0)
    b = load_data(DataConfig(data_dir=str(idx_dir)), seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_data_dir_from_environment(monkeypatch, idx_dir):
    monkeypatch.setenv("RAYGD_DATA_DIR", str(idx_dir))
    assert load_data(DataConfig(), seed=0).n == 600


def test_class_subset_relabels_and_train_size_subsets(idx_dir):
    full = load_data(DataConfig(data_dir=str(idx_dir)), seed=0)
    data = load_data(DataConfig(data_dir=str(idx_dir), classes=[7, 2], train_size=50), seed=3)
    assert data.num_classes == 2 and data.n == 50
    assert set(data.y_train.tolist()) <= {0, 1}
    expected_test = full.y_test[(full.y_test == 7) | (full.y_test == 2)]
    assert torch.equal(data.y_test, (expected_test == 2).long())


@pytest.mark.parametrize("n, r", [(100, 1), (100, 2), (100, 4), (99, 4), (12, 12)])
def test_replication_keeps_n_and_repeats_a_random_fraction(n, r):
    idx = replicate(n, r, torch.Generator().manual_seed(1))
    assert idx.shape == (n,)
    counts = Counter(idx.tolist())
    distinct = -(-n // r)
    assert len(counts) == distinct
    assert max(counts.values()) == r and sum(c == r for c in counts.values()) >= distinct - 1


def test_replication_lowers_distinct_examples_in_loaded_data(idx_dir):
    data = load_data(DataConfig(data_dir=str(idx_dir), replication=4), seed=0)
    assert data.n == 600
    assert torch.unique(data.x_train.flatten(1), dim=0).shape[0] == 150


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return [tuple(row.tolist()) for row in x.flatten(1)]


@pytest.mark.parametrize("r, seed", [(2, 0), (4, 3), (7, 1), (600, 2)])
def test_replication_control_holds_exactly_the_replicated_sets_distinct_examples(idx_dir, r, seed):
    # Brute force over indices: every example of the replicated set is one of the control's, and each
    # control example appears in the replicated set as often as replicate() repeats it (r, or r - 1 at
    # the end when r does not divide n); the control holds each once.
    rep = load_data(DataConfig(data_dir=str(idx_dir), replication=r, eval_size=100), seed=seed)
    ctl = load_data(DataConfig(data_dir=str(idx_dir), replication=r, replication_control=True, eval_size=100), seed)
    n, m = rep.n, -(-rep.n // r)
    assert ctl.n == m and rep.paired_eval_index is None
    rep_rows, ctl_rows = _rows(rep.x_train), _rows(ctl.x_train)
    assert len(set(ctl_rows)) == m  # each distinct example once
    for j in range(m):
        hits = [i for i in range(n) if rep_rows[i] == ctl_rows[j]]
        assert len(hits) == len(range(j, n, m)) >= max(r - 1, 1)
        assert all(int(rep.y_train[i]) == int(ctl.y_train[j]) for i in hits)
    assert sum(len(range(j, n, m)) for j in range(m)) == n  # so no replicated example is outside the control
    assert torch.equal(ctl.x_test, rep.x_test) and torch.equal(ctl.y_test, rep.y_test)
    # the same evaluation sample: the replicated arm's, in the control's indices
    ev = eval_indices(n, 100, seed)
    assert ctl.paired_eval_index is not None
    assert torch.equal(ctl.x_train[ctl.paired_eval_index], rep.x_train[ev])
    assert torch.equal(ctl.y_train[ctl.paired_eval_index], rep.y_train[ev])


@pytest.mark.parametrize("n, r", [(100, 2), (99, 4), (12, 12), (5, 1)])
def test_replicated_distinct_is_what_replicate_repeats(n, r):
    idx = replicate(n, r, torch.Generator().manual_seed(4))
    distinct = replicated_distinct(n, r, torch.Generator().manual_seed(4))
    m = -(-n // r)
    assert distinct.shape == (m,) and len(set(distinct.tolist())) == m
    assert all(int(idx[i]) == int(distinct[i % m]) for i in range(n))
    assert torch.equal(control_eval_indices(n, r, 30, 9), eval_indices(n, 30, 9) % m)


def test_replication_control_is_validated():
    with pytest.raises(ConfigError, match=r"data.replication_control = True.*data.replication >= 2"):
        DataConfig(replication_control=True)
    with pytest.raises(ConfigError, match=r"data.replication_control = 'yes'.*true or false"):
        DataConfig(replication=2, replication_control="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("r", [2, 4, 8])
def test_with_replacement_control_draws_the_replicated_runs_examples(r):
    # Sampling with replacement, n and n/r powers of two: at every step the control's batch is the
    # replicated run's batch, example for example (replicated index i is distinct example i mod n/r, and
    # torch.randint(n) mod n/r = torch.randint(n/r) for the same generator). The Figure 3a control at
    # equal updates is then the replicated run itself; at other sizes it is the same only in distribution.
    cfg = DataConfig(name="synthetic", synthetic_size=1024, classes=[0, 1], replication=r, sampling="with_replacement")
    rep, ctl = load_data(cfg, seed=3), load_data(DataConfig(**{**cfg.__dict__, "replication_control": True}), seed=3)
    a = GlobalBatchSampler(rep.n, 16, "with_replacement", seed=3)
    b = GlobalBatchSampler(ctl.n, 16, "with_replacement", seed=3)
    for step in range(50):
        assert torch.equal(rep.x_train[a.global_batch(step)], ctl.x_train[b.global_batch(step)])


@pytest.mark.parametrize("sampling", ["shuffle", "with_replacement"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_worker_batches_partition_the_global_batch(sampling, world_size):
    sampler = GlobalBatchSampler(n=100, global_batch_size=16, sampling=sampling, seed=5)
    for step in (0, 5, 6, 13):
        parts = [sampler.worker_batch(step, rank, world_size) for rank in range(world_size)]
        assert torch.equal(torch.cat(parts), sampler.global_batch(step))
        fresh = GlobalBatchSampler(n=100, global_batch_size=16, sampling=sampling, seed=5)
        assert torch.equal(fresh.global_batch(step), sampler.global_batch(step))


def test_shuffle_visits_each_example_at_most_once_per_epoch():
    sampler = GlobalBatchSampler(n=100, global_batch_size=16, sampling="shuffle", seed=0)
    epoch0 = torch.cat([sampler.global_batch(s) for s in range(6)])
    epoch1 = torch.cat([sampler.global_batch(s) for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 96 and len(set(epoch1.tolist())) == 96
    assert not torch.equal(epoch0, epoch1)


def test_with_replacement_draws_repeats():
    sampler = GlobalBatchSampler(n=10, global_batch_size=10, sampling="with_replacement", seed=0)
    assert any(len(set(sampler.global_batch(s).tolist())) < 10 for s in range(5))


def test_eval_indices_are_fixed_and_bounded():
    assert torch.equal(eval_indices(50, 10, 1), eval_indices(50, 10, 1))
    assert eval_indices(50, 100, 1).shape == (50,)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data.data_dir.*apt-get install dataset-fashion-mnist"):
        load_data(DataConfig(data_dir=str(tmp_path / "nowhere")), seed=0)


def test_missing_file_is_named(tmp_path, idx_dir):
    folder = write_idx_dataset(tmp_path / "partial", n_train=20, n_test=10)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data(DataConfig(data_dir=str(folder)), seed=0)


def test_corrupt_gzip_is_named(tmp_path):
    folder = write_idx_dataset(tmp_path / "corrupt", n_train=20, n_test=10)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz"):
        load_data(DataConfig(data_dir=str(folder)), seed=0)


def test_wrong_shapes_are_reported(tmp_path):
    folder = write_idx_dataset(tmp_path / "mismatch", n_train=20, n_test=10)
    _, labels = make_images(5, 0)
    from tests.idx import idx_bytes

    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(labels))
    with pytest.raises(DataError, match="20 images but 5 labels"):
        load_data(DataConfig(data_dir=str(folder)), seed=0)


def test_train_size_larger_than_data_is_rejected(idx_dir):
    with pytest.raises(DataError, match=r"data.train_size"):
        load_data(DataConfig(data_dir=str(idx_dir), train_size=10_000), seed=0)


def test_batch_larger_than_data_is_rejected():
    with pytest.raises(DataError, match=r"train.global_batch_size"):
        GlobalBatchSampler(n=10, global_batch_size=16, sampling="shuffle", seed=0)


def test_synthetic_data_is_seeded():
    a = load_data(DataConfig(name="synthetic", synthetic_size=64, classes=[0, 1]), seed=1)
    b = load_data(DataConfig(name="synthetic", synthetic_size=64, classes=[0, 1]), seed=1)
    assert torch.equal(a.x_train, b.x_train) and a.input_shape == (32,)
    assert set(a.y_train.tolist()) <= {0, 1}
