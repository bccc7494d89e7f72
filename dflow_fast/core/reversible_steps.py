"""The reversible solvers' sweeps: forward, algebraic inverse and exact discrete adjoint
(docs/design.md section 2; docs/reversible.md).

- ``"reversible_heun"`` (Kidger et al. 2021): state (y, yhat) and the carried evaluation
  f_k = u(t_k, yhat_k); one new evaluation per step::

      yhat' = 2y - yhat + h f;   f' = u(t', yhat');   y' = y + (h/2)(f + f')

- ``"reversible_euler"`` / ``"reversible_midpoint"``: McCallum & Foster's (2024) coupled
  reversible Runge-Kutta around the base step Psi_h(t, z) = h V_h(t, z) (V the base step's
  last-stage velocity), coupling lam in (0, 1); two base steps per step::

      y' = lam y + (1 - lam) z + Psi_h(t, z);      z' = z - Psi_{-h}(t', y')
      z  = z' + Psi_{-h}(t', y');                  y  = (y' - Psi_h(t, z) - (1 - lam) z) / lam

Both start at y = yhat = x0 (y = z = x0) and return x1 = y_N. The backward sweeps pull the
cotangents of a pair back over a step range, taking the evaluation points either from what the
forward stored or by rebuilding them with the inverse; the autograd.Functions that choose are in
:mod:`dflow_fast.gradients.reversible`. Shapes: every state, point and cotangent is ``[B, *S]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .autodiff import accumulate, vjp, zero_if_none
from .plan import Plan
from .velocity import Velocity

Pair = tuple[Tensor, Tensor]


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


def _vjp(out: Tensor, leaf: Tensor, params: tuple[Tensor, ...], cot: Tensor,
         low: torch.dtype | None) -> tuple[Tensor, list[Tensor | None]]:
    w, *gp = vjp(out, (leaf, *params), cot, low)
    return zero_if_none(w, cot), gp


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
        w, gp = _vjp(f, leaf, params, g, plan.low)
        acc = accumulate(acc, gp)
        hnext = plan.h(j - 2) if j - 1 > k0 else 0.0
        a_y, a_w, g = ops.heun_adjoint(a_y, a_w, w, plan.h(j - 1), hnext)
        point = yh_prev if rebuild else points[j - 1 - k0]  # yhat_{j-1}
        f_j = f.detach()
        f, leaf = _eval(lambda x: u(plan.t(j - 1), x), point)
        if rebuild:  # y_{j-1} and yhat_{j-2}
            y, yh_prev = ops.heun_step(y, point, f_j, f.detach(), -plan.h(j - 1), -hnext)
    # f = u(t_{k0}, yhat_{k0}) starts the segment; g is its cotangent
    w, gp = _vjp(f, leaf, params, g, plan.low)
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
        wb, gpb = _vjp(vb, leaf, params, a_z, plan.low)
        b = ops.axpy(a_y, wb, h)  # total cotangent of y_{k+1}: a_y + h J_b^T a_z
        if rebuild:
            z = ops.axpy(z, vb.detach(), -h)
        zk = z if rebuild else points[k - k0][0]
        vf, leaf = _eval(lambda x: base_velocity(u, plan, k, x, back=False), zk)
        if rebuild:
            y = ops.coupled_inverse(y, zk, vf.detach(), lam, h)
        wf, gpf = _vjp(vf, leaf, params, b, plan.low)
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
