"""Built-in datasets, loaded whole into memory as float32 tensors.

The training loop moves entire tensors to the device once, so a loader returns a ``DataBundle`` of four tensors:
images scaled to [0, 1] with shape ``(N, C, H, W)`` (``(N, F)`` for flat synthetic data) and int64 labels.

Offline first: Fashion-MNIST is read straight from Debian's ``dataset-fashion-mnist`` files (gzipped IDX) with
numpy in well under a second; digits ships with scikit-learn; synthetic data is generated; the character-level
text corpus is the Python reference documentation that ships inside every Python (``pydoc_data``). MNIST and CIFAR-10 need
files the user provides (``root``) or a download (``download=True``, the only path that imports torchvision).

Subsets are deterministic and always the *first* ``train_size`` / ``test_size`` examples of each split in the
dataset's own order, so they match published protocols (e.g. "train images 0-9,999"). ``seed`` only matters
where this module shuffles or generates: the digits train/test split and the synthetic data.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfac_tune.zoo._args import BadArgument, bad_value, check_kwargs, positive_int, positive_ints

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not where we looked; the message says how to get them."""


@dataclass(frozen=True)
class DataBundle:
    """A dataset in memory: float32 inputs in [0, 1] and int64 labels, train and test splits, and optionally a
    validation split (``val_x``/``val_y``: what a search selects hyperparameters on, see :func:`hold_out`)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    name: str
    source: str
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def train_examples(self) -> int:
        return len(self.train_x)

    @property
    def has_validation(self) -> bool:
        return self.val_x is not None


def hold_out(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """``bundle`` with ``fraction`` of its training examples moved to a validation split.

    Why: hyperparameters chosen on the test split make the test value an optimistic estimate; selecting on a
    split held out of the training data keeps the test split for one honest measurement at the end. The examples
    are drawn by a permutation seeded by ``seed`` (not stratified; at least one example on each side), and the
    remaining training examples keep their order. A bundle that already has a validation split, or
    ``fraction == 0``, is returned unchanged.
    """
    if bundle.val_x is not None or fraction <= 0:
        return bundle
    keep, val_index = validation_indices(len(bundle.train_x), fraction, seed)
    return dataclasses.replace(bundle, train_x=bundle.train_x[keep], train_y=bundle.train_y[keep],
                               val_x=bundle.train_x[val_index], val_y=bundle.train_y[val_index])


def validation_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (training, validation) example indices of :func:`hold_out`, both in ascending order; shared with
    Dataset data so that both forms of the same examples are split alike."""
    n_val = min(max(round(fraction * n), 1), n - 1)
    if n_val < 1:
        raise ValueError(f"cannot hold out a validation split from {n} training example(s)")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val]
    keep = torch.ones(n, dtype=torch.bool)
    keep[chosen] = False
    return keep.nonzero().squeeze(1), chosen.sort().values


@dataclass(frozen=True)
class _Request:
    """What the caller asked for; generated datasets size themselves from it."""

    root: Path | None
    download: bool
    seed: int
    train_size: int | None
    test_size: int | None
    test_from_train: bool


