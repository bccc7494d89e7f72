"""Reversible solvers and their O(1)-memory gradient (DESIGN.md section 2).

Two families whose steps invert exactly in algebra, so that a backward sweep can rebuild the states
from the last one instead of storing them:

- ``"reversible_heun"`` (Kidger et al. 2021): state (y, yhat) and the carried evaluation
  f_k = u(t_k, yhat_k); one new evaluation per step::

      yhat' = 2y - yhat + h f;   f' = u(t', yhat');   y' = y + (h/2)(f + f')

- ``"reversible_euler"`` / ``"reversible_midpoint"``: McCallum & Foster's (2024) coupled
  reversible Runge-Kutta around the base step Psi_h(t, z) = h V_h(t, z) (V the base step's
  last-stage velocity), coupling lam in (0, 1); two base steps per step::

      y' = lam y + (1 - lam) z + Psi_h(t, z);      z' = z - Psi_{-h}(t', y')
      z  = z' + Psi_{-h}(t', y');                  y  = (y' - Psi_h(t, z) - (1 - lam) z) / lam

Both start at y = yhat = x0 (y = z = x0) and return x1 = y_N. They discretize dx/dt = u(t, x)
differently from the plain Euler/midpoint sampler (see docs/reversible.md).

Every solve is a chain of *segments* over step ranges [k0, k1), each mapping the state pair at k0
to the pair at k1. A segment's gradient is one of:

- graph: autograd records the steps (``sweep`` under grad mode; gradient="backprop");
- stored: the forward keeps only the evaluation points and the backward recomputes one step's graph
  at a time (:class:`_StoredSegment`, gradient="adjoint"): exact, memory linear in steps;
- reversible: the forward keeps only the final pair (and references to the input pair, to measure
  the reconstruction drift) and the backward rebuilds every point by the algebraic inverse
  (:class:`_ReversibleSegment`, gradient="reversible"): memory constant in steps.

Stored and reversible backward sweeps share one code path per family: they differ only in where
the evaluation points come from. Rebuilding reuses the evaluations the VJPs need anyway, so a
reversible gradient costs the same velocity evaluations as a stored one.

Shapes: every state, point and cotangent is ``[B, *S]``, like x0.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .adjoint import _LeafGuard, accumulate, needs_grad, scatter
from .solvers import REVERSIBLE, Plan, Velocity

Pair = tuple[Tensor, Tensor]


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
    through a network, DESIGN.md section 6), float16 3.1e-2, bfloat16 8.8e-2."""
    if dtype in DRIFT_TOLERANCE:
        return DRIFT_TOLERANCE[dtype]
    return math.sqrt(torch.finfo(dtype).eps)


# ---- forward sweeps ------------------------------------------------------------------------------

def base_velocity(u: Velocity, plan: Plan, k: int, x: Tensor, back: bool) -> Tensor:
    """V with Psi(x) = h V(x) for the base step of a coupled solver at step k: forward from t_k
    (back=False, Psi_h(t_k, x)) or backward from t_{k+1} (back=True, Psi_{-h}(t_{k+1}, x) =
    -h V). Midpoint's two stages stay connected, so one VJP of V covers the whole base step."""
    h = -plan.h(k) if back else plan.h(k)
    ts = plan.t(k + 1) if back else plan.t(k)
    if plan.base == "euler":
        return u(ts, x)
    xm = plan.ops.axpy(x, u(ts, x), 0.5 * h)
    return u(plan.tmid(k), xm)  # t_k + h/2 == t_{k+1} - h/2


def _heun_sweep(u: Velocity, plan: Plan, k0: int, k1: int, y: Tensor, yhat: Tensor,
                store: Optional[list] = None) -> Pair:
    ops = plan.ops
    f = u(plan.t(k0), yhat)
    if store is not None:
        store.append(yhat)
    yh = ops.heun_predict(y, yhat, f, plan.h(k0))
    for n in range(k0 + 1, k1 + 1):
        if store is not None:
            store.append(yh)  # the evaluation points yhat_k0 .. yhat_k1
        fn = u(plan.t(n), yh)
        y, yh_next = ops.heun_step(y, yh, f, fn, plan.h(n - 1), plan.h(n) if n < k1 else 0.0)
        if n == k1:
            return y, yh
        yh, f = yh_next, fn
    raise AssertionError("empty segment")


def _coupled_sweep(u: Velocity, plan: Plan, k0: int, k1: int, y: Tensor, z: Tensor,
                   store: Optional[list] = None) -> Pair:
    ops, lam = plan.ops, plan.coupling
    for k in range(k0, k1):
        h = plan.h(k)
        y1 = ops.coupled_forward(y, z, base_velocity(u, plan, k, z, back=False), lam, h)
        if store is not None:
            store.append((z, y1))  # the base steps' starting points z_k, y_{k+1}
        z = ops.axpy(z, base_velocity(u, plan, k, y1, back=True), h)  # z - Psi_{-h} = z + h V
        y = y1
    return y, z


