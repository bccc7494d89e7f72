"""Reversible solvers' gradients: the stored and the O(1)-memory reversible segment
(docs/design.md section 2; the sweeps themselves are in :mod:`dflow_fast.core.reversible_steps`).

The reversible solvers discretize dx/dt = u(t, x) differently from the plain Euler/midpoint
sampler (docs/reversible.md).

Every solve is a chain of *segments* over step ranges [k0, k1) (gradients.dispatch), each mapping
the state pair at k0 to the pair at k1. A reversible solver's segment gradient is one of:

- graph: autograd records the steps (gradient="backprop");
- stored: the forward keeps only the evaluation points and the backward recomputes one step's graph
  at a time (:class:`StoredSegment`, gradient="adjoint"): exact, memory linear in steps;
- reversible: the forward keeps only the final pair (and references to the input pair, to measure
  the reconstruction drift) and the backward rebuilds every point by the algebraic inverse
  (:class:`ReversibleSegment`, gradient="reversible"): memory constant in steps.

Stored and reversible backward sweeps share one code path per family: they differ only in where
the evaluation points come from. Rebuilding reuses the evaluations the VJPs need anyway, so a
reversible gradient costs the same velocity evaluations as a stored one.

Shapes: every state, point and cotangent is ``[B, *S]``, like x0.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.checks import check_x0
from ..core.plan import REVERSIBLE, Plan, make_plan
from ..core.reversible_steps import Pair, backward_sweep, inverse_sweep, sweep
from ..core.velocity import CheckedVelocity, Velocity
from .common import guarded, scatter


class ReconstructionWarning(UserWarning):
    """The states a reversible backward sweep rebuilt drifted from the true ones by more than
    :func:`drift_tolerance`: the gradient is that of a slightly different trajectory. Use more
    precision, a coupling closer to 1, fewer steps, or gradient="adjoint"."""


#: per-dtype overrides of the drift tolerance (see :func:`drift_tolerance`)
DRIFT_TOLERANCE: dict[torch.dtype, float] = {}


def drift_tolerance(dtype: torch.dtype) -> float:
    """Relative reconstruction drift above which a reversible backward warns: ``sqrt(eps)`` of the
    dtype (half of its significant digits lost) unless overridden in :data:`DRIFT_TOLERANCE`.
    float64 1.5e-8, float32 3.5e-4 (about the rounding level of an ordinary float32 gradient
    through a network, docs/design.md section 5), float16 3.1e-2, bfloat16 8.8e-2."""
    if dtype in DRIFT_TOLERANCE:
        return DRIFT_TOLERANCE[dtype]
    return math.sqrt(torch.finfo(dtype).eps)


def relative_drift(rebuilt: Pair, true: Pair) -> float:
    """max over samples and over the pair of ||rebuilt - true|| / ||true||, in float64."""
    worst = 0.0
    for r, t in zip(rebuilt, true):
        r, t = r.detach().double().flatten(1), t.detach().double().flatten(1)
        err = (r - t).norm(dim=1) / t.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        worst = max(worst, float(err.max()))
    return worst


def _check_drift(rebuilt: Pair, true: Pair, plan: Plan, k0: int, k1: int) -> None:
    drift = relative_drift(rebuilt, true)
    tol = drift_tolerance(true[0].dtype)
    if not drift <= tol:  # NaN warns too
        coupling = f", coupling {plan.coupling}" if plan.coupling is not None else ""
        warnings.warn(ReconstructionWarning(
            f"gradient='reversible': the backward sweep rebuilt the start of steps {k0}..{k1 - 1} "
            f"({plan.solver}{coupling}, {true[0].dtype}) with relative drift {drift:.3g} > "
            f"tolerance {tol:.3g}; the gradient belongs to a perturbed trajectory. Use a higher "
            f"precision, a coupling closer to 1, fewer steps, or gradient='adjoint'."),
            stacklevel=3)


# ---- autograd.Functions --------------------------------------------------------------------------

class ReversibleSegment(torch.autograd.Function):
    """(y_{k1}, w_{k1}) from (y_{k0}, w_{k0}); the backward rebuilds the states by the inverse.
    Inputs: velocity, plan, guard (scheme name or None), k0, k1, y, w, then the velocity's parameters. Saves the output
    pair plus the input pair (references, to measure the drift): constant in the number of steps."""

    @staticmethod
    def forward(ctx, u, plan: Plan, guard: str | None, k0: int, k1: int, y: Tensor, w: Tensor,
                *params: Tensor):
        y1, w1 = sweep(u, plan, k0, k1, y, w)
        ctx.save_for_backward(y1, w1, y, w)
        ctx.u, ctx.plan, ctx.guard, ctx.params, ctx.k = u, plan, guard, params, (k0, k1)
        return y1, w1

    @staticmethod
    @once_differentiable
    def backward(ctx, a_y: Tensor, a_w: Tensor):
        y1, w1, y0, w0 = ctx.saved_tensors
        need = ctx.needs_input_grad[7:]
        params = tuple(p for p, n in zip(ctx.params, need) if n)
        u = guarded(ctx.u, ctx.params, ctx.guard)
        a_y, a_w, acc, rebuilt = backward_sweep(u, ctx.plan, *ctx.k, a_y, a_w, params,
                                                end=(y1, w1))
        _check_drift(rebuilt, (y0, w0), ctx.plan, *ctx.k)
        return ((None,) * 5 + (a_y if ctx.needs_input_grad[5] else None,
                               a_w if ctx.needs_input_grad[6] else None, *scatter(acc, need)))


class StoredSegment(torch.autograd.Function):
    """Like :class:`ReversibleSegment`, but the forward keeps the evaluation points (Heun: k1-k0+1
    states; coupled: 2 (k1-k0)) and the backward recomputes from them: exact whatever the
    precision, memory linear in steps (gradient="adjoint" for a reversible solver)."""

    @staticmethod
    def forward(ctx, u, plan: Plan, guard: str | None, k0: int, k1: int, y: Tensor, w: Tensor,
                *params: Tensor):
        store: list = []
        y1, w1 = sweep(u, plan, k0, k1, y, w, store)
        flat = store if plan.solver == "reversible_heun" else [t for pr in store for t in pr]
        ctx.save_for_backward(*flat)
        ctx.u, ctx.plan, ctx.guard, ctx.params, ctx.k = u, plan, guard, params, (k0, k1)
        return y1, w1

    @staticmethod
    @once_differentiable
    def backward(ctx, a_y: Tensor, a_w: Tensor):
        flat = ctx.saved_tensors
        points = flat if ctx.plan.solver == "reversible_heun" else list(zip(flat[::2], flat[1::2]))
        need = ctx.needs_input_grad[7:]
        params = tuple(p for p, n in zip(ctx.params, need) if n)
        u = guarded(ctx.u, ctx.params, ctx.guard)
        a_y, a_w, acc, _ = backward_sweep(u, ctx.plan, *ctx.k, a_y, a_w, params, points=points)
        return ((None,) * 5 + (a_y if ctx.needs_input_grad[5] else None,
                               a_w if ctx.needs_input_grad[6] else None, *scatter(acc, need)))


def reconstruction_drift(velocity: Velocity, x0: Tensor, *, solver: str = "reversible_heun",
                         steps: int | None = None, coupling: float | None = None,
                         t0: float = 0.0, t1: float = 1.0, time_grid=None,
                         backend: str | None = None) -> Tensor:
    """How far the reversible backward sweep's rebuilt x0 lies from the true x0, per sample.

    Runs the forward solve and then the algebraic inverse (no gradients), exactly as
    ``solve(..., gradient="reversible")`` does in its backward. Returns ``[B]`` float64:
    ``max(||y_0 - x0||, ||w_0 - x0||) / ||x0||`` per sample, w = yhat or z. Compare with
    :func:`drift_tolerance`.
    """
    check_x0(x0)
    plan = make_plan(solver, steps, t0, t1, time_grid, x0, backend, coupling=coupling)
    if not plan.reversible:
        raise ValueError(f"reconstruction_drift needs a reversible solver, one of "
                         f"{list(REVERSIBLE)}; got {solver!r}")
    u = CheckedVelocity(velocity)
    with torch.no_grad():
        y, w = sweep(u, plan, 0, plan.steps, x0, x0)
        y0, w0 = inverse_sweep(u, plan, 0, plan.steps, y, w)
    x = x0.detach().double().flatten(1)
    den = x.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    errs = [(r.double().flatten(1) - x).norm(dim=1) / den for r in (y0, w0)]
    return torch.maximum(*errs)

