"""Property-targeted molecule generation with D-Flow (the paper's QM9 experiment;
docs/molecules.md).

A molecule is a padded point cloud ``x [B, M, 3 + K]``: positions (Angstrom) and K atom-type
features (the flow's data is ``type_scale`` x one-hot), with a node mask ``[B, M]`` fixed per sample
(the atom count is chosen before solving, as in EDM). Its states live in the subspace where the
padded slots are 0 and the positions of the real atoms have zero centre of mass, of dimension

    d_i = (n_i - 1) * 3 + n_i * K          (n_i real atoms)

D-Flow optimizes the source point x0 of the flow's ODE in that subspace:

    cost_i(x1) = (regressor(P x1)_i - target_i)^2,      R(x0) = ChiPrior(weight, dim=d)(x0)

P projects positions to zero centre of mass over the real atoms and zeroes padded slots; the
regressor sees the positions and the features divided by ``type_scale`` (one-hot scale). Why the
iterates stay in the subspace: x0 starts there (:func:`~dflow_fast.models.egnn.zero_com_noise`);
the velocity (an ``EGNNFlow``) projects its input positions and its output, so every VJP through
the solve lands in the subspace; the cost sees P x1, so its gradient does too; the χ prior's
gradient is a multiple of x0. Padded entries of every gradient are exactly 0 (they are multiplied
by the mask), so padded atoms never move; the centre of mass stays 0 up to rounding.

The mask travels as ``cond={"mask": mask}`` (per sample: it follows optimize's shrinking active
set), the prior's d as ``ChiPrior(dim=[B])`` (the same, through ``ChiPrior.rows``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..models.egnn import remove_mean, zero_com_noise
from ..priors import ChiPrior
from .base import Problem

#: properties a molecule task can target (QM9's polarizability; regressors for it ship as
#: ``qm9-alpha-guide`` / ``qm9-alpha-eval``)
MOLECULE_TASKS = ("alpha",)

__all__ = ["MOLECULE_TASKS", "MoleculeProblem", "molecule_problem", "masks_for",
           "subspace_dim", "project"]


def masks_for(n_atoms: Tensor, max_atoms: int | None = None) -> Tensor:
    """bool ``[B, M]`` node masks with the first ``n_atoms[i]`` slots real; M = ``max_atoms``
    or max(n_atoms)."""
    n_atoms = torch.as_tensor(n_atoms)
    if n_atoms.dim() != 1 or n_atoms.numel() == 0 or n_atoms.is_floating_point() \
            or int(n_atoms.min()) < 1:
        raise ValueError(f"n_atoms must be a non-empty 1-D integer tensor of counts >= 1, got "
                         f"{n_atoms.dtype} {list(n_atoms.shape)}")
    M = int(n_atoms.max()) if max_atoms is None else int(max_atoms)
    if M < int(n_atoms.max()):
        raise ValueError(f"max_atoms={M} is below the largest atom count {int(n_atoms.max())}")
    return torch.arange(M, device=n_atoms.device)[None] < n_atoms[:, None]


def subspace_dim(mask: Tensor, n_types: int) -> Tensor:
    """int64 ``[B]``: the dimension of each sample's state subspace, ``(n - 1) * 3 + n * K``."""
    n = mask.long().sum(1)
    return (n - 1) * 3 + n * n_types


def project(x: Tensor, mask: Tensor) -> Tensor:
    """``x [B, M, 3 + K]`` onto the subspace: positions to zero centre of mass over the real
    atoms, padded slots 0 (an orthogonal projection: its VJP is itself)."""
    m = mask.to(x.dtype)
    return torch.cat([remove_mean(x[..., :3], m), x[..., 3:] * m[..., None]], -1)


