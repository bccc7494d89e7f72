"""The plain solvers' steps (Euler, midpoint), one step's vector-Jacobian product for the discrete
adjoint, and :func:`advance`: the one step loop every gradient scheme runs its forward with.

Notation (docs/design.md section 2): steps k = 0..N-1 on a grid t_0 .. t_N, h = t_{k+1} - t_k,
``a`` is the cotangent of x_{k+1}. States are [B, *S]; a reversible solver's state is the pair
(y, w), whose steps live in :mod:`dflow_fast.core.reversible_steps`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reversible_steps
from .autodiff import add_grads, vjp, zero_if_none
from .plan import Plan
from .velocity import Velocity

State = tuple[Tensor, ...]  # (x,) for a plain solver, (y, w) for a reversible one


def initial_state(plan: Plan, x0: Tensor) -> State:
    """The solver's state at t_0: (x0,), or (x0, x0) for a reversible solver."""
    return (x0, x0) if plan.reversible else (x0,)


def advance(u: Velocity, plan: Plan, k0: int, k1: int, state: State,
            store: Optional[list] = None) -> State:
    """Steps k0 .. k1-1 from ``state`` at k0; returns the state at k1. Runs under the caller's
    grad mode (autograd records the steps when it is enabled). ``store`` collects what the
    stored adjoint needs: plain solvers x_k per step, midpoint also v1_k = u(t_k, x_k) (so the
    backward rebuilds xm without a second graph); reversible solvers their evaluation points
    (:func:`~dflow_fast.core.reversible_steps.sweep`)."""
    if plan.reversible:
        return reversible_steps.sweep(u, plan, k0, k1, *state, store)
    x = state[0]
    for k in range(k0, k1):
        v1 = None
        if store is not None:
            store.append(x)
            if plan.solver == "midpoint":
                v1 = u(plan.t(k), x)
                store.append(v1)
        x = step(u, plan, k, x, v1)
    return (x,)


def step(u: Velocity, plan: Plan, k: int, x: Tensor, v1: Tensor | None = None) -> Tensor:
    """x_{k+1} from x_k. Runs under whatever grad mode the caller set. Midpoint: ``v1`` is the
    first stage's velocity u(t_k, x_k) when the caller already has it."""
    h, axpy = plan.h(k), plan.ops.axpy
    if plan.solver == "euler":
        return axpy(x, u(plan.t(k), x), h)
    if v1 is None:
        v1 = u(plan.t(k), x)
    xm = axpy(x, v1, 0.5 * h)
    return axpy(x, u(plan.tmid(k), xm), h)


def step_vjp(u: Velocity, plan: Plan, k: int, x: Tensor, a: Tensor,
             params: tuple[Tensor, ...], v1: Tensor | None = None
             ) -> tuple[Tensor, list[Tensor | None]]:
    """Pull the cotangent ``a`` of x_{k+1} back to x_k by recomputing step k with grad enabled.

    Returns ``(a_prev [B, *S], grads of params)``. Midpoint (docs/design.md section 2)::

        w2 = vjp(t + h/2, xm, h a);  w1 = vjp(t, x, (h/2) w2);  a_prev = a + w2 + w1

    one evaluation's graph at a time: ``v1 = u(t_k, x_k)`` [B, *S], stored by the forward sweep
    (recomputed without a graph when None), gives xm exactly as the forward built it; the second
    evaluation's graph is built, pulled back and freed before the first one's is rebuilt, so the
    peak is one network VJP instead of two. The parameter gradients of both evaluations are
    returned summed; None where unused.
    """
    h, ops = plan.h(k), plan.ops
    xd = x.detach()  # x may carry history (an x0 computed from a parameter): not walked into
    with torch.enable_grad():
        if plan.solver == "euler":
            xl = xd.requires_grad_(True)
            w, *gp = vjp(u(plan.t(k), xl), (xl, *params), a * h, plan.low)
            return ops.adjoint_euler(a, zero_if_none(w, a)), gp
        if v1 is None:
            with torch.no_grad():
                v1 = u(plan.t(k), xd)
        xm = ops.axpy(xd, v1.detach(), 0.5 * h).requires_grad_(True)
        w2, *gp2 = vjp(u(plan.tmid(k), xm), (xm, *params), a * h, plan.low)  # frees it
        w2 = zero_if_none(w2, a)
        xl = xd.detach().requires_grad_(True)
        w1, *gp1 = vjp(u(plan.t(k), xl), (xl, *params), w2 * (0.5 * h), plan.low)
    return (ops.adjoint_midpoint(a, w2, zero_if_none(w1, a)),
            [add_grads(p, q) for p, q in zip(gp2, gp1)])
