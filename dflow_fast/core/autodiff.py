"""Vector-Jacobian products of one velocity evaluation and the sum of parameter gradients, shared
by the plain and the reversible solvers' step VJPs. ``None`` stands for a zero gradient
throughout, as in ``torch.autograd.grad(..., allow_unused=True)``."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .precision import scaled_grad


def vjp(out: Tensor, inputs: tuple[Tensor, ...], cot: Tensor,
        low: torch.dtype | None = None) -> tuple[Tensor | None, ...]:
    """``(d out / d input)^T cot`` per input, None where ``out`` does not depend on it. A velocity
    whose output has no graph at all (constant in x and in every parameter: ``ones_like(x)``, a
    function of t only) has nothing to differentiate: every VJP is None, i.e. zero. ``inputs``:
    the state first, then parameters; ``low``: the velocity's autocast dtype (float16 scales the
    cotangent, :func:`~dflow_fast.core.precision.scaled_grad`)."""
    if not out.requires_grad:
        return (None,) * len(inputs)
    return scaled_grad((out,), inputs, (cot,), low, per_sample=len(inputs) == 1)


def zero_if_none(w: Tensor | None, like: Tensor) -> Tensor:
    """A state cotangent: a velocity that ignores x has no path to it, and its VJP is zero."""
    return torch.zeros_like(like) if w is None else w


def add_grads(p: Tensor | None, q: Tensor | None) -> Tensor | None:
    """p + q with None as zero."""
    if p is None:
        return q
    return p if q is None else p + q


def accumulate(acc: list[Tensor | None], grads: Iterable[Tensor | None]) -> list[Tensor | None]:
    """Sum per-parameter gradients elementwise over the list, None meaning zero."""
    return [add_grads(s, g) for s, g in zip(acc, grads)]
