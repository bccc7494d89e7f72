"""``optimize(..., compile=True)``: the velocity under ``torch.compile`` with a dynamic batch.

``optimize`` evaluates only the samples still active, so the velocity sees every batch size from
B down to 1 as samples stop. A compiled velocity with static shapes would compile a graph per size
(and dynamo gives up after ``torch._dynamo.config.recompile_limit`` of them, falling back to
eager). :class:`CompiledVelocity` marks dimension 0 of x and of the per-sample conditioning
dynamic before each call (``torch._dynamo.maybe_mark_dynamic``), so one graph serves every batch
size of at least 2; size 1 is specialized by dynamo and compiles once more. The other dimensions
stay static, so the kernels are as specialized as an ordinary compile's. Grad mode is a guard, so
a gradient scheme that evaluates both with and without a graph (the adjoint's forward sweep and
its recomputations) holds one graph of each.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .velocity import Velocity


class CompiledVelocity:
    """``velocity`` compiled by ``torch.compile(velocity, **options)``, called with a dynamic batch
    dimension (module doc). ``velocity`` stays reachable as an attribute, so the parameters and
    closed-over tensors of the original are still found (gradients.common.find_params)."""

    def __init__(self, velocity: Velocity, options: Mapping[str, Any] | None = None):
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x, **cond), got "
                            f"{type(velocity).__name__}")
        self.velocity = velocity
        self.options = dict(options or {})
        self.compiled = torch.compile(velocity, **self.options)

    def __call__(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        mark = torch._dynamo.maybe_mark_dynamic
        mark(x, 0)
        for v in cond.values():  # per-sample conditioning shrinks with the active set
            if isinstance(v, Tensor) and v.dim() and v.shape[0] == x.shape[0]:
                mark(v, 0)
        return self.compiled(t, x, **cond)


def check_compile(compile: bool | Mapping[str, Any]) -> dict | None:
    """``compile`` as torch.compile's keyword arguments (None: do not compile): True for the
    defaults (inductor), a mapping for given ones (``{"backend": "aot_eager"}``, ``{"mode":
    "max-autotune"}``). Raises before any work on anything else."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        if not all(isinstance(k, str) for k in compile):
            raise TypeError("compile: the keys of a mapping must be torch.compile's keyword names")
        if "dynamic" in compile:
            raise ValueError("compile: 'dynamic' is chosen by dflow_fast (a dynamic batch "
                             "dimension, static others); leave it out")
        return dict(compile)
    raise TypeError(f"compile must be a bool or a mapping of torch.compile keyword arguments, "
                    f"got {type(compile).__name__}")
