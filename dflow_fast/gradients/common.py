"""What every gradient scheme's autograd.Function shares: discovering the tensors the velocity
depends on (they must be inputs of the Function to receive gradients), the guard that refuses to
lose the gradient of one it did not discover, and the input bookkeeping of a backward."""
from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..core.autodiff import accumulate  # noqa: F401  (re-exported: the schemes' accumulation)
from ..core.velocity import Velocity

__all__ = ["find_params", "reachable_tensors", "LeafGuard", "guarded", "accumulate",
           "needs_grad", "scatter"]


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


class LeafGuard:
    """Wraps the velocity for the first recomputation of a backward sweep and raises if its
    graph reaches a tensor requiring grad that is not among the known inputs."""

    def __init__(self, u: Velocity, known: Iterable[Tensor], gradient: str):
        self.u = u
        self.known = list(known)
        self.gradient = gradient  # the scheme the user asked for, named in the error
        self.checked = False

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.u(t, x)
        if not self.checked and out.grad_fn is not None:
            self.checked = True
            missing = _unknown_leaves(out, [x, *self.known])
            if missing:
                shapes = ", ".join(str(tuple(m.shape)) for m in missing[:5])
                # backprop itself lands here only under float16 autocast, whose graph a
                # Function owns (to scale the cotangents): suggesting backprop would be circular
                fix = ("Pass them as solve(..., params=[...])." if self.gradient == "backprop"
                       else "Pass them as solve(..., params=[...]) or use gradient='backprop'.")
                raise RuntimeError(
                    f"gradient={self.gradient!r}: the velocity uses {len(missing)} tensor(s) "
                    f"requiring grad that were not found in its closure, globals or module "
                    f"parameters (shapes "
                    f"{shapes}); their gradients would be lost. {fix}")
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


def needs_grad(state: Iterable[Tensor], params: Iterable[Tensor]) -> bool:
    """Whether a solve from ``state`` (x, or a reversible pair) must build a backward at all
    (else it runs without a graph)."""
    return torch.is_grad_enabled() and (any(s.requires_grad for s in state)
                                        or any(p.requires_grad for p in params))


def scatter(grads: list[Tensor | None], need: Iterable[bool]) -> list[Tensor | None]:
    """Gradients of the needed parameters, put back at their input positions (None elsewhere)."""
    it = iter(grads)
    return [next(it) if n else None for n in need]


def guarded(u: Velocity, params: tuple[Tensor, ...], guard: str | None) -> Velocity:
    """``u`` wrapped in a :class:`LeafGuard` naming scheme ``guard``, or ``u`` itself when the
    caller listed the parameters (``guard`` None: everything else is a constant by contract)."""
    return u if guard is None else LeafGuard(u, params, guard)
