"""dflow_fast.data.qm9: shapes, masks, the fixed split and its disjoint halves, errors (a QM9
slice parsed from qm9pack's CSVs without the cache: about a second)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from dflow_fast import data
from dflow_fast.data import QM9_ATOMS, QM9_SPLIT_SIZES, qm9_split_indices
from dflow_fast.data.qm9 import QM9_N_MOLECULES

from .helpers import qm9_or_skip


def test_split_sizes_disjoint_and_halves():
    parts = {s: qm9_split_indices(s) for s in ("train", "valid", "test", "train_a", "train_b")}
    assert {s: len(parts[s]) for s in QM9_SPLIT_SIZES} == QM9_SPLIT_SIZES
    assert sum(QM9_SPLIT_SIZES.values()) == QM9_N_MOLECULES
    allrows = np.concatenate([parts["train"], parts["valid"], parts["test"]])
    assert len(np.unique(allrows)) == QM9_N_MOLECULES  # a partition of every molecule
    a, b = parts["train_a"], parts["train_b"]
    assert len(a) == len(b) == QM9_SPLIT_SIZES["train"] // 2
    assert len(np.intersect1d(a, b)) == 0
    assert np.array_equal(np.sort(np.concatenate([a, b])), np.sort(parts["train"]))
    # fixed: the same rows every call, and not file order (a random, representative split)
    assert np.array_equal(qm9_split_indices("test"), parts["test"])
    assert not np.array_equal(np.sort(parts["test"][:100]), parts["test"][:100])


def test_shapes_masks_and_centering():
    m = qm9_or_skip("train_a", 64, cache=False)
    N, M = 64, 29
    assert m.positions.shape == (N, M, 3) and m.positions.dtype == torch.float32
    assert m.one_hot.shape == (N, M, len(QM9_ATOMS)) and m.mask.shape == (N, M)
    assert m.mask.dtype == torch.bool and len(m) == N and m.index.shape == (N,)
    n = m.n_atoms
    assert (m.mask == (torch.arange(M)[None] < n[:, None])).all()  # real atoms first
    assert (m.one_hot.sum(-1) == m.mask.float()).all()  # one type per real atom, none on pads
    assert (m.positions[~m.mask] == 0).all()
    com = (m.positions * m.mask[..., None]).sum(1) / n[:, None]
    assert com.abs().max() < 1e-4
    assert ((n >= 3) & (n <= 29)).all()
    alpha = m.properties["alpha"]
    assert alpha.shape == (N,) and (alpha > 5).all() and (alpha < 200).all()
    assert set(m.properties) >= {"alpha", "homo", "lumo", "gap", "mu", "Cv"}
    # the rows are those of the split, in its order
    ref = qm9_or_skip("all", 1, cache=False)  # row 0: methane, QM9 id 1
    assert ref.index.tolist() == [1] and ref.n_atoms.tolist() == [5]
    assert ref.one_hot[0, :5].argmax(-1).tolist() == [1, 0, 0, 0, 0]  # C H H H H
    assert abs(ref.properties["alpha"].item() - 13.21) < 1e-4
    d = torch.cdist(ref.positions[0, :5], ref.positions[0, :5])[0, 1:]
    assert ((d > 1.08) & (d < 1.10)).all()  # C-H bonds of 1.09 Angstrom


def test_halves_do_not_share_molecules():
    a = qm9_or_skip("train_a", 200, cache=False)
    b = qm9_or_skip("train_b", 200, cache=False)
    assert not set(a.index.tolist()) & set(b.index.tolist())
    sub = a[torch.arange(10)]
    assert len(sub) == 10 and torch.equal(sub.positions, a.positions[:10])


def test_uncentered_keeps_file_coordinates():
    c = qm9_or_skip("test", 8, cache=False)
    u = qm9_or_skip("test", 8, cache=False, center=False)
    assert torch.equal(c.index, u.index)
    shift = (u.positions - c.positions)[c.mask]
    assert (u.positions * u.mask[..., None]).sum(1).abs().max() > 1e-2  # not centred
    # within a molecule the shift is one translation
    first = shift[:c.n_atoms[0]]
    assert torch.allclose(first, first[:1].expand_as(first), atol=1e-5)


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="split"):
        data.qm9("training")
    with pytest.raises(ValueError, match="limit"):
        data.qm9("train", limit=0)
    with pytest.raises(ValueError, match="split"):
        qm9_split_indices("half")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "qm9pack" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'dflow_fast\[molecules\]'"):
        data.qm9("test", limit=2, cache=False)


def test_cache_matches_the_csv_parse(monkeypatch, tmp_path):
    """The cached arrays (the fast path: one full parse, then an .npz) give the same molecules
    as parsing only the rows a slice needs (the reference). Builds the cache once in tmp_path
    (about 10 s: the full 130,831-molecule parse)."""
    monkeypatch.setenv("DFLOW_FAST_CACHE_DIR", str(tmp_path))
    ref = qm9_or_skip("valid", 40)  # no cache yet: parses only these rows, writes nothing
    assert not list(tmp_path.iterdir())
    full = data.qm9("all")  # parses everything and writes the cache
    assert len(full) == QM9_N_MOLECULES and (tmp_path / "qm9_v1.npz").is_file()
    cached = data.qm9("valid", limit=40)  # now read from the cache
    for a, b in ((ref.positions, cached.positions), (ref.one_hot, cached.one_hot),
                 (ref.mask, cached.mask), (ref.index, cached.index)):
        assert torch.equal(a, b)
    assert all(torch.equal(ref.properties[k], cached.properties[k]) for k in ref.properties)
    rows = qm9_split_indices("valid")[:40]
    assert torch.equal(full.index[torch.from_numpy(rows)], ref.index)
