"""A DiT-style transformer velocity for the mixed-precision benchmark (bench/bench_fastpath.py),
built from a config here so that no diffusers model or checkpoint is needed.

Architecture after Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023):
patchify a latent [B, C, H, W] into (H/p)(W/p) tokens, add a learned position embedding, run
``depth`` transformer blocks whose LayerNorms are modulated by the time embedding (adaLN: a
shift, scale and gate per sub-layer), and unpatchify. Weights are random (the benchmark measures
time and the bf16 gradient's error against fp32, not samples); the adaLN gates are initialized
small but not zero (DiT's adaLN-Zero would make every block the identity at init and the velocity
trivially cheap to differentiate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DiTConfig:
    channels: int = 4  # latent channels
    size: int = 32  # latent height = width
    patch: int = 2
    hidden: int = 768
    depth: int = 10
    heads: int = 12
    mlp_ratio: int = 4


#: "dit-100m": about 107M parameters on 32x32x4 latents (DiT-B/2's width, 10 blocks); "tiny" for
#: the CPU smoke run
DIT_CONFIGS = {"dit-100m": DiTConfig(), "tiny": DiTConfig(size=8, hidden=32, depth=1, heads=2)}


def _timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of t [B] (the transformer's convention), [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device,
                                                        dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


class _Block(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        h = c.hidden
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(h, c.mlp_ratio * h), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.mlp_ratio * h, h))
        self.ada = nn.Linear(h, 6 * h)
        nn.init.normal_(self.ada.weight, std=0.02 / math.sqrt(h))
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        B, N, h = x.shape
        s1, m1, g1, s2, m2, g2 = self.ada(F.silu(temb))[:, None].chunk(6, dim=2)
        y = self.norm1(x) * (1 + m1) + s1
        q, k, v = self.qkv(y).view(B, N, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, h)
        x = x + (1 + g1) * self.proj(y)
        y = self.norm2(x) * (1 + m2) + s2
        return x + (1 + g2) * self.mlp(y)


class DiTVelocity(nn.Module):
    """``velocity(t, x)`` for x [B, channels, size, size] (dflow_fast's convention: t 0-dim)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c, self.config = config, config
        self.embed = nn.Conv2d(c.channels, c.hidden, c.patch, stride=c.patch)
        tokens = (c.size // c.patch) ** 2
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, c.hidden))
        self.temb = nn.Sequential(nn.Linear(256, c.hidden), nn.SiLU(),
                                  nn.Linear(c.hidden, c.hidden))
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.hidden, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(c.hidden, c.patch * c.patch * c.channels)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        c = self.config
        B = x.shape[0]
        temb = self.temb(_timestep_features(t.expand(B), 256).to(x.dtype))
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block(h, temb)
        h = self.out(self.norm(h))  # [B, tokens, p * p * C]
        g = c.size // c.patch
        h = h.view(B, g, g, c.patch, c.patch, c.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(B, c.channels, c.size, c.size)


def build_dit(name: str, device="cpu", seed: int = 0) -> DiTVelocity:
    """A frozen (requires_grad False) DiT velocity of config ``name`` (:data:`DIT_CONFIGS`)."""
    torch.manual_seed(seed)
    net = DiTVelocity(DIT_CONFIGS[name]).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
