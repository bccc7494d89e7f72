"""Regularizers on the source point x0 and the backward-blend initialization (docs/design.md
section 1)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .core.checks import check_x0
from .core.plan import make_plan
from .core.velocity import CheckedVelocity, Velocity
from .gradients.dispatch import run
from .ops import twins


class ChiPrior:
    """The χ_d prior: the negative log-likelihood of ``r = ||x0||`` under the chi distribution with
    d degrees of freedom (the norm of a d-dim standard Gaussian), up to a constant, per sample::

        R(x0) = weight * (0.5 * r^2 - (d - 1) * log r),    d = numel(x0[i])

    It is minimized on the shell ``r = sqrt(d - 1)`` where Gaussian samples concentrate, keeping the
    optimized noise typical. ``R(x0)`` -> [B] for x0 [B, *S].
    """

    def __init__(self, weight: float = 1.0):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"ChiPrior weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)

    def __call__(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        d = flat.shape[1]
        sq = flat.pow(2).sum(1)
        return self.weight * (0.5 * sq - 0.5 * (d - 1) * torch.log(sq))

    def grad(self, x0: Tensor) -> Tensor:
        """Closed-form gradient ``weight * (x0 - (d - 1) x0 / ||x0||^2)``, shape of x0."""
        return twins.chi_prior(x0.reshape(x0.shape[0], -1), self.weight)[2].reshape(x0.shape)

    def __repr__(self) -> str:
        return f"ChiPrior(weight={self.weight})"


def backward_blend(velocity: Velocity, x1_guess: Tensor, *, alpha: float = 0.1, steps: int = 6,
                   solver: str = "midpoint", generator: torch.Generator | None = None,
                   backend: str | None = None, cond: Mapping[str, Any] | None = None) -> Tensor:
    """Initial x0 for D-Flow from a data-space guess (e.g. the degraded observation).

    Solves the ODE backward (t = 1 -> 0) from ``x1_guess`` [B, *S] and blends the result with
    fresh noise: ``x0 = sqrt(alpha) * x0_back + sqrt(1 - alpha) * noise``. ``alpha`` in [0, 1]
    sets how much of the guess survives; noise is drawn with ``generator`` when given. ``cond``:
    the velocity's keyword arguments, as in :func:`~dflow_fast.solve`.
    """
    check_x0(x1_guess, "x1_guess")
    u = CheckedVelocity(velocity, cond, x1_guess.shape[0])
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    plan = make_plan(solver, steps, 1.0, 0.0, None, x1_guess, backend)
    with torch.no_grad():
        x0_back = run(u, plan, x1_guess.detach(), "backprop", (), False)
        # drawn on the generator's device (a CPU generator with CUDA data is common), then moved
        dev = generator.device if generator is not None else x1_guess.device
        noise = torch.randn(x1_guess.shape, generator=generator, dtype=x1_guess.dtype,
                            device=dev).to(x1_guess.device)
        return math.sqrt(alpha) * x0_back + math.sqrt(1.0 - alpha) * noise
