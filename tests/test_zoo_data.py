"""The dataset loaders, on the real offline data (Debian's Fashion-MNIST, scikit-learn's digits)."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_tune.zoo import DATASETS, DataBundle, DatasetNotFoundError, load_dataset
from kfac_tune.zoo.data import DEBIAN_FASHION_MNIST, IDX_FILES, read_idx

needs_debian_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data as IDX (gzipped if the name ends in .gz), to rebuild real data in other layouts."""
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def _assert_same(a: DataBundle, b: DataBundle) -> None:
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.fixture(scope="module")
def fmnist() -> DataBundle:
    return load_dataset("fashion_mnist")


def test_registry_names() -> None:
    assert set(DATASETS) == {"fashion_mnist", "mnist", "cifar10", "digits", "synthetic", "pydoc_text"}
    assert all(spec.name == key and spec.description for key, spec in DATASETS.items())


@needs_debian_fmnist
def test_fashion_mnist_reads_the_debian_files(fmnist: DataBundle) -> None:
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.test_x.shape == (10000, 1, 28, 28)
    assert fmnist.train_x.dtype == torch.float32 and fmnist.train_y.dtype == torch.int64
    assert fmnist.train_x.is_contiguous()
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10
    assert fmnist.name == "fashion_mnist" and fmnist.source == str(DEBIAN_FASHION_MNIST)
    assert fmnist.train_y.bincount().tolist() == [6000] * 10
    assert fmnist.test_y.bincount().tolist() == [1000] * 10
    for x in (fmnist.train_x, fmnist.test_x):
        assert x.min() == 0.0 and x.max() == 1.0
    # pixels are k/255 exactly
    assert torch.equal(fmnist.train_x[:100] * 255, (fmnist.train_x[:100] * 255).round())


@needs_debian_fmnist
def test_subsets_are_the_first_examples(fmnist: DataBundle) -> None:
    bundle = load_dataset("fashion_mnist", train_size=500, test_size=200)
    assert torch.equal(bundle.train_x, fmnist.train_x[:500]) and torch.equal(bundle.train_y, fmnist.train_y[:500])
    assert torch.equal(bundle.test_x, fmnist.test_x[:200]) and torch.equal(bundle.test_y, fmnist.test_y[:200])


@needs_debian_fmnist
def test_test_from_train_gives_disjoint_consecutive_slices(fmnist: DataBundle) -> None:
    """Bulatov's protocol: train images 0-9,999 train, 10,000-19,999 test."""
    bundle = load_dataset("fashion_mnist", train_size=10000, test_size=10000, test_from_train=True)
    assert torch.equal(bundle.train_x, fmnist.train_x[:10000])
    assert torch.equal(bundle.test_x, fmnist.train_x[10000:20000])
    assert torch.equal(bundle.test_y, fmnist.train_y[10000:20000])
    rest = load_dataset("fashion_mnist", train_size=59000, test_from_train=True)
    assert torch.equal(rest.test_x, fmnist.train_x[59000:])


@needs_debian_fmnist
@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_fashion_mnist_from_a_root(fmnist: DataBundle, tmp_path: Path, layout: str) -> None:
    """A root holding the .gz files, or torchvision's decompressed <root>/FashionMNIST/raw/ layout."""
    folder, suffix = (tmp_path, ".gz") if layout == "flat-gz" else (tmp_path / "FashionMNIST" / "raw", "")
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        _as_uint8(fmnist.train_x[:300, 0]),
        fmnist.train_y[:300].numpy(),
        _as_uint8(fmnist.test_x[:100, 0]),
        fmnist.test_y[:100].numpy(),
    )
    for stem, array in zip(IDX_FILES, arrays):
        _write_idx(folder / f"{stem}{suffix}", array)
    bundle = load_dataset("fashion_mnist", root=str(tmp_path))
    assert bundle.source == str(folder)
    _assert_same(bundle, load_dataset("fashion_mnist", train_size=300, test_size=100))


