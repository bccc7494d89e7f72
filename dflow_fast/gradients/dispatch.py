"""Every gradient scheme is a chain of segments over the solve's steps (docs/design.md section 2).

One table maps a fixed scheme to the kind of its single segment; "auto" chooses a split of the
steps into graph, stored and reversible segments (:mod:`dflow_fast.gradients.auto`). A segment kind
is run by:

    graph        autograd records the steps (plain backprop; under float16 autocast run as
                 owned_graph, whose backward scales the cotangents, core/precision.py)
    owned_graph  the same graph, owned by auto's GraphSegment (falls back to the adjoint on OOM)
    stored       the discrete adjoint: AdjointSegment (plain solvers) or StoredSegment (reversible)
    reversible   ReversibleSegment: the backward rebuilds the states by the algebraic inverse

Every segment's gradient is exact for the computed x1, so any chain equals backprop up to rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.plan import REVERSIBLE, Plan
from ..core.precision import needs_scaling
from ..core.steps import State, advance, initial_state
from ..core.velocity import Velocity
from . import auto
from .adjoint import AdjointSegment
from .common import needs_grad
from .reversible import ReversibleSegment, StoredSegment

#: the segment kind a fixed scheme runs over all steps ("auto" chooses a split instead)
SEGMENT = {"backprop": "graph", "adjoint": "stored", "reversible": "reversible"}
KINDS = ("graph", "owned_graph", "stored", "reversible")


def segment(kind: str, u: Velocity, plan: Plan, k0: int, k1: int, state: State,
            params: tuple[Tensor, ...], guard: str | None) -> State:
    """Steps k0 .. k1-1 from ``state`` with the gradient ``kind`` (module doc); without a graph
    when nothing needs grad. ``guard``: the scheme named if the velocity uses an undiscovered
    tensor requiring grad, or None when the caller listed the parameters."""
    if kind not in KINDS:
        raise ValueError(f"unknown segment kind {kind!r}; one of {list(KINDS)}")
    if kind == "reversible" and not plan.reversible:  # make_plan refuses it earlier for users
        raise ValueError(f"gradient='reversible' needs a reversible solver, one of "
                         f"{list(REVERSIBLE)}, got {plan.solver!r}")
    if kind == "graph" and not needs_scaling(plan.low):
        return advance(u, plan, k0, k1, state)
    if not needs_grad(state, params):
        with torch.no_grad():
            return advance(u, plan, k0, k1, state)
    # float16 velocities: the graph is owned by GraphSegment, whose backward scales the
    # cotangents (core/precision.py) where autograd's own backward would let them underflow
    if kind in ("graph", "owned_graph"):
        return auto.GraphSegment.apply(u, plan, guard, k0, k1, len(state), *state, *params)
    if plan.reversible:
        fn = ReversibleSegment if kind == "reversible" else StoredSegment
        return fn.apply(u, plan, guard, k0, k1, *state, *params)
    return (AdjointSegment.apply(u, plan, guard, k0, k1, state[0], *params),)


def chain(u: Velocity, plan: Plan, x0: Tensor, segments: list[tuple[str, int, int]],
          params: tuple[Tensor, ...], guard: str | None) -> Tensor:
    """x1 by the segments ``[(kind, k0, k1), ...]`` that cover steps 0 .. N-1 in order."""
    state = initial_state(plan, x0)
    for kind, k0, k1 in segments:
        state = segment(kind, u, plan, k0, k1, state, params, guard)
    return state[0]


def run(u: Velocity, plan: Plan, x0: Tensor, gradient: str, params: tuple[Tensor, ...],
        guard: bool, memory_budget: float | None = None) -> Tensor:
    """The solve itself, after validation (shared by solve, optimize and backward_blend).
    ``guard``: whether ``params`` were discovered (then a tensor the discovery missed raises,
    naming ``gradient``) rather than listed by the caller."""
    name = gradient if guard else None
    if gradient != "auto":
        return chain(u, plan, x0, [(SEGMENT[gradient], 0, plan.steps)], params, name)
    if not needs_grad((x0,), params):
        with torch.no_grad():
            return advance(u, plan, 0, plan.steps, initial_state(plan, x0))[0]
    split, costs = auto.choose(u, plan, x0, params, memory_budget)
    while True:
        try:
            return chain(u, plan, x0, split.segments(), params, name)
        except torch.OutOfMemoryError:
            smaller = auto.shrink(plan, split, costs)
            if smaller is None:
                raise  # nothing left to give up
        # outside the except block, so the failed attempt's partial graph is already freed
        auto.retry(plan, split, smaller, costs, x0)
        split = smaller
