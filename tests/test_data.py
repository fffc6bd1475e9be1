"""The real torchvision loader on idx files the tests write; replication; sharding."""

from __future__ import annotations

import gzip
from collections import Counter

import pytest
import torch

from raygd.config import DataConfig
from raygd.data import DataError, GlobalBatchSampler, eval_indices, load_data, replicate
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
