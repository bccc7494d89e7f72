"""Exact discrete adjoint of the fixed-step solvers (DESIGN.md section 2).

The forward solve runs without an autograd graph and keeps only the states x_0 .. x_{N-1}; the
backward sweep walks k = N-1 .. 0, recomputes step k with grad enabled and pulls the cotangent back
with one vector-Jacobian product per velocity evaluation. The result equals autograd through the
unrolled loop up to rounding, at the activation memory of one step.

Gradients reach x0 and the tensors the velocity depends on that require grad. Those tensors must be
inputs of the autograd.Function, so they are discovered (:func:`find_params`) from an nn.Module
velocity, a bound method of one, a functools.partial, or a function's closure and the globals it
names, unless the caller lists them (``solve(..., params=[...])``). After discovery, the backward
sweep checks the first recomputed graph and raises if the velocity reached a tensor requiring grad
that was not discovered, instead of silently dropping its gradient.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .solvers import Plan, Velocity, step, step_vjp


def find_params(velocity: Any) -> tuple[Tensor, ...]:
    """Tensors requiring grad that ``velocity`` can reach, deduplicated, in discovery order."""
    return _reachable(velocity, lambda t: t.requires_grad, buffers=False)


def reachable_tensors(velocity: Any) -> tuple[Tensor, ...]:
    """Every tensor ``velocity`` can reach (weights and buffers whether or not they require grad,
    closed-over tensors): memory that exists before a solve and that a step's graph does not add
    when it saves them (gradient="auto" excludes them from its per-step estimate)."""
    return _reachable(velocity, lambda t: True, buffers=True)


def _reachable(velocity: Any, keep, buffers: bool) -> tuple[Tensor, ...]:
    found: dict[int, Tensor] = {}
    seen: set[int] = set()

    def add(t: Tensor) -> None:
        if keep(t):
            found.setdefault(id(t), t)

    def visit(obj: Any, depth: int) -> None:
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            add(obj)
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                add(p)
            if buffers:
                for b in obj.buffers():
                    add(b)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for o in obj:
                visit(o, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                visit(o, depth + 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            visit(obj.args, depth + 1)
            visit(obj.keywords, depth + 1)
        elif inspect.ismethod(obj):
            visit(obj.__self__, depth + 1)
            visit(obj.__func__, depth + 1)
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
            g = obj.__globals__
            for name in _global_names(obj.__code__):
                if name in g and not isinstance(g[name], (types.ModuleType, type)):
                    visit(g[name], depth + 1)
        elif callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, type):
            visit(vars(obj), depth + 1)  # a callable object holding tensors or modules

    visit(velocity, 0)
    return tuple(found.values())


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and lambdas
            names |= _global_names(const)
    return names


class _LeafGuard:
    """Wraps the velocity for the first recomputation of a backward sweep and raises if its
    graph reaches a tensor requiring grad that is not among the known inputs."""

    def __init__(self, u: Velocity, known: Iterable[Tensor], gradient: str = "adjoint"):
        self.u = u
        self.known = list(known)
        self.gradient = gradient
        self.checked = False

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.u(t, x)
        if not self.checked and out.grad_fn is not None:
            self.checked = True
            missing = _unknown_leaves(out, [x, *self.known])
            if missing:
                shapes = ", ".join(str(tuple(m.shape)) for m in missing[:5])
                raise RuntimeError(
                    f"gradient={self.gradient!r}: the velocity uses {len(missing)} tensor(s) "
                    f"requiring grad that were not found in its closure, globals or module "
                    f"parameters (shapes "
                    f"{shapes}); their gradients would be lost. Pass them as solve(..., "
                    f"params=[...]) or use gradient='backprop'.")
        return out


def _unknown_leaves(out: Tensor, known: list[Tensor]) -> list[Tensor]:
    known_ids = {id(t) for t in known if t.grad_fn is None}
    stop = {t.grad_fn for t in known if t.grad_fn is not None}
    stack, seen, missing = [out.grad_fn], set(), []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes carry their leaf
        if var is not None:
            if id(var) not in known_ids:
                missing.append(var)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return missing


def accumulate(acc: list[Tensor | None], grads: Iterable[Tensor | None]) -> list[Tensor | None]:
    """Sum per-parameter gradients, None meaning zero."""
    return [g if s is None else (s if g is None else s + g) for s, g in zip(acc, grads)]


def needs_grad(x0: Tensor, params: Iterable[Tensor]) -> bool:
    """Whether a solve must build a backward at all (else it runs without a graph)."""
    return torch.is_grad_enabled() and (x0.requires_grad or any(p.requires_grad for p in params))


def scatter(grads: list[Tensor | None], need: Iterable[bool]) -> list[Tensor | None]:
    """Gradients of the needed parameters, put back at their input positions (None elsewhere)."""
    it = iter(grads)
    return [next(it) if n else None for n in need]


def saved_per_step(plan: Plan) -> int:
    """Tensors of the state's shape the adjoint stores per step: x_k, and for midpoint also its
    first-stage velocity u(t_k, x_k), which lets the backward hold one evaluation's graph at a
    time (see solvers.step_vjp) at the price of one more state per step."""
    return 2 if plan.solver == "midpoint" else 1


def forward_states(u: Velocity, plan: Plan, k0: int, k1: int,
                   x: Tensor) -> tuple[list[Tensor], Tensor]:
    """Steps k0 .. k1-1 from x = x_{k0}; returns (saved, x_{k1}): saved = [x_{k0} .. x_{k1-1}]
    (Euler) or [x_{k0}, v1_{k0}, .., x_{k1-1}, v1_{k1-1}] (midpoint; v1_k = u(t_k, x_k))."""
    saved = []
    for k in range(k0, k1):
        saved.append(x)
        v1 = None
        if plan.solver == "midpoint":
            v1 = u(plan.t(k), x)
            saved.append(v1)
        x = step(u, plan, k, x, v1)
    return saved, x


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


class _AdjointSolve(torch.autograd.Function):
    """x_{k1} = steps k0 .. k1-1 from x_{k0}, with the discrete-adjoint backward. Inputs:
    velocity, plan, whether to guard against undiscovered leaves, k0, k1, x_{k0} [B, *S], then the
    velocity's parameters."""

    @staticmethod
    def forward(ctx, u: Velocity, plan: Plan, guard: bool, k0: int, k1: int, x0: Tensor,
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
        u = _LeafGuard(ctx.u, ctx.params) if ctx.guard else ctx.u
        a, acc = adjoint_sweep(u, ctx.plan, *ctx.k, list(ctx.saved_tensors), a, params)
        return (None,) * 5 + (a if ctx.needs_input_grad[5] else None, *scatter(acc, need))


def adjoint_solve(u: Velocity, plan: Plan, x0: Tensor, params: tuple[Tensor, ...],
                  guard: bool, k0: int = 0, k1: int | None = None) -> Tensor:
    """Steps k0 .. k1-1 (default: all) with the discrete-adjoint backward; a plain no-graph solve
    when nothing needs grad."""
    k1 = plan.steps if k1 is None else k1
    if needs_grad(x0, params):
        return _AdjointSolve.apply(u, plan, guard, k0, k1, x0, *params)
    with torch.no_grad():
        x = x0
        for k in range(k0, k1):
            x = step(u, plan, k, x)
        return x
