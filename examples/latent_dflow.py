"""D-Flow through a decoder: the flow runs in the latent space of an autoencoder, the cost decodes
x1 and compares in pixel space (the setting of the D-Flow paper's latent audio inpainting
experiment, here with a tiny image autoencoder).

    z1 = ODESolve(velocity, z0)                        latent flow, t = 0 noise -> t = 1 data
    cost(z1) = || mask * (decode(z1) - y) ||^2         pixel space, y observed where mask = 1

The decoder is part of the cost, not of the velocity: each cost evaluation decodes x1 = z1 once
(one forward with its graph, one backward through it), and the solver's gradient scheme carries
dcost/dz1 back through the N steps of the latent flow. The decoder's graph is therefore held for
one evaluation, never once per solver step (docs/adapters.md, section "guidance and latent
models").

Everything is built from configs with random weights (nothing downloaded): a diffusers
``AutoencoderKL`` (1 x 16 x 16 images, 4 x 8 x 8 latents) and a small convolutional latent velocity.
With a pretrained pair (e.g. a latent flow and its VAE) only :func:`make_models` changes.

Run: ``python examples/latent_dflow.py`` (about 1.5 s of optimization on one CPU thread; on a
busy machine ``OMP_NUM_THREADS=1`` helps a lot with such small convolutions).
tests/adapters/test_latent.py imports this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import dflow_fast as df

LATENT_CHANNELS, IMAGE_SIZE = 4, 16


def make_autoencoder(dtype: torch.dtype = torch.float64, seed: int = 0):
    """A tiny diffusers ``AutoencoderKL`` from a config, random weights, frozen: images
    [B, 1, 16, 16] <-> latents [B, 4, 8, 8] (one downsampling)."""
    from diffusers import AutoencoderKL  # optional dependency (dflow_fast[diffusers])

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        sample_size=IMAGE_SIZE)
    if dtype == torch.float64:  # .double(), not .to(): diffusers' .to() warns on a dtype cast
        vae = vae.double()
    elif dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


class LatentVelocity(nn.Module):
    """``velocity(t, z) -> [B, 4, 8, 8]`` for z [B, 4, 8, 8], t 0-dim or [B]: conv, GroupNorm and
    SiLU with an additive time embedding. Any flow model over the latents fits here."""

    def __init__(self, channels: int = LATENT_CHANNELS, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.temb = nn.Linear(1, width)
        self.norm = nn.GroupNorm(4, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        emb = self.temb(t.reshape(-1, 1).to(z.dtype)).reshape(-1, self.mid.in_channels, 1, 1)
        h = self.mid(nn.functional.silu(self.norm(self.inp(z) + emb)))
        return self.out(nn.functional.silu(h))


class Decoder:
    """``decode(z [B, 4, 8, 8]) -> image [B, 1, 16, 16]``: ``vae.decode(z / scaling_factor)``,
    the diffusers convention (the flow's latents are the VAE's times ``scaling_factor``).
    ``calls`` counts decodes."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.vae.decode(z / self.vae.config.scaling_factor).sample


def masked_cost(decode: Decoder, y: Tensor, mask: Tensor):
    """``cost(z1 [B, 4, 8, 8]) -> [B]`` = sum over pixels of (mask * (decode(z1) - y))^2, with the
    observation y [B, 1, 16, 16] and mask [1 or B, 1, 16, 16] (1 = observed)."""

    def cost(z1: Tensor) -> Tensor:
        return (mask * (decode(z1) - y)).pow(2).flatten(1).sum(1)

    return cost


@dataclass
class Problem:
    velocity: LatentVelocity
    decode: Decoder
    cost: object  # cost(z1) -> [B]
    x0: Tensor  # [B, 4, 8, 8] initial latent noise
    y: Tensor  # [B, 1, 16, 16] observed image (valid where mask = 1)
    mask: Tensor  # [1, 1, 16, 16]
    reference: Tensor  # [B, 1, 16, 16] the full image y was cut from


def make_models(dtype: torch.dtype = torch.float64, seed: int = 0):
    """(latent velocity, decoder), random weights, frozen."""
    vae = make_autoencoder(dtype, seed)
    torch.manual_seed(seed + 1)
    velocity = LatentVelocity().to(dtype).requires_grad_(False)
    return velocity, Decoder(vae)


def make_problem(batch: int = 2, steps: int = 4, dtype: torch.dtype = torch.float64,
                 seed: int = 0) -> Problem:
    """Latent inpainting: the reference images are the model's own samples (decoded solves from
    noise), observed outside a central 8 x 8 square; D-Flow starts from fresh noise."""
    velocity, decode = make_models(dtype, seed)
    g = torch.Generator().manual_seed(seed + 2)
    shape = (batch, LATENT_CHANNELS, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    with torch.no_grad():
        reference = decode(df.solve(velocity, torch.randn(shape, generator=g, dtype=dtype),
                                    steps=steps))
    decode.calls = 0
    mask = torch.ones(1, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)
    mask[..., 4:12, 4:12] = 0
    y = mask * reference
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    return Problem(velocity, decode, masked_cost(decode, y, mask), x0, y, mask, reference)


def run(batch: int = 2, steps: int = 4, max_iter: int = 10, gradient: str = "adjoint",
        dtype: torch.dtype = torch.float64, seed: int = 0):
    """Build the problem and run D-Flow (L-BFGS over z0); returns (problem, OptimizeResult)."""
    p = make_problem(batch, steps, dtype, seed)
    res = df.optimize(p.velocity, p.cost, p.x0, steps=steps, gradient=gradient, max_iter=max_iter)
    return p, res


def main() -> None:
    p, res = run(batch=4, steps=6, max_iter=20, dtype=torch.float32)
    decodes = p.decode.calls
    hole = 1 - p.mask
    with torch.no_grad():
        image = p.decode(res.x1)
    print(f"{'sample':>6} {'cost start':>11} {'cost end':>10} {'status':>10} "
          f"{'hole error start -> end':>24}")
    with torch.no_grad():
        start = p.decode(df.solve(p.velocity, p.x0, steps=6))
    for i in range(p.x0.shape[0]):
        e0 = float((hole * (start[i] - p.reference[i])).pow(2).sum())
        e1 = float((hole * (image[i] - p.reference[i])).pow(2).sum())
        print(f"{i:>6} {res.history[i][0]:>11.4g} {float(res.loss[i]):>10.4g} "
              f"{res.status[i]:>10} {e0:>11.4g} -> {e1:<10.4g}")
    print(f"velocity calls {res.velocity_calls}, decoder calls {decodes} "
          f"(one per cost evaluation, {sum(int(n) for n in res.nfev)} sample evaluations), "
          f"wall {res.wall_time:.2f} s")


if __name__ == "__main__":
    main()