@needs_debian_fmnist
def test_read_idx_rejects_wrong_magic() -> None:
    with pytest.raises(ValueError, match=r"not an IDX file of unsigned bytes with 3 dimensions"):
        read_idx(DEBIAN_FASHION_MNIST / "train-labels-idx1-ubyte.gz", ndim=3)


def test_fashion_mnist_missing_root_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("fashion_mnist", root=tmp_path)
    assert isinstance(excinfo.value, FileNotFoundError)
    message = str(excinfo.value)
    for fragment in (str(tmp_path), "apt-get install dataset-fashion-mnist", "`root:`", "`download: true`"):
        assert fragment in message, message


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_mnist_and_cifar_say_how_to_get_them(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset(name, root=tmp_path)
    message = str(excinfo.value)
    for fragment in (str(tmp_path), "`root:`", "`download: true`"):
        assert fragment in message, message
    assert "apt-get" not in message


def test_digits_is_deterministic_by_seed() -> None:
    first, again, other = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    _assert_same(first, again)
    assert not torch.equal(first.train_x, other.train_x)
    assert first.train_x.shape == (1438, 1, 8, 8) and first.test_x.shape == (359, 1, 8, 8)
    assert first.input_shape == (1, 8, 8) and first.num_classes == 10
    assert first.train_x.min() == 0.0 and first.train_x.max() == 1.0
    # the split is a partition of the 1,797 images: the same multiset of pixel sums either way
    sums = [sorted(torch.cat([b.train_x, b.test_x]).sum((1, 2, 3)).tolist()) for b in (first, other)]
    assert sums[0] == sums[1]
    small = load_dataset("digits", seed=0, train_size=100, test_size=50)
    assert torch.equal(small.train_x, first.train_x[:100]) and torch.equal(small.test_y, first.test_y[:50])


def test_synthetic_is_deterministic_by_seed() -> None:
    first, again, other = (load_dataset("synthetic", seed=s, num_classes=3) for s in (7, 7, 8))
    _assert_same(first, again)
    assert not torch.equal(first.train_x, other.train_x)
    assert first.train_x.shape == (1000, 20) and first.test_x.shape == (200, 20)
    assert first.input_shape == (20,) and first.num_classes == 3
    assert set(first.train_y.unique().tolist()) == {0, 1, 2}
    assert 0.0 < first.train_x.min() and first.train_x.max() < 1.0


def test_synthetic_shapes_and_sizes() -> None:
    images = load_dataset("synthetic", shape=[1, 8, 8], train_size=64, test_size=32)
    assert images.train_x.shape == (64, 1, 8, 8) and images.test_x.shape == (32, 1, 8, 8)
    assert images.train_x.dtype == torch.float32 and images.train_y.dtype == torch.int64
    flat = load_dataset("synthetic", n_features=5, train_size=10, test_size=4, test_from_train=True)
    assert flat.train_x.shape == (10, 5) and flat.test_x.shape == (4, 5)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"name": "imagenet"}, ["unknown dataset 'imagenet'", "fashion_mnist"]),
        ({"name": "synthetic", "n_feature": 3}, ["'synthetic'", "'n_feature'", "n_features, num_classes, shape"]),
        ({"name": "digits", "test_from_train": True}, ["'digits'", "'train_size'", "test_from_train"]),
        ({"name": "digits", "train_size": 5000}, ["'digits'", "'train_size'", "at most 1438"]),
        ({"name": "digits", "train_size": 1400, "test_size": 100, "test_from_train": True}, ["'test_size'", "38"]),
        ({"name": "digits", "train_size": 0}, ["'train_size'", "positive integer"]),
        ({"name": "synthetic", "shape": [1, 8, 8], "n_features": 64}, ["'shape'", "n_features"]),
    ],
)
def test_bad_arguments_are_clear(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        load_dataset(**kwargs)
    for fragment in fragments:
        assert fragment in str(excinfo.value), str(excinfo.value)