def sweep(u: Velocity, plan: Plan, k0: int, k1: int, y: Tensor, w: Tensor,
          store: Optional[list] = None) -> Pair:
    """Steps k0 .. k1-1 of a reversible solver from the pair (y_{k0}, w_{k0}) (w = yhat or z);
    autograd records them when grad is enabled. ``store`` collects the evaluation points the
    stored backward needs (Heun: yhat_{k0} .. yhat_{k1}; coupled: (z_k, y_{k+1}) per step)."""
    if plan.solver == "reversible_heun":
        return _heun_sweep(u, plan, k0, k1, y, w, store)
    return _coupled_sweep(u, plan, k0, k1, y, w, store)


@torch.no_grad()
def inverse_sweep(u: Velocity, plan: Plan, k0: int, k1: int, y: Tensor, w: Tensor) -> Pair:
    """The pair at k0 rebuilt from the pair at k1 by the algebraic inverse, with the same
    operations (and so the same rounding) as the reversible backward sweep."""
    ops = plan.ops
    if plan.solver == "reversible_heun":
        f = u(plan.t(k1), w)
        yh = ops.heun_predict(y, w, f, -plan.h(k1 - 1))
        for j in range(k1 - 1, k0 - 1, -1):
            fj = u(plan.t(j), yh)
            y, yh_next = ops.heun_step(y, yh, f, fj, -plan.h(j), -plan.h(j - 1) if j > k0 else 0.0)
            if j == k0:
                return y, yh
            yh, f = yh_next, fj
    lam = plan.coupling
    for k in range(k1 - 1, k0 - 1, -1):
        h = plan.h(k)
        w = ops.axpy(w, base_velocity(u, plan, k, y, back=True), -h)
        y = ops.coupled_inverse(y, w, base_velocity(u, plan, k, w, back=False), lam, h)
    return y, w


# ---- backward sweeps -----------------------------------------------------------------------------

