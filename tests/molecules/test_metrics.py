"""dflow_fast.molecules: EDM's stability rule and RDKit validity on hand-built molecules with
known geometry (methane, water, ethene, N2) and broken ones, and on real QM9 molecules."""
from __future__ import annotations

import math

import pytest
import torch

from dflow_fast import molecules as mol

from .helpers import qm9_or_skip, rdkit_or_skip

H, C, N, O, F = range(5)
_A = 1.09 / math.sqrt(3)  # methane: C-H 1.09 Angstrom along the cube diagonals
METHANE = ([[0, 0, 0], [_A, _A, _A], [-_A, -_A, _A], [-_A, _A, -_A], [_A, -_A, -_A]],
           [C, H, H, H, H])
_W = math.radians(104.5)
WATER = ([[0, 0, 0], [0.9572, 0, 0], [0.9572 * math.cos(_W), 0.9572 * math.sin(_W), 0]],
         [O, H, H])
# ethene: C=C 1.33, C-H 1.09 at 121.5 degrees, planar
_E = math.radians(180 - 121.5)
ETHENE = ([[-0.665, 0, 0], [0.665, 0, 0],
           [-0.665 - 1.09 * math.cos(_E), 1.09 * math.sin(_E), 0],
           [-0.665 - 1.09 * math.cos(_E), -1.09 * math.sin(_E), 0],
           [0.665 + 1.09 * math.cos(_E), 1.09 * math.sin(_E), 0],
           [0.665 + 1.09 * math.cos(_E), -1.09 * math.sin(_E), 0]], [C, C, H, H, H, H])
NITROGEN = ([[0, 0, 0], [1.10, 0, 0]], [N, N])  # N#N triple bond


def batch(*molecules):
    """Padded positions [B, M, 3], types [B, M], mask [B, M]."""
    M = max(len(t) for _, t in molecules)
    pos, typ = torch.zeros(len(molecules), M, 3), torch.zeros(len(molecules), M, dtype=torch.long)
    mask = torch.zeros(len(molecules), M, dtype=torch.bool)
    for i, (p, t) in enumerate(molecules):
        pos[i, :len(t)], typ[i, :len(t)], mask[i, :len(t)] = torch.tensor(p), torch.tensor(t), 1
    return pos, typ, mask


def broken_methane():
    p, t = METHANE
    return [p[0], p[1], p[2], p[3], [3.0, 0.0, 0.0]], t  # one H pulled 3 A away


def pentavalent_carbon():
    p, t = METHANE
    return p + [[0.0, 0.0, -1.09]], t + [H]  # a fifth H bonded to the carbon


def test_bond_orders_single_double_triple():
    pos, typ, mask = batch(METHANE, ETHENE, NITROGEN)
    order = mol.bond_orders(pos, typ, mask)
    assert order.shape == (3, 6, 6) and torch.equal(order, order.transpose(1, 2))
    assert order[0, 0, 1:5].tolist() == [1, 1, 1, 1] and order[0, 1:5, 1:5].sum() == 0
    assert order[1, 0, 1] == 2 and order[1, 0, 2:4].tolist() == [1, 1]
    assert order[2, 0, 1] == 3
    assert (order[~mask].sum() == 0) and (order.diagonal(dim1=1, dim2=2) == 0).all()


def test_stable_molecules_and_broken_ones():
    pos, typ, mask = batch(METHANE, WATER, ETHENE, NITROGEN, broken_methane(),
                           pentavalent_carbon())
    atom_ok, mol_ok = mol.stability(pos, typ, mask)
    assert mol_ok.tolist() == [True, True, True, True, False, False]
    # broken methane: the carbon (3 bonds) and the far hydrogen (0) are unstable
    assert atom_ok[4, :5].tolist() == [False, True, True, True, False]
    # pentavalent carbon: only the carbon is unstable
    assert atom_ok[5, :6].tolist() == [False] + [True] * 5
    assert atom_ok[~mask].all()  # padded slots never count against a molecule


@pytest.mark.parametrize("method", ["edm", "rdkit"])
def test_validity_and_uniqueness(method):
    rdkit_or_skip()
    pos, typ, mask = batch(METHANE, WATER, ETHENE, METHANE, pentavalent_carbon())
    r = mol.evaluate(pos, typ, mask, method=method)
    assert r["valid"] == [True, True, True, True, False]
    assert r["smiles"][:4] == ["C", "O", "C=C", "C"] and r["smiles"][4] is None
    assert r["validity"] == pytest.approx(4 / 5)
    assert r["uniqueness"] == pytest.approx(3 / 4)  # two methanes
    assert r["molecule_stability"] == pytest.approx(4 / 5)
    assert r["atom_stability"] == pytest.approx((5 + 3 + 6 + 5 + 5) / (5 + 3 + 6 + 5 + 6))
    # one-hot types give the same answer as indices
    onehot = torch.nn.functional.one_hot(typ, 5).float()
    assert mol.evaluate(pos, onehot, mask, method=method)["valid"] == r["valid"]


def test_real_qm9_molecules_score_like_edm_reports_for_the_data():
    rdkit_or_skip()
    m = qm9_or_skip("test", 200, cache=False)
    r = mol.evaluate(m.positions, m.one_hot, m.mask)
    # EDM's Table 1, data row: atom 99.0 %, molecule 95.2 %, validity 97.7 %, uniqueness 100 %
    assert r["atom_stability"] > 0.98 and r["molecule_stability"] > 0.9
    assert r["validity"] > 0.93 and r["uniqueness"] > 0.97


def test_xyz_decode_and_bad_input():
    pos, typ, mask = batch(WATER)
    text = mol.to_xyz(pos[0], typ[0], "water")
    assert text.splitlines()[0] == "3" and text.splitlines()[2].startswith("O 0.000000")
    x = torch.cat([pos, torch.nn.functional.one_hot(typ, 5).float() * 0.25], -1)
    p, t = mol.decode(x, mask)
    assert torch.equal(t, typ) and torch.equal(p, pos)
    with pytest.raises(ValueError, match="types"):
        mol.stability(pos, typ.float(), mask)
    with pytest.raises(ValueError, match="outside"):
        mol.stability(pos, typ + 7, mask)
    with pytest.raises(ValueError, match="method"):
        mol.to_rdkit(pos[0], typ[0], method="openbabel")
    with pytest.raises(ValueError, match="n_atoms"):
        mol.atom_count_distribution(torch.tensor([0, 3]))
