"""E(n)-equivariant graph neural networks (Satorras, Hoogeboom, Welling, ICML 2021) for molecules as
padded point clouds: a flow-matching velocity over positions and atom-type features, and an
invariant property regressor.

Shapes: B molecules, M atom slots, ``mask [B, M]`` (True / 1 on real atoms; padded slots carry
anything and never influence the real ones). Every pair of real atoms is an edge (QM9 molecules
are small), computed densely as ``[B, M, M, H]``.

One layer (Satorras et al. eq. 3-6, with EDM's distance-normalized coordinate update and edge
gating, Hoogeboom et al. 2022):

    m_ij = phi_e(h_i, h_j, |x_i - x_j|^2, |x0_i - x0_j|^2),   m_ij *= sigmoid(w . m_ij)
    x_i <- x_i + (1/C) sum_{j != i} (x_i - x_j) / (|x_i - x_j| + 1) * r tanh(phi_x(m_ij))
    h_i <- h_i + phi_h(h_i, (1/C) sum_{j != i} m_ij)

with x0 the input positions, C the aggregation constant (``agg_norm``) and r ``coords_range``.
Only differences of positions enter, through their norms or as the direction of the update, so
h is invariant and the position update equivariant under rotations, reflections and
translations, and permuting atoms permutes the outputs.

The first layer of phi_e is applied as ``W_s h_i + W_t h_j + w d_ij`` (a node-wise product broadcast
over pairs, the same function as the concatenated form but M times fewer multiply-adds).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["EGNNLayer", "EGNNFlow", "EGNNRegressor", "remove_mean", "zero_com_noise",
           "as_mask"]


def as_mask(mask: Tensor | None, x: Tensor) -> Tensor:
    """``mask`` [B, M] (bool or 0/1) as x's floating dtype; None: every slot real."""
    B, M = x.shape[:2]
    if mask is None:
        return x.new_ones(B, M)
    if mask.shape != (B, M):
        raise ValueError(f"mask must have shape [B, M] = {[B, M]} (x is {list(x.shape)}), "
                         f"got {list(mask.shape)}")
    return mask.to(device=x.device, dtype=x.dtype)


def remove_mean(pos: Tensor, mask: Tensor) -> Tensor:
    """Project positions ``[B, M, D]`` onto the zero-centre-of-mass subspace of the real atoms
    (unweighted mean, as EDM) and zero the padded slots. ``mask``: float ``[B, M]``."""
    m = mask[..., None]
    n = m.sum(1, keepdim=True).clamp(min=1)
    return (pos - (pos * m).sum(1, keepdim=True) / n) * m


def zero_com_noise(mask: Tensor, n_features: int, generator: torch.Generator | None = None,
                   dtype=torch.float32) -> Tensor:
    """Source noise ``[B, M, 3 + n_features]``: standard Gaussian positions projected to zero
    centre of mass over the real atoms, standard Gaussian features, zero on padded slots.
    ``mask``: bool or float ``[B, M]`` (on the CPU when a CPU ``generator`` is given)."""
    m = mask.to(dtype)
    z = torch.randn(*m.shape, 3 + n_features, generator=generator, dtype=dtype,
                    device=m.device)
    return torch.cat([remove_mean(z[..., :3], m), z[..., 3:] * m[..., None]], -1)


class EGNNLayer(nn.Module):
    """One E(n)-equivariant message-passing layer (module docstring) on dense pairs."""

    def __init__(self, hidden: int, update_coords: bool = True, agg_norm: float = 10.0,
                 coords_range: float = 10.0):
        super().__init__()
        self.agg_norm, self.coords_range = float(agg_norm), float(coords_range)
        self.src, self.dst = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden, bias=False)
        self.dist = nn.Linear(2, hidden, bias=False)  # d_ij^2 and the input layer's d0_ij^2
        self.edge = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.gate = nn.Linear(hidden, 1)
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.coord = None
        if update_coords:
            # phi_x: one linear map of the (already non-linear) message, not an MLP: a hidden
            # layer here costs a third of the layer's time on a CPU; small init: the layer
            # starts close to the identity on positions (Satorras et al.)
            self.coord = nn.Linear(hidden, 1, bias=False)
            nn.init.xavier_uniform_(self.coord.weight, gain=0.001)

    def forward(self, h: Tensor, x: Tensor, edge_mask: Tensor, d0: Tensor):
        """h [B, M, H], x [B, M, 3], edge_mask [B, M, M] (real i, real j, i != j), d0 [B, M, M]
        -> (h [B, M, H], x [B, M, 3])."""
        diff = x[:, :, None] - x[:, None]  # [B, M, M, 3]: x_i - x_j
        d2 = diff.square().sum(-1)
        pre = (self.src(h)[:, :, None] + self.dst(h)[:, None]
               + self.dist(torch.stack([d2, d0], -1)))
        m = self.edge(pre)
        m = m * (torch.sigmoid(self.gate(m)) * edge_mask[..., None])
        if self.coord is not None:
            # the +1e-8 keeps the gradient of the norm finite on the diagonal and padded pairs
            w = torch.tanh(self.coord(m)) * self.coords_range * edge_mask[..., None]
            x = x + (diff / (torch.sqrt(d2 + 1e-8) + 1.0)[..., None] * w).sum(2) / self.agg_norm
        h = h + self.node(torch.cat([h, m.sum(2) / self.agg_norm], -1))
        return h, x