def _eval(fn, x: Tensor) -> tuple[Tensor, Tensor]:
    """fn(leaf) with grad enabled on a detached leaf of x: (output with its graph, leaf)."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return fn(leaf), leaf


def _vjp(out: Tensor, leaf: Tensor, params: tuple[Tensor, ...],
         cot: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    w, *gp = torch.autograd.grad(out, (leaf, *params), cot, allow_unused=True)
    # a velocity that ignores x has no path to it: its VJP is zero
    return (torch.zeros_like(cot) if w is None else w), gp


def _heun_backward(u, plan: Plan, k0: int, k1: int, a_y: Tensor, a_w: Tensor, params,
                   points: Optional[Sequence[Tensor]], end: Optional[Pair]):
    """Cotangents of (y_{k1}, yhat_{k1}) pulled back to (y_{k0}, yhat_{k0}). Points come from
    ``points`` (yhat_{k0} .. yhat_{k1}) or are rebuilt from ``end`` = (y_{k1}, yhat_{k1}). One
    evaluation with grad per point; its value also drives the rebuild, its graph one VJP."""
    ops, rebuild = plan.ops, points is None
    acc: list[Tensor | None] = [None] * len(params)
    if rebuild:
        y, yh = end
    else:
        yh = points[-1]
    f, leaf = _eval(lambda x: u(plan.t(k1), x), yh)
    if rebuild:
        yh_prev = ops.heun_predict(y, yh, f.detach(), -plan.h(k1 - 1))
    g = a_y * (0.5 * plan.h(k1 - 1))  # f_{k1} is internal to the segment: its own cotangent is 0
    for j in range(k1, k0, -1):  # the VJP of step j-1, whose evaluation is f_j = u(t_j, yhat_j)
        w, gp = _vjp(f, leaf, params, g)
        acc = accumulate(acc, gp)
        hnext = plan.h(j - 2) if j - 1 > k0 else 0.0
        a_y, a_w, g = ops.heun_adjoint(a_y, a_w, w, plan.h(j - 1), hnext)
        point = yh_prev if rebuild else points[j - 1 - k0]  # yhat_{j-1}
        f_j = f.detach()
        f, leaf = _eval(lambda x: u(plan.t(j - 1), x), point)
        if rebuild:  # y_{j-1} and yhat_{j-2}
            y, yh_prev = ops.heun_step(y, point, f_j, f.detach(), -plan.h(j - 1), -hnext)
    # f = u(t_{k0}, yhat_{k0}) starts the segment; g is its cotangent
    w, gp = _vjp(f, leaf, params, g)
    acc = accumulate(acc, gp)
    a_w = ops.adjoint_euler(a_w, w)  # a + w
    return a_y, a_w, acc, ((y, leaf.detach()) if rebuild else None)


def _coupled_backward(u, plan: Plan, k0: int, k1: int, a_y: Tensor, a_z: Tensor, params,
                      points: Optional[Sequence[Pair]], end: Optional[Pair]):
    """Cotangents of (y_{k1}, z_{k1}) pulled back to (y_{k0}, z_{k0}); points (z_k, y_{k+1}) per
    step from ``points`` or rebuilt from ``end``. Per step: the backward base step at y_{k+1}
    (VJP, and z_k = z_{k+1} - h V_b), then the forward base step at z_k (VJP, and y_k)."""
    ops, lam, rebuild = plan.ops, plan.coupling, points is None
    acc: list[Tensor | None] = [None] * len(params)
    if rebuild:
        y, z = end
    for k in range(k1 - 1, k0 - 1, -1):
        h = plan.h(k)
        y1 = y if rebuild else points[k - k0][1]
        vb, leaf = _eval(lambda x: base_velocity(u, plan, k, x, back=True), y1)
        wb, gpb = _vjp(vb, leaf, params, a_z)
        b = ops.axpy(a_y, wb, h)  # total cotangent of y_{k+1}: a_y + h J_b^T a_z
        if rebuild:
            z = ops.axpy(z, vb.detach(), -h)
        zk = z if rebuild else points[k - k0][0]
        vf, leaf = _eval(lambda x: base_velocity(u, plan, k, x, back=False), zk)
        if rebuild:
            y = ops.coupled_inverse(y, zk, vf.detach(), lam, h)
        wf, gpf = _vjp(vf, leaf, params, b)
        a_y, a_z = ops.coupled_adjoint(a_z, b, wf, lam, h)
        if params:  # both VJPs ran with the cotangent divided by h
            acc = accumulate(acc, [_scaled_sum(p, q, h) for p, q in zip(gpb, gpf)])
    return a_y, a_z, acc, ((y, z) if rebuild else None)


def _scaled_sum(p: Tensor | None, q: Tensor | None, h: float) -> Tensor | None:
    if p is None:
        return None if q is None else h * q
    return h * p if q is None else h * (p + q)


def backward_sweep(u, plan: Plan, k0: int, k1: int, a_y: Tensor, a_w: Tensor,
                   params: tuple[Tensor, ...], *, points=None, end: Optional[Pair] = None):
    """Pull the cotangents of the pair at k1 back to the pair at k0 (exact discrete adjoint of
    :func:`sweep`). Returns ``(a_y, a_w, param grads, rebuilt pair at k0 or None)``."""
    fn = _heun_backward if plan.solver == "reversible_heun" else _coupled_backward
    return fn(u, plan, k0, k1, a_y, a_w, params, points, end)


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

class _ReversibleSegment(torch.autograd.Function):
    """(y_{k1}, w_{k1}) from (y_{k0}, w_{k0}); the backward rebuilds the states by the inverse.
    Inputs: velocity, plan, guard, k0, k1, y, w, then the velocity's parameters. Saves the output
    pair plus the input pair (references, to measure the drift): constant in the number of steps."""

    @staticmethod
    def forward(ctx, u, plan: Plan, guard: bool, k0: int, k1: int, y: Tensor, w: Tensor,
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
        u = _LeafGuard(ctx.u, ctx.params, "reversible") if ctx.guard else ctx.u
        a_y, a_w, acc, rebuilt = backward_sweep(u, ctx.plan, *ctx.k, a_y, a_w, params,
                                                end=(y1, w1))
        _check_drift(rebuilt, (y0, w0), ctx.plan, *ctx.k)
        return ((None,) * 5 + (a_y if ctx.needs_input_grad[5] else None,
                               a_w if ctx.needs_input_grad[6] else None, *scatter(acc, need)))


class _StoredSegment(torch.autograd.Function):
    """Like :class:`_ReversibleSegment`, but the forward keeps the evaluation points (Heun: k1-k0+1
    states; coupled: 2 (k1-k0)) and the backward recomputes from them: exact whatever the
    precision, memory linear in steps (gradient="adjoint" for a reversible solver)."""

    @staticmethod
    def forward(ctx, u, plan: Plan, guard: bool, k0: int, k1: int, y: Tensor, w: Tensor,
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
        u = _LeafGuard(ctx.u, ctx.params) if ctx.guard else ctx.u
        a_y, a_w, acc, _ = backward_sweep(u, ctx.plan, *ctx.k, a_y, a_w, params, points=points)
        return ((None,) * 5 + (a_y if ctx.needs_input_grad[5] else None,
                               a_w if ctx.needs_input_grad[6] else None, *scatter(acc, need)))


def segment(kind: str, u, plan: Plan, k0: int, k1: int, pair: Pair, params: tuple[Tensor, ...],
            guard: bool) -> Pair:
    """Steps k0 .. k1-1 from ``pair`` with the gradient ``kind``: "graph", "stored" or
    "reversible"; without a graph when nothing needs grad."""
    y, w = pair
    if kind == "graph":
        return sweep(u, plan, k0, k1, y, w)
    if not (needs_grad(y, params) or needs_grad(w, ())):
        with torch.no_grad():
            return sweep(u, plan, k0, k1, y, w)
    fn = _ReversibleSegment if kind == "reversible" else _StoredSegment
    return fn.apply(u, plan, guard, k0, k1, y, w, *params)


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
    from .ode import CheckedVelocity, check_x0, make_plan

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

