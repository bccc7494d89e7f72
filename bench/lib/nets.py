"""The velocity the benchmarks differentiate through: :class:`ConvVelocityNet`, a U-Net-style conv
net built here (random frozen weights) so that the benchmarks need no trained checkpoint, in the
sizes of :data:`CONFIGS` ("tiny" for tests, "small" for CPU runs, "gpu" 35M parameters at 3x64x64
for CUDA runs), and the command-line options that pick one (:func:`add_net_options`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class NetConfig:
    """Shape of a :class:`ConvVelocityNet` and of the state it acts on ([B, channels, size, size]).

    ``mults``: width multipliers per resolution level; each level after the first halves H and W.
    """

    name: str
    channels: int
    size: int
    base: int
    mults: tuple[int, ...]
    blocks: int  # residual blocks per level, on the way down and on the way up
    temb: int  # time-embedding width


CONFIGS = {
    # for tests: 27k parameters, about a millisecond per evaluation
    "tiny": NetConfig("tiny", channels=1, size=8, base=8, mults=(1, 2), blocks=1, temb=16),
    # CPU runs: Fashion-MNIST-sized state, 0.75M parameters
    "small": NetConfig("small", channels=1, size=28, base=32, mults=(1, 2, 2), blocks=1, temb=128),
    # GPU runs: 35.1M parameters at 3x64x64 (64 -> 32 -> 16 -> 8), the scale of the H100
    # measurement in docs/design.md section 2 (36M parameters, batch 8)
    "gpu": NetConfig("gpu", channels=3, size=64, base=128, mults=(1, 2, 2, 3), blocks=2,
                     temb=512),
}


def _groups(c: int) -> int:
    g = min(8, c)
    while c % g:
        g -= 1
    return g


class _Block(nn.Module):
    """Residual block: GroupNorm -> SiLU -> conv3x3 (+ time bias) -> GroupNorm -> SiLU -> conv3x3.

    ``x: [B, c_in, H, W]``, ``emb: [B, temb]`` -> ``[B, c_out, H, W]``.
    """

    def __init__(self, c_in: int, c_out: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(temb, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ConvVelocityNet(nn.Module):
    """U-Net-style velocity ``model(x [B, C, H, W], t [B]) -> [B, C, H, W]``.

    One concatenated skip per resolution level, stride-2 conv down, nearest-neighbour up + conv.
    No attention and no BatchNorm (each sample's output depends on that sample only). Weights keep
    PyTorch's default random init on purpose: a zero-initialized output layer would make the
    velocity constant in x and the gradient through the solve trivial.
    Use it as a velocity with ``dflow_fast.ModelVelocity(net)``.
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base * m for m in cfg.mults]
        self.freq = cfg.base  # sinusoidal features of t
        self.embed = nn.Sequential(nn.Linear(self.freq, cfg.temb), nn.SiLU(),
                                   nn.Linear(cfg.temb, cfg.temb))
        self.stem = nn.Conv2d(cfg.channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList(_Block(c if j == 0 else w, w, cfg.temb)
                                           for j in range(cfg.blocks)))
            c = w
            if i < len(widths) - 1:
                self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([_Block(c, c, cfg.temb), _Block(c, c, cfg.temb)])
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            self.up.append(nn.ModuleList(_Block(c + w if j == 0 else w, w, cfg.temb)
                                         for j in range(cfg.blocks)))
            c = w
            if i > 0:
                self.unpool.append(nn.Conv2d(c, widths[i - 1], 3, padding=1))
                c = widths[i - 1]
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                  nn.Conv2d(c, cfg.channels, 3, padding=1))

    def _features(self, t: Tensor) -> Tensor:
        half = self.freq // 2
        k = torch.arange(half, device=t.device, dtype=t.dtype)
        ang = t[:, None] * 1000.0 * torch.exp(-math.log(10_000.0) * k / half)[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.embed(self._features(t))
        h = self.stem(x)
        skips = []
        for i, blocks in enumerate(self.down):
            for b in blocks:
                h = b(h, emb)
            skips.append(h)
            if i < len(self.pool):
                h = self.pool[i](h)
        for b in self.mid:
            h = b(h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, emb)
            if i < len(self.unpool):
                h = self.unpool[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.head(h)


#: the net a device's benchmarks use unless --config says otherwise
DEFAULT_NET = {"cpu": "small", "cuda": "gpu"}


def add_net_options(p, *, batch: int, steps: int) -> None:
    """``--device``, ``--config`` (the net), ``--batch``, ``--steps``: the options of a benchmark
    of one problem size (argparse parser ``p``); finish with :func:`check_net_options`."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), help="net (default small cpu, gpu cuda)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)


def check_net_options(p, a) -> None:
    """After parsing: CUDA must be there when asked for; the device's default net."""
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    a.config = a.config or DEFAULT_NET[a.device]


def build_velocity(config: str | NetConfig, device="cpu", dtype=torch.float32, seed: int = 0):
    """A frozen :class:`ConvVelocityNet` (eval mode, ``requires_grad=False``) and its state shape.

    Frozen because D-Flow optimizes x0 only, and because with trainable weights
    ``solve(gradient="adjoint")`` computes every weight's gradient in its backward sweep even when
    only x0's is requested (~30% more time on the "small" net), which is not what is measured.
    Returns ``(net, (C, H, W))``; wrap ``net`` with ``dflow_fast.ModelVelocity``.
    """
    cfg = CONFIGS[config] if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):  # same weights for a seed; caller's RNG untouched
        torch.manual_seed(seed)
        net = ConvVelocityNet(cfg)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return net, (cfg.channels, cfg.size, cfg.size)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
