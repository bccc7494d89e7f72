"""Real data sets that install offline, as tensors ready for the models.

- Images (:mod:`.images`): :func:`fashion_mnist`, :func:`mnist_5k`, :func:`digits` return
  ``(images [N, 1, H, W] in [-1, 1], labels [N])``.
- Molecules (:mod:`.qm9`): :func:`qm9` returns :class:`Molecules`, QM9 as padded tensors
  (positions [N, M, 3] in Angstrom, one-hot H C N O F [N, M, 5], node mask [N, M], properties),
  with a fixed seeded split into train / valid / test and the two disjoint halves of train.

Nothing is read at import time, and no optional dependency is imported. ``dflow_fast.data.qm9``
is the loader function; its module's other names import as ``from dflow_fast.data.qm9 import ...``.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import images
from .images import (
    FASHION_MNIST_CLASSES, DatasetNotFoundError, digits, mnist_5k,
)
from .qm9 import QM9_ATOMS, QM9_SPLIT_SIZES, Molecules, qm9, qm9_split_indices

__all__ = ["DatasetNotFoundError", "fashion_mnist", "mnist_5k", "digits", "qm9", "Molecules",
           "qm9_split_indices", "QM9_ATOMS", "QM9_SPLIT_SIZES", "FASHION_MNIST_CLASSES",
           "FASHION_MNIST_DIR"]

#: Where the Debian package ``dataset-fashion-mnist`` puts its files (read at call time, so a
#: test may patch it here).
FASHION_MNIST_DIR = images.FASHION_MNIST_DIR


def fashion_mnist(split: str = "train", limit: int | None = None):
    """Fashion-MNIST, 28x28: ``(images [N, 1, 28, 28] in [-1, 1], labels [N])``; see
    :func:`dflow_fast.data.images.fashion_mnist`. The folder is ``$DFLOW_FAST_FASHION_MNIST_DIR``,
    else this package's ``FASHION_MNIST_DIR``."""
    env = os.environ.get("DFLOW_FAST_FASHION_MNIST_DIR")
    return images.fashion_mnist(split, limit, root=Path(env) if env else Path(FASHION_MNIST_DIR))
