"""Regularizers on the source point x0 and the backward-blend initialization (docs/design.md
section 1)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .core.checks import check_x0
from .core.plan import make_plan
from .core.precision import compute_dtype, resolve_autocast
from .core.velocity import CheckedVelocity, Velocity
from .gradients.dispatch import run
from .ops import twins


class ChiPrior:
    """The χ_d prior: the negative log-likelihood of ``r = ||x0||`` under the chi distribution with
    d degrees of freedom (the norm of a d-dim standard Gaussian), up to a constant, per sample::

        R(x0) = weight * (0.5 * r^2 - (d - 1) * log r),    d = numel(x0[i]) or dim[i]

    It is minimized on the shell ``r = sqrt(d - 1)`` where Gaussian samples concentrate, keeping the
    optimized noise typical. ``R(x0)`` -> [B] for x0 [B, *S].

    ``dim``: the degrees of freedom when each x0[i] lives in a subspace of its tensor, an int for
    every sample or a ``[B]`` tensor, one per sample (molecules with padded atoms and zero centre
    of mass: ``d = (n - 1) * 3 + n * K`` for n real atoms, K features; docs/molecules.md).
    None (default): ``numel(x0[i])``. A per-sample prior follows :func:`optimize`'s shrinking
    active set through :meth:`rows`; the fused ``chi_prior`` op takes d from x0's width, so a
    prior with ``dim`` is evaluated unfused (autograd through ``__call__``).
    """

    def __init__(self, weight: float = 1.0, dim: int | Tensor | None = None):
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"ChiPrior weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.dim = _check_dim(dim)

    @property
    def fusable(self) -> bool:
        """True when d is every row's width, what the fused ``chi_prior`` op computes."""
        return self.dim is None

    def _d(self, flat: Tensor):
        """d for the rows of ``flat`` [B, D]: an int, or a [B] tensor in flat's dtype."""
        if self.dim is None:
            return flat.shape[1]
        if isinstance(self.dim, int):
            return self.dim
        if self.dim.shape[0] != flat.shape[0]:
            raise ValueError(f"ChiPrior has a dim for {self.dim.shape[0]} samples but x0 has "
                             f"{flat.shape[0]} rows (prior.rows(idx) selects samples)")
        return self.dim.to(device=flat.device, dtype=flat.dtype)

    def __call__(self, x0: Tensor) -> Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        d = self._d(flat)
        sq = flat.pow(2).sum(1)
        return self.weight * (0.5 * sq - 0.5 * (d - 1) * torch.log(sq))

    def grad(self, x0: Tensor) -> Tensor:
        """Closed-form gradient ``weight * (x0 - (d - 1) x0 / ||x0||^2)``, shape of x0."""
        flat = x0.reshape(x0.shape[0], -1)
        if self.fusable:
            return twins.chi_prior(flat, self.weight)[2].reshape(x0.shape)
        sq = flat.pow(2).sum(1, keepdim=True)
        d = self._d(flat)
        d = d[:, None] if isinstance(d, Tensor) else d
        return (self.weight * (1 - (d - 1) / sq) * flat).reshape(x0.shape)

    def rows(self, idx: Tensor | None) -> "ChiPrior":
        """The prior of samples ``idx`` (None: all): a per-sample ``dim`` indexed like x0's rows."""
        if idx is None or not isinstance(self.dim, Tensor):
            return self
        return ChiPrior(self.weight, self.dim[idx.to(self.dim.device)])

    def __repr__(self) -> str:
        if self.dim is None:
            return f"ChiPrior(weight={self.weight})"
        dim = self.dim if isinstance(self.dim, int) else f"<[{self.dim.shape[0]}] per sample>"
        return f"ChiPrior(weight={self.weight}, dim={dim})"


def _check_dim(dim):
    """ChiPrior's ``dim``: None, an int >= 1, or a 1-D tensor of finite values >= 1."""
    if dim is None:
        return None
    if isinstance(dim, int) and not isinstance(dim, bool):
        if dim < 1:
            raise ValueError(f"ChiPrior dim must be >= 1, got {dim}")
        return dim
    if (not isinstance(dim, Tensor) or dim.dim() != 1 or dim.numel() == 0
            or dim.dtype == torch.bool):
        got = list(dim.shape) if isinstance(dim, Tensor) else type(dim).__name__
        raise ValueError(f"ChiPrior dim must be None, an int or a [B] tensor, got {got}")
    if not bool(torch.isfinite(dim.double()).all()) or bool((dim < 1).any()):
        raise ValueError("ChiPrior dim must hold finite degrees of freedom >= 1 per sample")
    return dim.detach()


def backward_blend(velocity: Velocity, x1_guess: Tensor, *, alpha: float = 0.1, steps: int = 6,
                   solver: str = "midpoint", generator: torch.Generator | None = None,
                   backend: str | None = None, cond: Mapping[str, Any] | None = None,
                   time_grid: Sequence[float] | Tensor | None = None,
                   autocast: torch.dtype | None = None) -> Tensor:
    """Initial x0 for D-Flow from a data-space guess (e.g. the degraded observation).

    Solves the ODE backward (t = 1 -> 0) from ``x1_guess`` [B, *S] and blends the result with
    fresh noise: ``x0 = sqrt(alpha) * x0_back + sqrt(1 - alpha) * noise``. ``alpha`` in [0, 1]
    sets how much of the guess survives; noise is drawn with ``generator`` when given. ``cond``:
    the velocity's keyword arguments, as in :func:`~dflow_fast.solve`. ``time_grid``: the
    forward grid ``[t_0 = 0, ..., t_N = 1]`` of the solves that follow (e.g. a diffusion adapter's
    ``velocity.time_grid(steps)``), walked backward here instead of ``steps`` uniform steps.
    ``autocast``: the velocity under ``torch.autocast`` with that dtype, as in
    :func:`~dflow_fast.solve` (the blend itself stays in x1_guess's dtype).
    """
    check_x0(x1_guess, "x1_guess")
    low = resolve_autocast(autocast, x1_guess)
    u = CheckedVelocity(velocity, cond, x1_guess.shape[0], autocast=low)
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if time_grid is not None:  # walked from its data end back to its noise end
        time_grid = torch.as_tensor(time_grid, dtype=torch.float64).flip(0)
        steps = None
    plan = make_plan(solver, steps, 1.0, 0.0, time_grid, x1_guess, backend, autocast=low,
                     low=compute_dtype(velocity, low))
    with torch.no_grad():  # no graph: every gradient scheme is the same plain solve here
        x0_back = run(u, plan, x1_guess.detach(), "auto", (), False)
        # drawn on the generator's device (a CPU generator with CUDA data is common), then moved
        dev = generator.device if generator is not None else x1_guess.device
        noise = torch.randn(x1_guess.shape, generator=generator, dtype=x1_guess.dtype,
                            device=dev).to(x1_guess.device)
        return math.sqrt(alpha) * x0_back + math.sqrt(1.0 - alpha) * noise
