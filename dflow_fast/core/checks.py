"""Input validation shared by the public entry points: every check raises before any work, with
a message that names the argument (docs/design.md section 7)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: gradient schemes accepted by solve and optimize (docs/design.md section 2)
GRADIENTS = ("adjoint", "backprop", "reversible", "auto")


def check_x0(x0: Tensor, name: str = "x0") -> None:
    """A floating-point [B, *S] tensor with B >= 1 and finite entries."""
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


def check_cost_value(c, B: int) -> Tensor:
    """``c`` = cost(x1) must be one value per sample, a tensor [B]; returns it."""
    if not isinstance(c, Tensor) or c.shape != (B,):
        got = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
        raise ValueError(f"cost(x1) must return one value per sample, shape [{B}], got {got}")
    return c


def check_depends(f: Tensor) -> None:
    """The objective's value ``f`` must reach x0 through autograd, else there is no gradient."""
    if f.grad_fn is None:
        raise ValueError("cost(x1) does not depend on x1: there is nothing to optimize")


def check_gradient(gradient: str, memory_budget: float | None = None) -> None:
    """A known gradient scheme; ``memory_budget`` only with "auto", a number of bytes >= 0."""
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


def check_positive(name: str, value, integer: bool = False) -> None:
    """An int >= 1 (``integer``) or a finite number > 0."""
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        kind = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_params(params) -> tuple[Tensor, ...]:
    """An explicit ``params`` list as a tuple of tensors."""
    found = tuple(params)
    for p in found:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must be tensors, got {type(p).__name__}")
    return found


def check_tolerances(options) -> None:
    """Every ``tolerance_*`` field of ``options`` is a number >= 0."""
    for name in ("tolerance_grad", "tolerance_change"):
        tol = getattr(options, name, 0.0)
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {tol!r}")
