"""Shared test helpers: small velocities of the kinds D-Flow is used with, relative error."""
from __future__ import annotations

import torch
from torch import nn


class MLPVelocity(nn.Module):
    """v(t, x) for x [B, D]: an MLP on (x, t)."""

    def __init__(self, dim: int = 6, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, x):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], 1))


class ConvVelocity(nn.Module):
    """v(t, x) for x [B, C, H, W]: conv + GroupNorm + SiLU with a time embedding."""

    def __init__(self, channels: int = 2, width: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.temb = nn.Linear(1, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t, x):
        h = self.inp(x) + self.temb(t.reshape(1, 1)).reshape(1, -1, 1, 1)
        h = self.mid(nn.functional.silu(self.norm(h)))
        return self.out(nn.functional.silu(h))


def make_velocity(kind: str, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, tuple]:
    """A freshly initialized velocity and the per-sample state shape it acts on."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return MLPVelocity().to(dtype), (6,)
    return ConvVelocity().to(dtype), (2, 5, 6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64; NaN never passes a `<=` comparison."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