@dataclass(frozen=True)
class _Splits:
    """A loader's full splits as numpy arrays, before subsetting and scaling (``x / scale`` lies in [0, 1])."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    scale: float
    num_classes: int
    source: str


# the arguments of load_dataset that every dataset takes (named in error messages beside its own)
_COMMON_ARGUMENTS = ("root", "train_size", "test_size", "test_from_train", "download", "seed")


def load(spec: Any, *, root: str | os.PathLike[str] | None = None, train_size: int | None = None,
         test_size: int | None = None, test_from_train: bool = False, download: bool = False, seed: int = 0,
         **kwargs: Any) -> DataBundle:
    """Load the data set of ``spec`` (a ``zoo.specs.DatasetSpec``: ``zoo.load_dataset`` looks the name up, so
    this module, whose loaders the registry names, never reads the registry) as tensors.

    ``train_size`` / ``test_size`` keep the first N examples of each split (all by default). With
    ``test_from_train`` the test split is cut from the training images right after the training subset (train =
    ``[0, train_size)``, test = ``[train_size, train_size + test_size)``, by default the rest), as in Bulatov's
    autoencoder benchmark; ``train_size`` is then required. ``root`` and ``download`` apply to file-backed
    datasets. Raises ``DatasetNotFoundError`` when files are missing and ``ValueError`` for bad arguments.
    """
    name = spec.name
    accepted = [*_COMMON_ARGUMENTS, *spec.arguments()]
    check_kwargs("dataset", name, accepted, kwargs)
    try:
        request = _Request(root=None if root is None else Path(root).expanduser(), download=bool(download),
                           seed=int(seed),
                           train_size=None if train_size is None else positive_int("train_size", train_size),
                           test_size=None if test_size is None else positive_int("test_size", test_size),
                           test_from_train=bool(test_from_train))
        splits = spec.loader(request, **kwargs)
        train, test = _subset(splits, request)
    except BadArgument as error:
        raise bad_value("dataset", name, error, accepted) from None
    train_x = _to_float(splits.train_x[train], splits.scale)
    test_x, test_y = (splits.train_x, splits.train_y) if request.test_from_train else (splits.test_x, splits.test_y)
    return DataBundle(train_x=train_x, train_y=torch.from_numpy(splits.train_y[train].astype(np.int64)),
                      test_x=_to_float(test_x[test], splits.scale),
                      test_y=torch.from_numpy(test_y[test].astype(np.int64)), input_shape=tuple(train_x.shape[1:]),
                      num_classes=splits.num_classes, name=name, source=splits.source)


def _subset(splits: _Splits, request: _Request) -> tuple[slice, slice]:
    """Index ranges of the train and test subsets (the test range indexes the train split if test_from_train)."""
    n_train, n_test = len(splits.train_x), len(splits.test_x)
    train_size, test_size = request.train_size, request.test_size
    if request.test_from_train:
        if train_size is None:
            raise BadArgument("train_size", "set when test_from_train is true", None)
        if train_size >= n_train:
            raise BadArgument("train_size", f"below {n_train} (the training split) with test_from_train", train_size)
        end = n_train if test_size is None else train_size + test_size
        if end > n_train:
            left = n_train - train_size
            raise BadArgument("test_size", f"at most {left} (training images after train_size)", test_size)
        return slice(0, train_size), slice(train_size, end)
    for argument, size, available in (("train_size", train_size, n_train), ("test_size", test_size, n_test)):
        if size is not None and size > available:
            raise BadArgument(argument, f"at most {available}", size)
    return slice(0, train_size), slice(0, test_size)


def _to_float(x: np.ndarray, scale: float) -> torch.Tensor:
    """One pass from the stored dtype (and layout) to contiguous float32, then scale in place."""
    out = np.ascontiguousarray(x, dtype=np.float32)
    if scale != 1.0:
        out /= np.float32(scale)
    return torch.from_numpy(out)


def _cache_root() -> Path:
    """Where ``download=True`` puts files when no ``root`` is given."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kfac-tune" / "datasets"


# ------------------------------------------------------------------------------------------ IDX files
def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped if it ends in .gz) with ``ndim`` dimensions.

    Header: two zero bytes, type byte 0x08 (uint8), byte 3 = number of dimensions, then one big-endian uint32
    size per dimension; the data follows.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes((0, 0, 0x08, ndim)):
        raise ValueError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _find_idx_files(directories: Sequence[Path]) -> list[Path] | None:
    """The four IDX files (plain or .gz) from the first directory that has all of them."""
    for directory in directories:
        found = []
        for stem in IDX_FILES:
            candidates = [directory / stem, directory / f"{stem}.gz"]
            found += [c for c in candidates if c.is_file()][:1]
        if len(found) == len(IDX_FILES):
            return found
    return None