class _EGNN(nn.Module):
    """Embedding, the layers, the per-pair masks: what the flow and the regressor share."""

    def __init__(self, in_features: int, hidden: int, n_layers: int, update_coords: bool,
                 agg_norm: float, coords_range: float):
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(EGNNLayer(hidden, update_coords, agg_norm, coords_range)
                                    for _ in range(n_layers))

    def run(self, feats: Tensor, pos: Tensor, mask: Tensor):
        """feats [B, M, F], pos [B, M, 3], mask float [B, M] -> (h [B, M, H], pos [B, M, 3])."""
        M = pos.shape[1]
        eye = torch.eye(M, dtype=mask.dtype, device=mask.device)
        edge_mask = mask[:, :, None] * mask[:, None] * (1 - eye)
        d0 = (pos[:, :, None] - pos[:, None]).square().sum(-1)
        h = self.embed(feats)
        for layer in self.layers:
            h, pos = layer(h, pos, edge_mask, d0)
        return h, pos


class EGNNFlow(nn.Module):
    """Flow-matching velocity ``forward(t, x, mask=None) -> v`` on molecules.

    ``x [B, M, 3 + n_types]``: positions (zero centre of mass over the real atoms) and continuous
    atom-type features (data: ``type_scale`` x one-hot, as EDM scales its one-hot by 1/4); ``t``
    0-dim or ``[B]`` (0 noise, 1 data); ``mask [B, M]`` per sample (``cond={"mask": mask}`` under
    dflow_fast.optimize), None for all real. Returns ``v`` like x: the position part is the
    layers' equivariant displacement, projected to zero centre of mass; features are invariant;
    padded slots are 0.
    """

    def __init__(self, hidden: int = 128, n_layers: int = 6, n_types: int = 5,
                 type_scale: float = 0.25, agg_norm: float = 10.0, coords_range: float = 10.0,
                 n_freqs: int = 4):
        super().__init__()
        self.config = {"hidden": hidden, "n_layers": n_layers, "n_types": n_types,
                       "type_scale": type_scale, "agg_norm": agg_norm,
                       "coords_range": coords_range, "n_freqs": n_freqs}
        self.n_types, self.type_scale, self.n_freqs = n_types, float(type_scale), n_freqs
        self.net = _EGNN(n_types + 1 + 2 * n_freqs, hidden, n_layers, True, agg_norm,
                         coords_range)
        self.out = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, n_types))

    def forward(self, t: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != 3 + self.n_types:
            raise ValueError(f"x must be [B, M, {3 + self.n_types}] (positions and "
                             f"{self.n_types} type features), got {list(x.shape)}")
        B, M, _ = x.shape
        m = as_mask(mask, x)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(B)
        elif t.shape != (B,):
            raise ValueError(f"t must be 0-dim or [B] = [{B}], got {list(t.shape)}")
        freqs = math.pi * 2.0 ** torch.arange(self.n_freqs, dtype=x.dtype, device=x.device)
        tf = torch.cat([t[:, None], torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)],
                       -1)
        pos = remove_mean(x[..., :3], m)  # the velocity does not depend on a translation
        feats = torch.cat([x[..., 3:], tf[:, None].expand(B, M, tf.shape[-1])], -1)
        h, pos_out = self.net.run(feats, pos, m)
        v_pos = remove_mean(pos_out - pos, m)
        v_types = self.out(h) * m[..., None]
        return torch.cat([v_pos, v_types], -1)


class EGNNRegressor(nn.Module):
    """Invariant property regressor ``forward(positions, types, mask=None) -> [B]``.

    ``positions [B, M, 3]`` in Angstrom, ``types [B, M, n_types]`` one-hot or continuous (the
    generated molecules' features divided by the flow's ``type_scale``), ``mask [B, M]``. The
    layers do not move the atoms (h depends on distances only), the read-out sums a per-atom MLP
    over the real atoms (polarizability is close to additive) and un-standardizes with the
    training set's ``mean`` / ``std``.
    """

    def __init__(self, hidden: int = 128, n_layers: int = 4, n_types: int = 5,
                 agg_norm: float = 10.0, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.config = {"hidden": hidden, "n_layers": n_layers, "n_types": n_types,
                       "agg_norm": agg_norm, "mean": float(mean), "std": float(std)}
        self.n_types, self.mean, self.std = n_types, float(mean), float(std)
        self.net = _EGNN(n_types, hidden, n_layers, False, agg_norm, 1.0)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, positions: Tensor, types: Tensor, mask: Tensor | None = None) -> Tensor:
        if positions.dim() != 3 or positions.shape[-1] != 3:
            raise ValueError(f"positions must be [B, M, 3], got {list(positions.shape)}")
        if types.shape != (*positions.shape[:2], self.n_types):
            raise ValueError(f"types must be [B, M, {self.n_types}] like positions "
                             f"{list(positions.shape)}, got {list(types.shape)}")
        m = as_mask(mask, positions)
        h, _ = self.net.run(types * m[..., None], positions * m[..., None], m)
        atom = self.readout(h).squeeze(-1) * m  # [B, M]
        # sum of per-atom contributions, scaled so an average molecule (~18 atoms) is O(1)
        return atom.sum(1) / 18.0 * self.std + self.mean
