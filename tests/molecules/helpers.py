"""Shared by the molecule tests: load a QM9 slice or skip (fail under DFLOW_FAST_REQUIRE_DATA=1,
as tests/test_data_models.py), random rotations, padded random molecules."""
from __future__ import annotations

import os

import pytest
import torch

from dflow_fast.data import DatasetNotFoundError, qm9


def _skip_or_fail(e: Exception):
    if os.environ.get("DFLOW_FAST_REQUIRE_DATA") == "1":
        raise e
    pytest.skip(f"not installed: {e}")


def qm9_or_skip(split: str, limit: int, **kwargs):
    try:
        return qm9(split, limit=limit, **kwargs)
    except (ImportError, DatasetNotFoundError) as e:
        _skip_or_fail(e)


def rdkit_or_skip():
    try:
        import rdkit  # noqa: F401
    except ImportError as e:
        _skip_or_fail(e)


def random_rotation(g: torch.Generator, dtype=torch.float64, reflect: bool = False):
    """A random 3x3 orthogonal matrix (det +1, or -1 with ``reflect``)."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q = q * torch.tensor([1.0, 1.0, -1.0], dtype=dtype)
    return q


def padded_batch(g: torch.Generator, n_atoms=(5, 9, 3), M: int = 11, n_types: int = 5,
                 dtype=torch.float64):
    """Random molecules: mask [B, M] (real atoms first), positions [B, M, 3] (zero CoM over the
    real atoms), features [B, M, n_types]; padded slots hold garbage on purpose."""
    B = len(n_atoms)
    mask = torch.arange(M)[None] < torch.tensor(n_atoms)[:, None]
    pos = 1.5 * torch.randn(B, M, 3, generator=g, dtype=dtype)
    m = mask[..., None].to(dtype)
    com = (pos * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    pos = torch.where(mask[..., None], pos - com, pos)
    feats = torch.randn(B, M, n_types, generator=g, dtype=dtype)
    return mask, pos, feats