def _load_idx_dataset(request: _Request, *, title: str, torchvision_name: str, system_dirs: Sequence[Path] = (),
                      how_to: Sequence[str] = ()) -> _Splits:
    """Shared by MNIST and Fashion-MNIST: same file names, same format, same torchvision layout.

    Without a ``root``, ``system_dirs`` (where an OS package installs the files) are searched before the download
    cache. ``how_to`` lists dataset-specific ways to get the files, put first in the not-found message.
    """

    def directories(root: Path) -> list[Path]:
        return [root, root / torchvision_name / "raw"]

    searched = directories(request.root) if request.root is not None else [*system_dirs, *directories(_cache_root())]
    files = _find_idx_files(searched)
    if files is None and request.download:
        import torchvision  # slow import (5-8 s): only when asked to download

        target = request.root or _cache_root()
        getattr(torchvision.datasets, torchvision_name)(str(target), train=True, download=True)
        files = _find_idx_files(directories(target))
    if files is None:
        options = [*how_to,
                   f"set `root:` to a directory holding {', '.join(f + '.gz' for f in IDX_FILES)} (gzipped or not, "
                   f"directly or in torchvision's <root>/{torchvision_name}/raw/ layout)",
                   "set `download: true` on a machine with internet"]
        raise DatasetNotFoundError(
            f"{title} not found (looked in: {', '.join(str(d) for d in searched)}). To get it: {'; or '.join(options)}."
        )
    train_x, train_y, test_x, test_y = (read_idx(path, ndim) for path, ndim in zip(files, (3, 1, 3, 1)))
    return _Splits(train_x=train_x[:, None], train_y=train_y, test_x=test_x[:, None], test_y=test_y, scale=255.0,
                   num_classes=10, source=str(files[0].parent))


