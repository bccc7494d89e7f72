"""A small attention-free U-Net velocity field ``v(t, x)`` for 28x28 grey images.

Layout (defaults ``channels=(32, 64, 64)``, ``num_res_blocks=1``)::

    x [B, 1, 28, 28] -> conv -> 32 @ 28 -> ResBlock -> down -> 64 @ 14 -> ResBlock
                     -> down -> 64 @ 7 -> ResBlock, ResBlock (middle)
                     -> up -> concat skip -> ResBlock ... -> GroupNorm, SiLU, conv -> [B, 1, 28, 28]

The time ``t`` is embedded with sinusoidal features followed by an MLP and added (per channel)
inside every residual block. Only GroupNorm is used (no BatchNorm), so each sample's output
depends on that sample alone; D-Flow's per-sample optimization relies on it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["UNet", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of a time in [0, 1].

    Args:
        t: ``[B]`` times.
        dim: even number of features.

    Returns:
        ``[B, dim]``: ``cos`` then ``sin`` of ``1000 t`` at geometrically spaced frequencies.
        The 1000x scale spreads [0, 1] over the period range the frequencies were designed for.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half
    )
    args = (1000.0 * t)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _groups(channels: int, max_groups: int = 8) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding, GroupNorm -> SiLU -> conv, + skip.

    ``x: [B, C_in, H, W]``, ``temb: [B, T]`` -> ``[B, C_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # Zero-init the last conv: each block starts as the identity, which trains stably.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Velocity field ``v(t, x)`` of a flow-matching model on ``[B, C, H, W]`` images.

    Args:
        in_channels: image channels (1 for grey).
        channels: feature channels per resolution; each entry after the first halves H and W
            (28 -> 14 -> 7 with three entries). H and W must be divisible by ``2**(len-1)``.
        num_res_blocks: residual blocks per resolution on the way down (one more on the way up).
        temb_dim: width of the time embedding MLP.
        dropout: dropout inside residual blocks (training only).

    ``forward(t, x)``: ``t`` a 0-dim tensor / Python float (same time for the batch) or ``[B]``;
    ``x: [B, C, H, W]`` in ``[-1, 1]``. Returns ``[B, C, H, W]`` in ``x``'s dtype. Time runs
    from noise (t=0) to data (t=1).
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        num_res_blocks: int = 1,
        temb_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        self.config = dict(
            in_channels=int(in_channels), channels=channels,
            num_res_blocks=int(num_res_blocks), temb_dim=int(temb_dim), dropout=float(dropout),
        )
        self.in_channels = in_channels
        self.sin_dim = 64
        self.time_mlp = nn.Sequential(
            nn.Linear(self.sin_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        # Down path: record every feature map's channels as a skip for the up path.
        self.down = nn.ModuleList()
        skip_ch = [channels[0]]
        c = channels[0]
        for level, c_out in enumerate(channels):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, c_out, temb_dim, dropout))
                c = c_out
                skip_ch.append(c)
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # downsample
                skip_ch.append(c)

        self.mid = nn.ModuleList(
            [ResBlock(c, c, temb_dim, dropout), ResBlock(c, c, temb_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(channels))):
            c_out = channels[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skip_ch.pop(), c_out, temb_dim, dropout))
                c = c_out
            if level > 0:
                # Upsample, then convolve straight to the finer level's width: a conv at the
                # finer resolution with the coarse width costs 2x and dominates the step time.
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, channels[level - 1], 3, padding=1)))
                c = channels[level - 1]
        assert not skip_ch

        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _time(self, t, x: torch.Tensor) -> torch.Tensor:
        """``t`` (float, 0-dim or [B]) -> ``[B]`` in ``x``'s dtype and device."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            return t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t must be 0-dim or of shape [B]=[{x.shape[0]}], got shape {tuple(t.shape)}"
            )
        return t

    def forward(self, t, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must be [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}"
            )
        temb = self.time_mlp(sinusoidal_embedding(self._time(t, x), self.sin_dim))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
