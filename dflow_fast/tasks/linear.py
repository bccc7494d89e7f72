"""Linear inverse problems on images ``x [B, C, H, W]`` in ``[-1, 1]``: observe
``y = A x + sigma * noise``, cost ``||A x1 - y||^2`` per sample. Every operator provides its adjoint
``A^T`` (tested: ``<A x, y> = <x, A^T y>``) and a cheap data-space guess of x from y.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Problem


class LinearOperator:
    """A linear forward operator ``A`` with its adjoint ``A^T`` (both batched over dim 0)."""

    name = "linear"

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def pseudo_inverse_guess(self, y: Tensor) -> Tensor:
        """A cheap data-space estimate of x from y (the start of backward_blend)."""
        return self.adjoint(y)


class Mask(LinearOperator):
    """``A x = m * x`` with a 0/1 mask ``m`` broadcastable to x; self-adjoint."""

    def __init__(self, mask: Tensor, name: str):
        self.mask, self.name = mask, name

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)

    adjoint = __call__


def center_box_mask(h: int, w: int, fraction: float = (40 / 128) ** 2) -> Tensor:
    """[1, 1, h, w] mask, 0 on a centered square covering ``fraction`` of the image."""
    side = max(1, round(math.sqrt(fraction * h * w)))
    m = torch.ones(1, 1, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    m[..., top:top + side, left:left + side] = 0
    return m


class AvgPool(LinearOperator):
    """Average pooling by ``k`` (super-resolution's degradation); adjoint spreads each value
    uniformly (divided by k^2) over its k x k block."""

    def __init__(self, k: int):
        self.k, self.name = k, f"avgpool{k}"

    def __call__(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.k)

    def adjoint(self, y: Tensor) -> Tensor:
        return F.interpolate(y, scale_factor=self.k, mode="nearest") / self.k**2

    def pseudo_inverse_guess(self, y: Tensor) -> Tensor:
        return F.interpolate(y, scale_factor=self.k, mode="nearest")


class GaussianBlur(LinearOperator):
    """Convolution with a normalized Gaussian kernel and zero padding ('same' size). The kernel is
    symmetric, so with zero padding the operator is self-adjoint."""

    def __init__(self, std: float = 1.5, size: int = 9):
        r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-0.5 * (r / std) ** 2)
        k = torch.outer(g, g)
        self.kernel = (k / k.sum())[None, None]
        self.size, self.name = size, f"blur{std:g}"
        # the kernel per (dtype, device), made once: a host-to-device copy per call would be a
        # host synchronization inside every cost evaluation (and none may sit in a CUDA graph)
        self._cast: dict[tuple, Tensor] = {}

    def _kernel(self, x: Tensor) -> Tensor:
        key = (x.dtype, x.device)
        if key not in self._cast:
            self._cast[key] = self.kernel.to(device=x.device, dtype=x.dtype)
        return self._cast[key]

    def __call__(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        k = self._kernel(x).expand(c, 1, -1, -1)
        return F.conv2d(x, k, padding=self.size // 2, groups=c)

    adjoint = __call__

    def pseudo_inverse_guess(self, y: Tensor) -> Tensor:
        return y


class Identity(LinearOperator):
    name = "identity"

    def __call__(self, x: Tensor) -> Tensor:
        return x

    adjoint = __call__


@dataclass
class LinearProblem(Problem):
    """B instances of ``y = A x + sigma * noise`` with cost ``||A x1 - y||^2`` summed per sample."""

    operator: LinearOperator = None
    sigma: float = 0.0

    def cost(self, x1: Tensor) -> Tensor:
        return (self.operator(x1) - self.y).pow(2).flatten(1).sum(1)

    @property
    def noise_level(self) -> float:
        """The expected cost of the ground truth itself, ``m sigma^2`` with m the entries of one
        sample's observation: a cost below it fits the noise. Pass it as
        ``optimize(..., stop_loss=problem.noise_level)`` (the discrepancy principle)."""
        return self.y[0].numel() * self.sigma ** 2

    def select(self, rows) -> "LinearProblem":
        op = self.operator
        if isinstance(op, Mask) and op.mask.shape[0] > 1:  # per-sample masks
            op = Mask(op.mask[rows], op.name)
        return LinearProblem(self.name, self.y[rows], self.guess[rows], self.display[rows], op,
                             self.sigma)


def linear_problem(name: str, op: LinearOperator, x: Tensor, sigma: float,
                   generator: torch.Generator | None = None) -> LinearProblem:
    """``y = A x + sigma * noise`` on ground truth x [B, C, H, W]."""
    ax = op(x)
    y = ax + sigma * torch.randn(ax.shape, generator=generator, dtype=x.dtype).to(x.device)
    guess = op.pseudo_inverse_guess(y).clamp(-1, 1)
    display = y if isinstance(op, Mask) else guess  # masked pixels show as 0 (mid-gray)
    return LinearProblem(name, y, guess, display, op, sigma)


def operator_for(name: str, x: Tensor, missing: float = 0.7,
                 generator: torch.Generator | None = None) -> LinearOperator:
    """The forward operator of linear task ``name`` for images like x [B, C, H, W]."""
    h, w = x.shape[-2:]
    if name == "inpaint_box":
        return Mask(center_box_mask(h, w).to(x.device), "inpaint_box")
    if name == "inpaint_random":
        keep = torch.rand((x.shape[0], 1, h, w), generator=generator) >= missing
        return Mask(keep.to(x.dtype).to(x.device), "inpaint_random")
    if name in ("sr2", "sr4"):
        return AvgPool(int(name[-1]))
    if name == "deblur":
        return GaussianBlur()
    if name == "denoise":
        return Identity()
    raise ValueError(f"unknown linear task {name!r}")