@dataclass
class MoleculeProblem(Problem):
    """B molecules, each steered towards its own property target (module docstring).

    ``y``: targets [B] (e.g. alpha in Bohr^3); ``mask``: bool [B, M]; ``x0``: the zero-CoM source
    noise [B, M, 3 + K] to start D-Flow from. Generation has no data-space guess or observation:
    ``guess`` and ``display`` hold x0 too (backward_blend does not apply). ``regressor``:
    ``(positions [B, M, 3], types [B, M, K], mask) -> [B]``, differentiable in positions and
    types. ``prior_weight``: the χ_d prior's weight (0: none).
    """

    mask: Tensor = None
    x0: Tensor = None
    regressor: Callable[..., Tensor] = None
    type_scale: float = 0.25
    prior_weight: float = 1.0

    @property
    def n_types(self) -> int:
        return self.x0.shape[-1] - 3

    @property
    def dim(self) -> Tensor:
        """int64 [B]: each sample's subspace dimension (the χ prior's d)."""
        return subspace_dim(self.mask, self.n_types)

    @property
    def cond(self) -> dict:
        """The velocity's per-sample conditioning: ``{"mask": mask}``."""
        return {"mask": self.mask}

    @property
    def prior(self) -> ChiPrior | None:
        """The χ_d prior on the subspace (d per sample), or None with weight 0."""
        if self.prior_weight == 0:
            return None
        return ChiPrior(self.prior_weight, dim=self.dim.to(self.x0.device))

    def predict(self, x1: Tensor) -> Tensor:
        """The regressor's property [B] of the states x1 [B, M, 3 + K] (projected first)."""
        if x1.shape != self.x0.shape:
            raise ValueError(f"x1 must be {list(self.x0.shape)} like x0, got {list(x1.shape)}")
        x1 = project(x1, self.mask)
        return self.regressor(x1[..., :3], x1[..., 3:] / self.type_scale, self.mask)

    def cost(self, x1: Tensor) -> Tensor:
        """``(regressor(P x1) - y)^2`` per molecule, [B]."""
        return (self.predict(x1) - self.y.to(x1.dtype)).square()

    def select(self, rows: Sequence[int]) -> "MoleculeProblem":
        rows = torch.as_tensor(rows, dtype=torch.long)
        x0 = self.x0[rows.to(self.x0.device)]
        return MoleculeProblem(self.name, self.y[rows.to(self.y.device)], x0, x0,
                               mask=self.mask[rows.to(self.mask.device)], x0=x0,
                               regressor=self.regressor, type_scale=self.type_scale,
                               prior_weight=self.prior_weight)


def molecule_problem(regressor, targets: Tensor, mask: Tensor, *, name: str = "alpha",
                     n_types: int = 5, type_scale: float = 0.25, prior_weight: float = 1.0,
                     x0: Tensor | None = None, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device="cpu") -> MoleculeProblem:
    """B molecule problems: ``targets [B]`` (property values), node masks ``mask [B, M]`` (atom
    counts fixed per sample; :func:`masks_for`), the start ``x0 [B, M, 3 + n_types]`` (default:
    :func:`~dflow_fast.models.egnn.zero_com_noise` drawn with ``generator`` on the CPU, then moved
    to ``device``; a given x0 is projected onto the subspace). Bad shapes or values raise before
    any work."""
    if name not in MOLECULE_TASKS:
        raise ValueError(f"unknown molecule task {name!r}; choose one of {list(MOLECULE_TASKS)}")
    if not callable(regressor):
        raise TypeError("regressor must be callable as regressor(positions, types, mask) -> [B]")
    if mask.dim() != 2 or mask.shape[0] == 0 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool [B, M] tensor, got {mask.dtype} "
                         f"{list(mask.shape)}")
    if not bool(mask.any(1).all()):
        raise ValueError("mask: every molecule needs at least one real atom")
    B, M = mask.shape
    targets = torch.as_tensor(targets)
    if targets.shape != (B,) or not bool(torch.isfinite(targets).all()):
        raise ValueError(f"targets must be {B} finite values, shape [{B}] like mask's B, got "
                         f"{list(targets.shape)}")
    if not (type_scale > 0 and prior_weight >= 0):
        raise ValueError(f"type_scale must be > 0 and prior_weight >= 0, got {type_scale}, "
                         f"{prior_weight}")
    if x0 is None:
        x0 = zero_com_noise(mask.cpu(), n_types, generator=generator, dtype=dtype)
    elif x0.shape != (B, M, 3 + n_types):
        raise ValueError(f"x0 must be [B, M, 3 + n_types] = {[B, M, 3 + n_types]}, got "
                         f"{list(x0.shape)}")
    else:  # the iterates stay where they start: put a given start in the subspace
        x0 = project(x0, mask.to(x0.device))
    x0 = x0.to(device=device, dtype=dtype)
    return MoleculeProblem(name, targets.to(device=device, dtype=dtype), x0, x0,
                           mask=mask.to(device), x0=x0, regressor=regressor,
                           type_scale=float(type_scale), prior_weight=float(prior_weight))
