"""QM9 (Ramakrishnan et al. 2014) as padded tensors, read from the PyPI package ``qm9pack``.

qm9pack ships the 130,831 molecules that survive QM9's consistency check (133,885 minus the 3,054
uncharacterized ones, as in EDM, Hoogeboom et al. 2022) as three CSV files under
``qm9pack/data/`` (SMILES, element list, XYZ in Angstrom, properties), in GDB index order. A
molecule's *row* is its position in that order (0..130830); its QM9 id is ``index``.

**Split** (fixed, seeded, EDM's sizes): ``perm = numpy.random.default_rng(QM9_SPLIT_SEED)
.permutation(130831)``; ``train = perm[:100000]``, ``valid = perm[100000:117748]``,
``test = perm[117748:]`` (EDM: 100k train, 10% test, the rest valid). The property protocol
needs two disjoint halves of train: ``train_a = train[:50000]`` (the generator and the guidance
regressor) and ``train_b = train[50000:]`` (the evaluation regressor only). Rows keep the
permutation's (random) order, so ``limit=n`` is a representative slice.

**Cache**: the first full load parses the CSVs (about 10 s) and writes the arrays to
``<cache>/qm9_v1.npz`` (~50 MB; ``<cache>`` is ``$DFLOW_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/dflow_fast``, else ``~/.cache/dflow_fast``); later loads read that file. A
small ``limit`` without a cache parses only the rows it needs (no cache is written).

Properties (per molecule, float32, the source's units): ``alpha`` isotropic polarizability
(Bohr^3), ``homo``, ``lumo``, ``gap`` (Hartree), ``mu`` dipole moment (Debye), ``Cv`` heat
capacity (cal/mol/K).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import DatasetNotFoundError

__all__ = ["qm9", "Molecules", "qm9_split_indices", "QM9_ATOMS", "QM9_SPLIT_SIZES",
           "QM9_SPLIT_SEED", "QM9_N_MOLECULES", "QM9_MAX_ATOMS", "QM9_PROPERTIES"]

#: atom types, in the order of the one-hot channel
QM9_ATOMS = ("H", "C", "N", "O", "F")
QM9_N_MOLECULES = 130_831
QM9_MAX_ATOMS = 29
QM9_SPLIT_SEED = 0
QM9_SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}
#: property name -> CSV column
QM9_PROPERTIES = {"alpha": "Polarizability_bohr3", "homo": "HOMO_au", "lumo": "LUMO_au",
                  "gap": "HOMO_LUMO_gap_au", "mu": "Dipole_debye",
                  "Cv": "Heatcapacity_Cv_cal_mol_K"}
_SPLITS = ("all", "train", "valid", "test", "train_a", "train_b")
_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_CACHE_NAME = "qm9_v1.npz"
_INSTALL = "pip install 'dflow_fast[molecules]'"


@dataclass(frozen=True)
class Molecules:
    """A batch of molecules as padded tensors (N molecules, M atom slots).

    Attributes:
        positions: float32 ``[N, M, 3]`` in Angstrom (padded slots 0).
        one_hot: float32 ``[N, M, 5]``, channels ``QM9_ATOMS`` = H C N O F (padded slots 0).
        mask: bool ``[N, M]``, True on real atoms (the first ``n_atoms`` slots of each row).
        properties: name -> float32 ``[N]`` (see ``QM9_PROPERTIES``).
        index: int64 ``[N]``, the QM9 (GDB) id of each molecule.
    """

    positions: Tensor
    one_hot: Tensor
    mask: Tensor
    properties: dict
    index: Tensor

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> Tensor:
        """int64 ``[N]``: real atoms per molecule."""
        return self.mask.sum(1)

    def __getitem__(self, rows) -> "Molecules":
        """The molecules ``rows`` (an index tensor, a slice or a boolean mask)."""
        return Molecules(self.positions[rows], self.one_hot[rows], self.mask[rows],
                         {k: v[rows] for k, v in self.properties.items()}, self.index[rows])


def qm9_split_indices(split: str) -> np.ndarray:
    """int64 rows (0..130830, in the split's fixed random order) of ``split``, one of
    ``"all"`` (0..130830 in file order), ``"train"``, ``"valid"``, ``"test"``, ``"train_a"``,
    ``"train_b"`` (see the module docstring)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if split == "all":
        return np.arange(QM9_N_MOLECULES, dtype=np.int64)
    perm = np.random.default_rng(QM9_SPLIT_SEED).permutation(QM9_N_MOLECULES).astype(np.int64)
    n_train, n_valid = QM9_SPLIT_SIZES["train"], QM9_SPLIT_SIZES["valid"]
    half = n_train // 2
    return {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
            "test": perm[n_train + n_valid:], "train_a": perm[:half],
            "train_b": perm[half:n_train]}[split]


def cache_dir() -> Path:
    """Where the parsed arrays are cached (see the module docstring)."""
    env = os.environ.get("DFLOW_FAST_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dflow_fast"


def qm9_data_dir() -> Path:
    """The folder of qm9pack's CSV files (found without importing qm9pack, whose import needs
    pandas and setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"QM9 needs the PyPI package 'qm9pack', which ships the data: {_INSTALL} "
            "(or: pip install qm9pack)")
    for base in spec.submodule_search_locations:
        d = Path(base) / "data"
        if all((d / f).is_file() for f in _FILES):
            return d
    raise DatasetNotFoundError(
        f"qm9pack is installed but its data files {list(_FILES)} are missing; reinstall it: "
        "pip install --force-reinstall qm9pack")


def _parse_row(fields: list, col: dict, row: int):
    """One CSV row -> (index, types int8 [n], xyz float32 [n, 3], properties [P])."""
    elements = [e.strip(" '\"") for e in fields[col["Elements"]].strip("[]").split(",")]
    try:
        types = np.array([QM9_ATOMS.index(e) for e in elements], dtype=np.int8)
    except ValueError as e:
        raise ValueError(f"QM9 row {row}: unknown element in {elements}") from e
    n = int(fields[col["N_atoms"]])
    # "[[x,y,z],...]" with numbers such as "0." (not JSON): split on the separators
    flat = fields[col["XYZ_Ang"]].replace("[", " ").replace("]", " ").replace(",", " ").split()
    xyz = np.array(flat, dtype=np.float64).astype(np.float32)
    if xyz.size != 3 * n or len(types) != n or n > QM9_MAX_ATOMS:
        raise ValueError(f"QM9 row {row}: {n} atoms but {len(types)} elements and "
                         f"{xyz.size} coordinates")
    xyz = xyz.reshape(n, 3)
    props = np.array([float(fields[col[c]]) for c in QM9_PROPERTIES.values()], dtype=np.float32)
    return int(fields[col["Index"]]), types, xyz, props


def _parse(rows: np.ndarray | None) -> dict:
    """Parse the CSVs: every molecule (``rows`` None) or only ``rows`` (sorted output in file
    order). Returns the cache's arrays."""
    d = qm9_data_dir()
    wanted = None if rows is None else set(int(r) for r in rows)
    out_rows, idx, types, xyz, props = [], [], [], [], []
    r = 0
    for name in _FILES:
        with open(d / name, newline="", encoding="utf-8") as f:
            header = next(csv.reader([f.readline()]))
            col = {h: i for i, h in enumerate(header)}
            missing = {"Index", "N_atoms", "Elements", "XYZ_Ang",
                       *QM9_PROPERTIES.values()} - set(col)
            if missing:
                raise ValueError(f"{d / name}: missing columns {sorted(missing)}")
            # one molecule per line (no field holds a newline): a slice parses only its lines
            r0 = r
            lines = csv.reader(f) if wanted is None else (
                next(csv.reader([line])) if r0 + k in wanted else None
                for k, line in enumerate(f))
            for fields in lines:
                if fields is not None:
                    i, t, x, p = _parse_row(fields, col, r)
                    out_rows.append(r), idx.append(i), types.append(t), xyz.append(x)
                    props.append(p)
                r += 1
    if r != QM9_N_MOLECULES:
        raise ValueError(f"{d}: {r} molecules in {list(_FILES)}, expected {QM9_N_MOLECULES} "
                         "(another qm9pack version?)")
    n = len(out_rows)
    pos = np.zeros((n, QM9_MAX_ATOMS, 3), np.float32)
    typ = np.full((n, QM9_MAX_ATOMS), -1, np.int8)
    for k, (t, x) in enumerate(zip(types, xyz)):
        pos[k, :len(t)], typ[k, :len(t)] = x, t
    return {"rows": np.asarray(out_rows, np.int64), "index": np.asarray(idx, np.int64),
            "positions": pos, "types": typ,
            "properties": np.stack(props) if props else np.zeros((0, len(QM9_PROPERTIES)),
                                                                  np.float32),
            "property_names": np.array(list(QM9_PROPERTIES))}


def _load_all(cache: bool) -> dict:
    path = cache_dir() / _CACHE_NAME
    if cache and path.is_file():
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        if (arrays["positions"].shape == (QM9_N_MOLECULES, QM9_MAX_ATOMS, 3)
                and list(arrays["property_names"]) == list(QM9_PROPERTIES)):
            return arrays
    arrays = _parse(None)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        finally:
            if tmp.exists():
                tmp.unlink()
    return arrays


def qm9(split: str = "train", limit: int | None = None, center: bool = True,
        cache: bool = True) -> Molecules:
    """QM9 molecules of one split as padded tensors (M = 29 atom slots).

    Args:
        split: ``"train"`` (100,000), ``"valid"`` (17,748), ``"test"`` (13,083), ``"train_a"`` /
            ``"train_b"`` (the two disjoint 50,000-molecule halves of train) or ``"all"``
            (130,831, file order). The split is fixed and seeded (module docstring).
        limit: only the first ``limit`` molecules of the split (its fixed random order).
        center: subtract each molecule's mean position over its real atoms (zero centre of
            mass, unweighted as in EDM); else the file's coordinates.
        cache: read / write the parsed arrays in the cache folder (module docstring).

    Returns:
        :class:`Molecules`: ``positions [N, 29, 3]`` Angstrom, ``one_hot [N, 29, 5]``,
        ``mask [N, 29]``, ``properties`` (``alpha`` in Bohr^3, ...), ``index [N]``.

    Raises:
        ImportError: qm9pack is not installed (``pip install 'dflow_fast[molecules]'``).
        DatasetNotFoundError: qm9pack is installed without its data files.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    rows = qm9_split_indices(split)
    if limit is not None:
        rows = rows[:int(limit)]
    have_cache = cache and (cache_dir() / _CACHE_NAME).is_file()
    if limit is not None and limit <= 5000 and not have_cache:
        arrays = _parse(rows)  # only the rows needed: fast for tests, no cache written
        where = np.searchsorted(arrays["rows"], rows)
    else:
        qm9_data_dir()  # a missing package fails here even when a cache exists elsewhere
        arrays = _load_all(cache)
        where = rows
    pos = torch.from_numpy(np.ascontiguousarray(arrays["positions"][where]))
    types = torch.from_numpy(arrays["types"][where].astype(np.int64))
    mask = types >= 0
    one_hot = torch.nn.functional.one_hot(types.clamp(min=0), len(QM9_ATOMS)).float()
    one_hot = one_hot * mask[..., None]
    if center:
        com = (pos * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
        pos = (pos - com) * mask[..., None]
    props = torch.from_numpy(np.ascontiguousarray(arrays["properties"][where]))
    names = [str(n) for n in arrays["property_names"]]
    return Molecules(pos, one_hot, mask, {n: props[:, k].clone() for k, n in enumerate(names)},
                     torch.from_numpy(arrays["index"][where].astype(np.int64)))
