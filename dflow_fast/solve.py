"""``solve``: x1 = ODESolve(velocity, x0) with a choice of gradient scheme: validate, plan,
dispatch (:func:`dflow_fast.gradients.dispatch.run`)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .core.checks import check_gradient, check_params, check_x0
from .core.cond import grad_tensors
from .core.plan import make_plan
from .core.precision import compute_dtype, needs_scaling, resolve_autocast
from .core.velocity import CheckedVelocity, Velocity
from .gradients.common import find_params
from .gradients.dispatch import run


def solve(velocity: Velocity, x0: Tensor, *, steps: int | None = None, solver: str = "midpoint",
          gradient: str = "auto", t0: float = 0.0, t1: float = 1.0,
          time_grid: Sequence[float] | Tensor | None = None,
          params: Iterable[Tensor] | None = None, backend: str | None = None,
          coupling: float | None = None, memory_budget: float | None = None,
          cond: Mapping[str, Any] | None = None,
          autocast: torch.dtype | None = None) -> Tensor:
    """Integrate ``dx/dt = velocity(t, x)`` from ``x0`` with a fixed-step solver.

    Args:
        velocity: ``velocity(t, x, **cond) -> [B, *S]``; ``t`` is a 0-dim tensor on x's device
            and dtype.
        x0: ``[B, *S]`` start state at ``t0``.
        steps: number of uniform steps from ``t0`` to ``t1`` (or give ``time_grid``).
        solver: ``"euler"`` or ``"midpoint"`` (the plain sampler), or a reversible solver:
            ``"reversible_heun"`` (Kidger et al. 2021; N+1 evaluations), ``"reversible_euler"``
            or ``"reversible_midpoint"`` (McCallum & Foster 2024; 2N resp. 4N evaluations).
            The reversible solvers discretize the flow differently from the plain sampler: same
            model, slightly different x1 (docs/reversible.md).
        gradient: ``"auto"`` (default: keeps the graph of as many steps as ``memory_budget``
            allows, which is backprop where memory is plentiful, and recomputes the rest like the
            adjoint; the bytes of a step's graph are measured once per velocity and cached, see
            :mod:`dflow_fast.gradients.auto`), ``"adjoint"`` (exact discrete adjoint; stores only
            the N states, with midpoint also their first-stage velocities, and recomputes one
            network evaluation at a time in the backward sweep), ``"backprop"`` (autograd
            through the unrolled loop), or ``"reversible"`` (reversible solvers only: stores
            nothing per step, the backward rebuilds the states by the algebraic inverse; warns
            with :class:`~dflow_fast.ReconstructionWarning` if they drift). All are exact
            gradients of the computed x1.
        t0, t1: integration interval; ``t0 > t1`` integrates backward in time.
        time_grid: 1-D strictly monotone grid ``[t_0, ..., t_N]``, overriding ``t0``/``t1``.
        params: with ``"adjoint"``, ``"reversible"`` or ``"auto"``, the tensors besides x0 that
            receive gradients. ``None`` (default) discovers them: parameters of an nn.Module
            velocity and tensors requiring grad in its closure or named globals; a tensor it
            cannot discover raises in the backward rather than losing its gradient. An explicit list (``[]`` for x0 only) is
            taken as is and everything else is a constant: pass ``params=[]`` when only x0's
            gradient is wanted from a model whose weights require grad, so the backward sweep
            does not compute weight gradients nobody asked for.
        backend: ``"auto"`` (default: ``$DFLOW_FAST_BACKEND``, else the compiled backend that loads),
            ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``: who runs the solver's state
            algebra (see :mod:`dflow_fast.ops.registry`).
        coupling: lambda in (0, 1) of ``"reversible_euler"``/``"reversible_midpoint"`` (default
            :data:`~dflow_fast.core.plan.DEFAULT_COUPLING`); an error for other solvers.
        memory_budget: with ``"auto"``, bytes the solve may keep for its backward (graphs and
            stored states). Default: on CUDA half the free device memory, on the CPU
            :data:`~dflow_fast.gradients.auto.DEFAULT_CPU_BUDGET` (2 GiB). ``0`` gives the adjoint's memory
            (or the reversible sweep's for a reversible solver), ``math.inf`` backprop's.
        cond: keyword arguments of the velocity, ``velocity(t, x, **cond)``: a tensor whose first
            dimension is B is per-sample, anything else (or a value wrapped in
            :class:`~dflow_fast.Shared`) is passed unchanged (:mod:`dflow_fast.core.cond`).
            Tensors in it that require grad receive gradients under every scheme.
        autocast: ``None`` (default), ``torch.bfloat16`` or ``torch.float16``: the velocity runs
            under ``torch.autocast`` for x's device type with that dtype (at every call, the
            backward sweeps' recomputations included) and its output is cast back; the states,
            the solver's updates and the cotangents stay in x0's dtype, which must be float32.
            float16 scales the cotangents of the backward so they do not underflow
            (:mod:`dflow_fast.core.precision`). ``None`` inside a caller's ``torch.autocast``
            region for x's device type takes that region's dtype.

    Returns:
        x1: ``[B, *S]``, the state at the end of the grid.
    """
    check_x0(x0)
    check_gradient(gradient, memory_budget)
    low = resolve_autocast(autocast, x0)
    u = CheckedVelocity(velocity, cond, x0.shape[0], autocast=low)
    plan = make_plan(solver, steps, t0, t1, time_grid, x0, backend, gradient=gradient,
                     coupling=coupling, autocast=low, low=compute_dtype(velocity, low))
    if params is None:  # discovered; plain backprop needs none (autograd finds them itself),
        # but under float16 its graph is owned by a Function (gradients.dispatch), like auto's
        discover = gradient != "backprop" or needs_scaling(plan.low)
        found, guard = (_unique(find_params(velocity) + grad_tensors(u.cond))
                        if discover else ()), True
    else:
        found, guard = check_params(params), False
    return run(u, plan, x0, gradient, found, guard=guard, memory_budget=memory_budget)


def _unique(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple({id(t): t for t in tensors}.values())
