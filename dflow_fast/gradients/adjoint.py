"""Exact discrete adjoint of the plain solvers (Euler, midpoint; docs/design.md section 2).

The forward runs without an autograd graph and keeps only the states x_k (midpoint: with their
first-stage velocities); the backward sweep walks k = k1-1 .. k0, recomputes step k with grad
enabled and pulls the cotangent back with one vector-Jacobian product per velocity evaluation.
The result equals autograd through the unrolled loop up to rounding, at the activation memory of
one evaluation.

Gradients reach x0 and the tensors the velocity depends on that require grad; those are inputs of
the Function (found by :func:`~dflow_fast.gradients.common.find_params` unless listed).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.autodiff import accumulate
from ..core.plan import Plan
from ..core.steps import advance, step_vjp
from ..core.velocity import Velocity
from .common import guarded, scatter


def saved_per_step(plan: Plan) -> int:
    """Tensors of the state's shape the adjoint stores per step: x_k, and for midpoint also its
    first-stage velocity u(t_k, x_k), which lets the backward hold one evaluation's graph at a
    time (see core.steps.step_vjp) at the price of one more state per step."""
    return 2 if plan.solver == "midpoint" else 1


def forward_states(u: Velocity, plan: Plan, k0: int, k1: int,
                   x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Steps k0 .. k1-1 from x = x_{k0}; returns (saved, x_{k1}): saved = [x_{k0} .. x_{k1-1}]
    (Euler) or [x_{k0}, v1_{k0}, .., x_{k1-1}, v1_{k1-1}] (midpoint; v1_k = u(t_k, x_k))."""
    saved: list[Tensor] = []
    x1, = advance(u, plan, k0, k1, (x,), saved)
    return saved, x1


def adjoint_sweep(u: Velocity, plan: Plan, k0: int, k1: int, saved: list[Tensor], a: Tensor,
                  params: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor | None]]:
    """Pull the cotangent of x_{k1} back to x_{k0} with what :func:`forward_states` saved;
    returns (cotangent of x_{k0}, gradients of params)."""
    acc: list[Tensor | None] = [None] * len(params)
    per = saved_per_step(plan)
    for k in reversed(range(k0, k1)):
        i = (k - k0) * per
        a, gp = step_vjp(u, plan, k, saved[i], a, params, *saved[i + 1:i + per])
        acc = accumulate(acc, gp)
    return a, acc


class AdjointSegment(torch.autograd.Function):
    """x_{k1} = steps k0 .. k1-1 from x_{k0}, with the discrete-adjoint backward. Inputs:
    velocity, plan, guard (the scheme named by the leaf guard, or None), k0, k1, x_{k0} [B, *S],
    then the velocity's parameters."""

    @staticmethod
    def forward(ctx, u: Velocity, plan: Plan, guard: str | None, k0: int, k1: int, x0: Tensor,
                *params: Tensor):
        # autograd.Function.forward runs without a graph
        states, x = forward_states(u, plan, k0, k1, x0)
        # per step x_k (midpoint: and its first-stage velocity): the only memory that grows
        ctx.save_for_backward(*states)
        ctx.u, ctx.plan, ctx.guard, ctx.params, ctx.k = u, plan, guard, params, (k0, k1)
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, a: Tensor):
        need = ctx.needs_input_grad[6:]
        params = tuple(p for p, n in zip(ctx.params, need) if n)
        u = guarded(ctx.u, ctx.params, ctx.guard)
        a, acc = adjoint_sweep(u, ctx.plan, *ctx.k, list(ctx.saved_tensors), a, params)
        return (None,) * 5 + (a if ctx.needs_input_grad[5] else None, *scatter(acc, need))
