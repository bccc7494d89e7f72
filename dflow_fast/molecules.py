"""Sample-quality metrics for generated molecules (QM9 with hydrogens: H C N O F), as reported by
EDM (Hoogeboom et al., "Equivariant Diffusion for Molecule Generation in 3D", ICML 2022, Table 1).

- **Atom / molecule stability**: bonds and their orders come from the interatomic distances alone
  (EDM's rule): a pair of atoms at distance d (pm) is bonded when d < l1 + 10, where l1 is the
  typical single-bond length of the pair; the bond is double when moreover d < l2 + 5 and triple
  when d < l3 + 3 (l2, l3 the double / triple lengths where the pair has one). An atom is stable
  when the orders of its bonds sum to its valence (H 1, C 4, N 3, O 2, F 1); a molecule when every
  atom is. Typical lengths (pm): the tables EDM uses, from standard bond-length tables
  (wiredchemist.com "Bond energies and lengths"; chemistry-reference.com).
- **Validity** (RDKit): ``method="edm"`` builds an RDKit molecule with the bonds of the rule
  above, keeps its largest fragment and counts it valid when RDKit sanitizes it (EDM's protocol);
  ``method="rdkit"`` lets RDKit find bonds and orders from the coordinates alone
  (``rdDetermineBonds.DetermineBonds``, total charge 0: stricter, the whole molecule).
- **Uniqueness**: distinct canonical SMILES among the valid molecules / the valid ones.

Input: ``positions [B, M, 3]`` in Angstrom, ``types [B, M]`` int indices into ``ATOMS`` (or
one-hot / continuous ``[B, M, 5]``, reduced by argmax), ``mask [B, M]``. RDKit is imported only
by the validity functions (``pip install 'dflow_fast[molecules]'``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ATOMS", "VALENCE", "bond_orders", "stability", "to_rdkit", "validity",
           "evaluate", "to_xyz", "decode"]

ATOMS = ("H", "C", "N", "O", "F")
VALENCE = (1, 4, 3, 2, 1)
_INSTALL = "pip install 'dflow_fast[molecules]'"

_NAN = math.nan
#: typical bond lengths in pm, rows / columns in ATOMS order; NaN: no such bond
_SINGLE = ((74, 109, 101, 96, 92),
           (109, 154, 147, 143, 135),
           (101, 147, 145, 140, 136),
           (96, 143, 140, 148, 142),
           (92, 135, 136, 142, 142))
_DOUBLE = ((_NAN,) * 5,
           (_NAN, 134, 129, 120, _NAN),
           (_NAN, 129, 125, 121, _NAN),
           (_NAN, 120, 121, 121, _NAN),
           (_NAN,) * 5)
_TRIPLE = ((_NAN,) * 5,
           (_NAN, 120, 116, 113, _NAN),
           (_NAN, 116, 110, _NAN, _NAN),
           (_NAN, 113, _NAN, _NAN, _NAN),
           (_NAN,) * 5)
#: margins (pm) added to the single / double / triple lengths (EDM's, tuned on real QM9)
_MARGINS = (10.0, 5.0, 3.0)


def _check(positions: Tensor, types: Tensor, mask: Tensor | None):
    """-> positions float64 [B, M, 3], types int64 [B, M], mask bool [B, M]."""
    if positions.dim() != 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be [B, M, 3], got {list(positions.shape)}")
    B, M = positions.shape[:2]
    if types.dim() == 3:
        if types.shape != (B, M, len(ATOMS)):
            raise ValueError(f"types must be [B, M] indices or [B, M, {len(ATOMS)}] features "
                             f"like positions {list(positions.shape)}, got {list(types.shape)}")
        types = types.argmax(-1)
    elif types.shape != (B, M) or types.is_floating_point():
        raise ValueError(f"types must be int [B, M] = {[B, M]} indices into {ATOMS} or "
                         f"[B, M, {len(ATOMS)}] features, got {types.dtype} {list(types.shape)}")
    mask = torch.ones(B, M, dtype=torch.bool) if mask is None else mask.bool()
    if mask.shape != (B, M):
        raise ValueError(f"mask must be [B, M] = {[B, M]}, got {list(mask.shape)}")
    types = types.long().cpu()
    if ((types < 0) | (types >= len(ATOMS)))[mask.cpu()].any():
        raise ValueError(f"types hold indices outside 0..{len(ATOMS) - 1} on real atoms")
    return positions.detach().double().cpu(), types, mask.cpu()


def bond_orders(positions: Tensor, types: Tensor, mask: Tensor | None = None) -> Tensor:
    """int64 ``[B, M, M]``: EDM's bond order (0 none, 1, 2, 3) of every pair of real atoms from
    their distance (module docstring); 0 on the diagonal and for padded atoms."""
    pos, typ, m = _check(positions, types, mask)
    d = torch.cdist(pos, pos) * 100.0  # Angstrom -> pm
    ti, tj = typ[:, :, None], typ[:, None, :]
    th = [torch.tensor(tab, dtype=torch.float64)[ti, tj] + mg
          for tab, mg in zip((_SINGLE, _DOUBLE, _TRIPLE), _MARGINS)]
    # NaN thresholds compare False: pairs without a double / triple bond stay single
    order = (d < th[0]).long() * (1 + (d < th[1]).long() * (1 + (d < th[2]).long()))
    pair = m[:, :, None] & m[:, None, :] & ~torch.eye(m.shape[1], dtype=torch.bool)
    return order * pair


def stability(positions: Tensor, types: Tensor, mask: Tensor | None = None):
    """``(atom_stable bool [B, M], molecule_stable bool [B])``: an atom is stable when its bond
    orders sum to its valence (padded slots count as stable); a molecule when all its atoms are."""
    pos, typ, m = _check(positions, types, mask)
    valence = torch.tensor(VALENCE)[typ]
    stable = (bond_orders(pos, typ, m).sum(2) == valence) | ~m
    return stable, stable.all(1)


def to_xyz(positions: Tensor, types: Tensor, comment: str = "") -> str:
    """One molecule ``positions [n, 3]`` (Angstrom), ``types [n]`` indices as an .xyz text."""
    lines = [str(len(types)), comment.replace("\n", " ")]
    lines += [f"{ATOMS[int(t)]} {x:.6f} {y:.6f} {z:.6f}" for t, (x, y, z)
              in zip(types.tolist(), positions.tolist())]
    return "\n".join(lines) + "\n"


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as e:
        raise ImportError(f"molecule validity needs RDKit: {_INSTALL}") from e
    RDLogger.DisableLog("rdApp.*")  # sanitization failures are counted, not printed
    return Chem


def to_rdkit(positions: Tensor, types: Tensor, method: str = "edm"):
    """One molecule (``positions [n, 3]`` Angstrom, ``types [n]`` indices, real atoms only) as a
    sanitized RDKit ``Mol`` with a 3D conformer, or None when it is not valid.

    ``method="edm"``: bonds from :func:`bond_orders`, the largest fragment kept; ``"rdkit"``:
    bonds and orders by ``rdDetermineBonds.DetermineBonds(charge=0)``, the whole molecule.
    """
    if method not in ("edm", "rdkit"):
        raise ValueError(f"method must be 'edm' or 'rdkit', got {method!r}")
    Chem = _rdkit()
    from rdkit.Geometry import Point3D

    pos, typ = positions.detach().double().cpu(), types.long().cpu()
    mol = Chem.RWMol()
    for t in typ.tolist():
        mol.AddAtom(Chem.Atom(ATOMS[t]))
    conf = Chem.Conformer(len(typ))
    for i, (x, y, z) in enumerate(pos.tolist()):
        conf.SetAtomPosition(i, Point3D(x, y, z))
    mol.AddConformer(conf, assignId=True)
    try:
        if method == "edm":
            kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
            order = bond_orders(pos[None], typ[None])[0]
            for i, j in torch.nonzero(torch.triu(order, 1)).tolist():
                mol.AddBond(i, j, kinds[int(order[i, j])])
            mol = mol.GetMol()
            Chem.SanitizeMol(mol)
            frags = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=True)
            mol = max(frags, key=lambda f: f.GetNumAtoms())
        else:
            from rdkit.Chem import rdDetermineBonds

            mol = mol.GetMol()
            rdDetermineBonds.DetermineBonds(mol, charge=0)
            Chem.SanitizeMol(mol)
    except Exception:  # RDKit raises assorted errors on impossible valences / kekulization
        return None
    return mol


def validity(positions: Tensor, types: Tensor, mask: Tensor | None = None,
             method: str = "edm"):
    """``(valid bool [B], smiles list[str | None])`` via :func:`to_rdkit`: canonical SMILES
    (hydrogens implicit) of each valid molecule, None for the invalid ones."""
    pos, typ, m = _check(positions, types, mask)
    Chem = _rdkit()
    valid, smiles = torch.zeros(len(pos), dtype=torch.bool), []
    for i in range(len(pos)):
        mol = to_rdkit(pos[i][m[i]], typ[i][m[i]], method)
        s = None
        if mol is not None:
            s = Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
            valid[i] = True
        smiles.append(s)
    return valid, smiles


def evaluate(positions: Tensor, types: Tensor, mask: Tensor | None = None,
             method: str = "edm") -> dict:
    """EDM's four sample-quality numbers over a batch: ``atom_stability`` (stable real atoms /
    real atoms), ``molecule_stability``, ``validity`` (valid / all) and ``uniqueness`` (distinct
    SMILES / valid), as fractions in [0, 1], with ``n`` and the per-molecule ``valid``,
    ``stable`` and ``smiles``."""
    pos, typ, m = _check(positions, types, mask)
    atom_ok, mol_ok = stability(pos, typ, m)
    valid, smiles = validity(pos, typ, m, method)
    n_valid = int(valid.sum())
    return {
        "n": len(pos), "atom_stability": float(atom_ok[m].float().mean()) if m.any() else 0.0,
        "molecule_stability": float(mol_ok.float().mean()),
        "validity": n_valid / max(1, len(pos)),
        "uniqueness": len({s for s in smiles if s is not None}) / max(1, n_valid),
        "validity_method": method, "stable": mol_ok.tolist(), "valid": valid.tolist(),
        "smiles": smiles,
    }


def decode(x: Tensor, mask: Tensor, n_types: int = len(ATOMS)):
    """A flow state ``x [B, M, 3 + n_types]`` -> ``(positions [B, M, 3], types int64 [B, M])``:
    the atom type is the argmax of the features (padded slots 0)."""
    if x.dim() != 3 or x.shape[-1] != 3 + n_types:
        raise ValueError(f"x must be [B, M, {3 + n_types}], got {list(x.shape)}")
    m = mask.bool().to(x.device)
    return x[..., :3] * m[..., None], x[..., 3:].argmax(-1) * m


def atom_count_distribution(n_atoms: Tensor, max_atoms: int = 29) -> Tensor:
    """float64 ``[max_atoms + 1]``: the empirical distribution of atom counts ``n_atoms [N]``
    (e.g. ``qm9("train_a").n_atoms``), from which generated molecules draw their sizes (EDM)."""
    if n_atoms.dim() != 1 or len(n_atoms) == 0 or int(n_atoms.min()) < 1 \
            or int(n_atoms.max()) > max_atoms:
        raise ValueError(f"n_atoms must be a non-empty 1-D tensor of counts in 1..{max_atoms}")
    counts = torch.bincount(n_atoms.long().cpu(), minlength=max_atoms + 1).double()
    return counts / counts.sum()


@torch.no_grad()
def sample(flow, n_atoms: Tensor, *, steps: int = 50, solver: str = "midpoint",
           generator: torch.Generator | None = None, batch: int = 64):
    """Unconditional molecules from a flow velocity (``EGNNFlow``: ``flow(t, x, mask=...)`` with
    ``flow.n_types`` and ``flow.type_scale``), integrating ``dflow_fast.solve`` from zero-CoM
    Gaussian noise (t = 0) to t = 1.

    Args:
        n_atoms: int ``[B]`` atom counts, one per molecule (e.g. drawn from
            :func:`atom_count_distribution` with ``torch.multinomial``).
        steps, solver: of the ODE solve (``solver`` as in ``dflow_fast.solve``).
        generator: CPU generator of the noise.
        batch: molecules per solve. The molecules are solved in order of size (a batch is cut
            to its largest molecule: dense pairs cost M^2), so the noise of a molecule depends on
            ``n_atoms`` as a whole, deterministically.

    Returns:
        ``(positions [B, M, 3] Angstrom, types int64 [B, M], mask bool [B, M], x1 [B, M, 3 + K])``
        with M = max(n_atoms); real atoms first in each row.
    """
    from .models.egnn import zero_com_noise
    from .solve import solve

    n_atoms = n_atoms.long().cpu()
    if n_atoms.dim() != 1 or len(n_atoms) == 0 or int(n_atoms.min()) < 1:
        raise ValueError("n_atoms must be a non-empty 1-D tensor of positive counts")
    B, M, K = len(n_atoms), int(n_atoms.max()), flow.n_types
    device = next(flow.parameters()).device
    mask = torch.arange(M)[None, :] < n_atoms[:, None]
    out = torch.zeros(B, M, 3 + K)
    order = torch.sort(n_atoms, stable=True).indices
    for i in range(0, B, batch):
        rows = order[i:i + batch]
        m = mask[rows, :int(n_atoms[rows].max())]
        x0 = zero_com_noise(m, K, generator=generator).to(device)
        x1 = solve(flow, x0, steps=steps, solver=solver, cond={"mask": m.to(device)})
        out[rows, :m.shape[1]] = x1.cpu() * m[..., None]
    positions, types = decode(out, mask, K)
    return positions, types, mask, out