def _load_fashion_mnist(request: _Request) -> _Splits:
    return _load_idx_dataset(
        request, title="Fashion-MNIST", torchvision_name="FashionMNIST", system_dirs=[DEBIAN_FASHION_MNIST],
        how_to=[f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu, offline; installs {DEBIAN_FASHION_MNIST})"])


def _load_mnist(request: _Request) -> _Splits:
    return _load_idx_dataset(request, title="MNIST", torchvision_name="MNIST")


# ------------------------------------------------------------------------------------------- CIFAR-10
def _load_cifar10(request: _Request) -> _Splits:
    root = request.root or _cache_root()
    folder = root / "cifar-10-batches-py"
    missing = DatasetNotFoundError(
        f"CIFAR-10 not found (looked for {folder}). To get it: set `root:` to a directory holding torchvision's "
        "cifar-10-batches-py/ folder (the extracted cifar-10-python.tar.gz), "
        "or set `download: true` on a machine with internet.")
    if not folder.is_dir() and not request.download:
        raise missing  # decided without importing torchvision
    import torchvision  # slow import: only when the files exist or a download was asked for

    try:
        train, test = (
            torchvision.datasets.CIFAR10(str(root), train=split, download=request.download) for split in (True, False)
        )
    except RuntimeError as error:  # torchvision's "not found or corrupted"
        raise missing from error
    # NHWC -> NCHW views, made contiguous on conversion
    return _Splits(train_x=train.data.transpose(0, 3, 1, 2), train_y=np.asarray(train.targets),
                   test_x=test.data.transpose(0, 3, 1, 2), test_y=np.asarray(test.targets), scale=255.0,
                   num_classes=10, source=str(folder))


# ------------------------------------------------------------------------------- digits and synthetic
DIGITS_TEST_FRACTION = 0.2


def _load_digits(request: _Request) -> _Splits:
    """scikit-learn's 1,797 8x8 digits (pixel values 0-16), split 80/20 by a permutation drawn from ``seed``."""
    from sklearn.datasets import load_digits  # ~1 s import, only for this dataset

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(request.seed).permutation(len(y))
    n_test = round(DIGITS_TEST_FRACTION * len(y))
    train, test = order[:-n_test], order[-n_test:]
    images = x.reshape(-1, 1, 8, 8)
    return _Splits(train_x=images[train], train_y=y[train], test_x=images[test], test_y=y[test], scale=16.0,
                   num_classes=10, source="sklearn.datasets.load_digits")


SYNTHETIC_TRAIN_SIZE = 1000
SYNTHETIC_TEST_SIZE = 200


def _load_synthetic(request: _Request, *, n_features: int | None = None, num_classes: int = 4,
                    shape: Sequence[int] | None = None) -> _Splits:
    """Gaussian class clusters squashed into (0, 1) by a sigmoid, so every model and loss in the zoo accepts them.

    Inputs have ``shape`` (e.g. ``[1, 8, 8]``) or ``n_features`` (flat; 20 if neither is given). The split sizes
    are generated to order: ``train_size`` (default 1000, plus the test part when ``test_from_train``) and
    ``test_size`` (default 200). Everything is drawn from one generator seeded by ``seed``.
    """
    if n_features is not None and shape is not None:
        raise BadArgument("shape", "left unset when n_features is given (set one of them)", shape)
    if shape is not None:
        input_shape = positive_ints("shape", shape)
    else:
        input_shape = (positive_int("n_features", 20 if n_features is None else n_features),)
    num_classes = positive_int("num_classes", num_classes)
    n_test = request.test_size or SYNTHETIC_TEST_SIZE
    n_train = (request.train_size or SYNTHETIC_TRAIN_SIZE) + (n_test if request.test_from_train else 0)
    rng = np.random.default_rng(request.seed)
    means = rng.standard_normal((num_classes, math.prod(input_shape)))

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(num_classes, size=n)
        logits = means[y] + rng.standard_normal((n, means.shape[1]))
        return (1.0 / (1.0 + np.exp(-logits))).reshape(n, *input_shape), y

    return _Splits(*sample(n_train), *sample(n_test), scale=1.0, num_classes=num_classes,
                   source=f"synthetic(seed={request.seed}, shape={list(input_shape)}, num_classes={num_classes})")


# ------------------------------------------------------------------------------------------- text corpus
def _load_pydoc_text(request: _Request, *, seq_len: int = 64, test_fraction: float = 0.1) -> _Splits:
    """A character-level language-modelling corpus: the text of Python's ``pydoc_data.topics`` (the language
    reference and library topics behind ``help()``, ~0.7 M characters of English prose and code).

    Why this corpus: it is installed with Python itself (Debian's ``libpython3.x-stdlib``), so it is there offline,
    on every machine and in CI, with no download and no extra package; Penn TreeBank, WikiText and NLTK's corpora
    all need a download.  Examples are consecutive non-overlapping windows: ``x`` is ``seq_len`` character ids
    (as float32, like every input here; the model casts them back), ``y`` the same window shifted by one
    character.  The split is by position: the last ``test_fraction`` of the text is the test set, so no test
    window overlaps a training one.  The vocabulary is the sorted set of characters of the whole text.
    """
    import sys

    from pydoc_data.topics import topics

    seq_len = positive_int("seq_len", seq_len)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise BadArgument("test_fraction", "a number in (0, 1)", test_fraction)
    text = "\n\n".join(topics[key] for key in sorted(topics))
    vocab = sorted(set(text))
    ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lookup = {ord(c): i for i, c in enumerate(vocab)}
    codes = np.array([lookup[int(c)] for c in ids], dtype=np.int64)
    cut = int(len(codes) * (1 - test_fraction))

    def windows(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = (len(part) - 1) // seq_len
        x = part[: n * seq_len].reshape(n, seq_len)
        y = part[1 : n * seq_len + 1].reshape(n, seq_len)
        return x, y

    return _Splits(*windows(codes[:cut]), *windows(codes[cut:]), scale=1.0, num_classes=len(vocab),
                   source=f"pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor}), "
                          f"{len(text)} characters, vocabulary {len(vocab)}")
