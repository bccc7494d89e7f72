"""Controlled-generation problems for D-Flow on images ``x [B, C, H, W]`` in ``[-1, 1]``.

A problem bundles what :func:`dflow_fast.optimize` and :func:`dflow_fast.backward_blend` need:
the per-sample ``cost(x1) -> [B]``, the observation ``y``, and a data-space ``guess`` to start
from. Linear inverse problems observe ``y = A x + sigma * noise`` and cost ``||A x1 - y||^2``;
their operators provide the adjoint ``A^T`` (tested: ``<A x, y> = <x, A^T y>``).

Tasks (``make(name, x, ...)``):
    ``inpaint_box``    a centered square hole covering the same fraction of the image as the
                       paper's 40x40 hole on 128x128 (9.8%): 9x9 on 28x28;
    ``inpaint_random`` random missing pixels (default 70%);
    ``sr2``, ``sr4``   super-resolution from x2 / x4 average pooling;
    ``deblur``         Gaussian blur (std 1.5 px, 9x9 kernel, zero padding);
    ``denoise``        additive Gaussian noise only;
    ``class``          class-conditional generation through a classifier (non-linear cost:
                       cross-entropy of the target label).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LINEAR_TASKS = ("inpaint_box", "inpaint_random", "sr2", "sr4", "deblur", "denoise")
TASKS = LINEAR_TASKS + ("class",)


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

    def __call__(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype).to(x.device).expand(c, 1, -1, -1)
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
class Problem:
    """One batch of problem instances, B of them.

    ``y``: the observation ([B, ...] for linear tasks, target labels [B] for ``class``);
    ``guess``: a data-space start [B, C, H, W] for backward_blend; ``display``: the observation
    shown as an image of x's size; ``cost(x1) -> [B]``; ``select(rows)``: the sub-batch.
    """

    name: str
    y: Tensor
    guess: Tensor
    display: Tensor
    operator: Optional[LinearOperator] = None
    sigma: float = 0.0
    classifier: Optional[Callable[[Tensor], Tensor]] = None

    def cost(self, x1: Tensor) -> Tensor:
        if self.operator is None:  # class-conditional: cross-entropy of the target label
            return F.cross_entropy(self.classifier(x1), self.y, reduction="none")
        return (self.operator(x1) - self.y).pow(2).flatten(1).sum(1)

    @property
    def noise_level(self) -> float | None:
        """The expected cost of the ground truth itself, ``m sigma^2`` with m the entries of one
        sample's observation (None for ``class``): a cost below it fits the noise. Pass it as
        ``optimize(..., stop_loss=problem.noise_level)`` (the discrepancy principle)."""
        if self.operator is None:
            return None
        return self.y[0].numel() * self.sigma ** 2

    def select(self, rows) -> "Problem":
        """The problem restricted to samples ``rows`` (e.g. one image for a per-image loop)."""
        op = self.operator
        if isinstance(op, Mask) and op.mask.shape[0] > 1:  # per-sample masks
            op = Mask(op.mask[rows], op.name)
        return Problem(self.name, self.y[rows], self.guess[rows], self.display[rows], op,
                       self.sigma, self.classifier)


def linear_problem(name: str, op: LinearOperator, x: Tensor, sigma: float,
                   generator: torch.Generator | None = None) -> Problem:
    """``y = A x + sigma * noise``; cost ``||A x1 - y||^2`` summed per sample."""
    ax = op(x)
    y = ax + sigma * torch.randn(ax.shape, generator=generator, dtype=x.dtype).to(x.device)
    guess = op.pseudo_inverse_guess(y).clamp(-1, 1)
    display = y if isinstance(op, Mask) else guess  # masked pixels show as 0 (mid-gray)
    return Problem(name, y, guess, display, op, sigma)


def class_problem(classifier: Callable[[Tensor], Tensor], labels: Tensor, shape,
                  dtype=torch.float32, device="cpu") -> Problem:
    """Class-conditional generation: ``cost = CE(classifier(x1), label)`` per sample. The guess is
    a blank image, so backward_blend starts from nearly pure noise."""
    blank = torch.zeros((len(labels), *shape), dtype=dtype, device=device)
    return Problem("class", labels.to(device), blank, blank, None, 0.0, classifier)


def make(name: str, x: Tensor, *, sigma: float = 0.05, missing: float = 0.7,
         generator: torch.Generator | None = None, classifier=None,
         labels: Tensor | None = None) -> Problem:
    """Build task ``name`` (see module docstring) on ground-truth images x [B, C, H, W]."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if name == "inpaint_box":
        op: LinearOperator = Mask(center_box_mask(h, w).to(x.device), "inpaint_box")
    elif name == "inpaint_random":
        keep = torch.rand((x.shape[0], 1, h, w), generator=generator) >= missing
        op = Mask(keep.to(x.dtype).to(x.device), "inpaint_random")
    elif name in ("sr2", "sr4"):
        op = AvgPool(int(name[-1]))
    elif name == "deblur":
        op = GaussianBlur()
    elif name == "denoise":
        op = Identity()
    else:
        if classifier is None or labels is None:
            raise ValueError("task 'class' needs classifier= and labels=")
        return class_problem(classifier, labels, x.shape[1:], x.dtype, x.device)
    return linear_problem(name, op, x, sigma, generator)
