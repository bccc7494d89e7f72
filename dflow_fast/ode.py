"""``solve``: x1 = ODESolve(velocity, x0) with a choice of gradient scheme, and the velocity
conventions (``velocity(t, x)``; :class:`ModelVelocity` for models called as ``model(x, t)``)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import auto, reversible
from .adjoint import adjoint_solve, find_params
from .backends import resolve
from .solvers import REVERSIBLE, Plan, Velocity, check_coupling, check_solver, make_grid, step

#: gradient schemes accepted by solve and optimize
GRADIENTS = ("adjoint", "backprop", "reversible", "auto")


class ModelVelocity(nn.Module):
    """Adapts a model called as ``model(x, t)`` with ``t`` of shape [B] to ``velocity(t, x)``.

    ``t`` arrives as a 0-dim tensor (or [B]); it is broadcast to [B] for the model.
    """

    def __init__(self, model: nn.Module | Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model(x, t.expand(x.shape[0]) if t.dim() == 0 else t)


class CheckedVelocity:
    """Calls the user's velocity, checks its output against x, and counts evaluations.

    ``calls`` counts batched calls, ``rows`` the samples evaluated (sum of batch sizes)."""

    def __init__(self, velocity: Velocity):
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x), got "
                            f"{type(velocity).__name__}")
        self.velocity = velocity
        self.calls = 0
        self.rows = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.velocity(t, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"velocity must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"velocity(t, x) must return a tensor like x: x is {tuple(x.shape)} {x.dtype} on "
                f"{x.device}, the velocity returned {tuple(out.shape)} {out.dtype} on {out.device}")
        self.calls += 1
        self.rows += x.shape[0]
        return out


def check_x0(x0: Tensor, name: str = "x0") -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x0.dtype}")
    if x0.dim() < 1 or x0.shape[0] < 1:
        raise ValueError(f"{name} must have shape [B, *S] with B >= 1, got {tuple(x0.shape)}")
    finite = torch.isfinite(x0.detach())  # detached: isfinite would otherwise save x0 for backward
    if not bool(finite.all()):
        bad = (~finite.reshape(x0.shape[0], -1)).any(1).nonzero().flatten()
        raise ValueError(f"{name} has non-finite entries in sample(s) {bad.tolist()[:10]}")


def check_gradient(gradient: str, memory_budget: float | None = None) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; choose one of {list(GRADIENTS)}")
    if memory_budget is None:
        return
    if gradient != "auto":
        raise ValueError(f"memory_budget applies to gradient='auto' only, got "
                         f"gradient={gradient!r}")
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
            or math.isnan(memory_budget) or memory_budget < 0):
        raise ValueError(f"memory_budget must be a number of bytes >= 0 (math.inf allowed), "
                         f"got {memory_budget!r}")


def make_plan(solver: str, steps: int | None, t0: float, t1: float,
              time_grid: Sequence[float] | Tensor | None, like: Tensor,
              backend: str | None = None, *, gradient: str | None = None,
              coupling: float | None = None) -> Plan:
    check_solver(solver)
    if gradient == "reversible" and solver not in REVERSIBLE:
        raise ValueError(f"gradient='reversible' needs a reversible solver, one of "
                         f"{list(REVERSIBLE)}: solver {solver!r} has no algebraic inverse (use "
                         f"gradient='adjoint' or 'auto' with it)")
    coupling = check_coupling(solver, coupling)
    grid = make_grid(steps, t0, t1, time_grid)
    return Plan.build(solver, grid, like, resolve(backend, like.device), coupling)


#: how each gradient scheme maps onto a reversible solver's segment kinds
_REVERSIBLE_KIND = {"backprop": "graph", "adjoint": "stored", "reversible": "reversible"}


def run(u: Velocity, plan: Plan, x0: Tensor, gradient: str, params: tuple[Tensor, ...],
        guard: bool, memory_budget: float | None = None) -> Tensor:
    """The solve itself, after validation (shared by solve, optimize and backward_blend)."""
    if gradient == "auto":
        return auto.auto_solve(u, plan, x0, params, guard, memory_budget)
    if plan.reversible:
        pair = reversible.segment(_REVERSIBLE_KIND[gradient], u, plan, 0, plan.steps, (x0, x0),
                                  params, guard)
        return pair[0]
    if gradient == "reversible":  # validated by make_plan; kept for direct callers of run
        raise ValueError(f"gradient='reversible' needs a reversible solver, one of "
                         f"{list(REVERSIBLE)}, got {plan.solver!r}")
    if gradient == "adjoint":
        return adjoint_solve(u, plan, x0, params, guard)
    x = x0  # "backprop": autograd records the unrolled loop
    for k in range(plan.steps):
        x = step(u, plan, k, x)
    return x


def solve(velocity: Velocity, x0: Tensor, *, steps: int | None = None, solver: str = "midpoint",
          gradient: str = "adjoint", t0: float = 0.0, t1: float = 1.0,
          time_grid: Sequence[float] | Tensor | None = None,
          params: Iterable[Tensor] | None = None, backend: str | None = None,
          coupling: float | None = None, memory_budget: float | None = None) -> Tensor:
    """Integrate ``dx/dt = velocity(t, x)`` from ``x0`` with a fixed-step solver.

    Args:
        velocity: ``velocity(t, x) -> [B, *S]``; ``t`` is a 0-dim tensor on x's device and dtype.
        x0: ``[B, *S]`` start state at ``t0``.
        steps: number of uniform steps from ``t0`` to ``t1`` (or give ``time_grid``).
        solver: ``"euler"`` or ``"midpoint"`` (the plain sampler), or a reversible solver:
            ``"reversible_heun"`` (Kidger et al. 2021; N+1 evaluations), ``"reversible_euler"``
            or ``"reversible_midpoint"`` (McCallum & Foster 2024; 2N resp. 4N evaluations).
            The reversible solvers discretize the flow differently from the plain sampler: same
            model, slightly different x1 (docs/reversible.md).
        gradient: ``"adjoint"`` (exact discrete adjoint; stores only the N states, with midpoint
            also their first-stage velocities, and recomputes one network evaluation at a time in
            the backward sweep), ``"backprop"`` (autograd through the unrolled loop),
            ``"reversible"`` (reversible solvers only: stores nothing per step, the backward
            rebuilds the states by the algebraic inverse; warns with
            :class:`~dflow_fast.reversible.ReconstructionWarning` if they drift), or ``"auto"``
            (keeps the graph of as many steps as ``memory_budget`` allows, recomputes the rest;
            see :mod:`dflow_fast.auto`). All are exact gradients of the computed x1.
        t0, t1: integration interval; ``t0 > t1`` integrates backward in time.
        time_grid: 1-D strictly monotone grid ``[t_0, ..., t_N]``, overriding ``t0``/``t1``.
        params: with ``"adjoint"``, ``"reversible"`` or ``"auto"``, the tensors besides x0 that
            receive gradients. ``None`` (default) discovers them: parameters of an nn.Module
            velocity and tensors requiring grad in its closure or named globals; a tensor it
            cannot discover raises in the backward rather than losing its gradient. An explicit list (``[]`` for x0 only) is
            taken as is and everything else is a constant: pass ``params=[]`` when only x0's
            gradient is wanted from a model whose weights require grad, so the backward sweep
            does not compute weight gradients nobody asked for.
        backend: ``"auto"`` (default: ``$DFLOW_FAST_BACKEND`` or the fastest available),
            ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``: who runs the solver's state
            algebra (see :mod:`dflow_fast.backends`).
        coupling: lambda in (0, 1) of ``"reversible_euler"``/``"reversible_midpoint"`` (default
            :data:`~dflow_fast.solvers.DEFAULT_COUPLING`); an error for other solvers.
        memory_budget: with ``"auto"``, bytes the solve may keep for its backward (graphs and
            stored states). Default: on CUDA half the free device memory, on the CPU
            :data:`~dflow_fast.auto.DEFAULT_CPU_BUDGET` (2 GiB). ``0`` gives the adjoint's memory
            (or the reversible sweep's for a reversible solver), ``math.inf`` backprop's.

    Returns:
        x1: ``[B, *S]``, the state at the end of the grid.
    """
    check_x0(x0)
    check_gradient(gradient, memory_budget)
    plan = make_plan(solver, steps, t0, t1, time_grid, x0, backend, gradient=gradient,
                     coupling=coupling)
    if params is None:
        found, guard = (find_params(velocity) if gradient != "backprop" else ()), True
    else:
        found, guard = tuple(params), False
        for p in found:
            if not isinstance(p, Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
    return run(CheckedVelocity(velocity), plan, x0, gradient, found, guard=guard,
               memory_budget=memory_budget)
