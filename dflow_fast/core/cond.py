"""Per-sample conditioning (docs/design.md section 1): ``velocity(t, x, **cond)``.

In ``cond``, a tensor whose first dimension equals the batch size B is *per-sample*: it travels
with its rows, so when the optimizer evaluates only the active rows ``idx`` the velocity receives
``cond[key][idx]``. Anything else is *shared* and passed unchanged: a non-tensor, a 0-dim tensor,
a tensor with leading size 1 (it broadcasts), or any value wrapped in :class:`Shared` (for a tensor
whose leading size is neither 1 nor B, e.g. a fixed [77, 768] embedding). A tensor with leading
size neither 1 nor B and not wrapped is almost always a per-sample tensor of the wrong batch, so
it is refused before any work.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

Cond = Mapping[str, Any]


class Shared:
    """Marks a ``cond`` value as shared by every sample: passed to the velocity unwrapped and
    never indexed, whatever its shape."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"Shared({self.value!r})"


def check_cond(cond: Optional[Cond], B: int) -> dict:
    """``cond`` as a plain dict (empty for None), validated against batch size B."""
    if cond is None:
        return {}
    if not isinstance(cond, Mapping):
        raise TypeError(f"cond must be a mapping of keyword arguments for the velocity, got "
                        f"{type(cond).__name__}")
    out = {}
    for key, value in cond.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"cond keys must be keyword-argument names, got {key!r}")
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] not in (1, B):
            raise ValueError(
                f"cond[{key!r}] has shape {tuple(value.shape)}: a per-sample tensor needs the "
                f"batch's B = {B} rows first (x0 has {B} samples); a tensor shared by every "
                f"sample needs leading size 1, or wrap it as dflow_fast.Shared(...)")
        out[key] = value
    return out


def is_per_sample(value: Any, B: int) -> bool:
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == B


def select(cond: dict, B: int, rows: Tensor) -> dict:
    """``cond`` for the rows ``rows`` [n] (int64) of a batch of B: per-sample tensors indexed,
    the rest unchanged."""
    return {k: (v[rows.to(v.device)] if is_per_sample(v, B) else v) for k, v in cond.items()}


def unwrap(cond: dict) -> dict:
    """The keyword arguments the velocity receives (:class:`Shared` values unwrapped)."""
    return {k: (v.value if isinstance(v, Shared) else v) for k, v in cond.items()}


def grad_tensors(cond: dict) -> tuple[Tensor, ...]:
    """Tensors of ``cond`` that require grad (they receive gradients like the velocity's own
    parameters)."""
    return tuple(v for v in unwrap(cond).values()
                 if isinstance(v, Tensor) and v.requires_grad and torch.is_floating_point(v))
