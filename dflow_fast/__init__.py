"""dflow_fast: fast D-Flow (Ben-Hamu et al., ICML 2024) — controlled generation by optimizing the
source noise of a flow-matching model through its ODE solve.

Public API:
    solve(velocity, x0, *, steps, solver, gradient, ...) -> x1
    optimize(velocity, cost, x0, *, steps, solver, gradient, optimizer, options, ...)
        -> OptimizeResult;  LBFGSOptions, AdamOptions, IterationInfo
    ChiPrior(weight), backward_blend(velocity, x1_guess, *, alpha, ...), ModelVelocity(model)
    cond=: per-sample conditioning, velocity(t, x, **cond); Shared(value) marks a shared value
    reconstruction_drift(velocity, x0, *, solver, steps, ...), ReconstructionWarning:
        the reversible solvers' rebuild error (docs/reversible.md)
    build_info(): the backends this installation has
    ValueAndGrad(velocity, cost, *, steps, gradient, cuda_graphs, ...)(x0) -> (f [B], g [B, *S]),
        value_and_grad(velocity, cost, x0, ...): a solve's cost and gradient, replayed from a
        CUDA graph on later calls (optimize(..., cuda_graphs=True) does it per bucket)

Submodules, loaded on first use (``import dflow_fast`` stays light: no triton, matplotlib,
torchmetrics or safetensors): ``reference`` (the plain-PyTorch paper recipe, oracle and baseline),
``models``, ``data``, ``metrics``, ``tasks``, ``apps``, and the layers ``core``, ``gradients``,
``optim``, ``ops`` (docs/design.md section 3).
"""
from __future__ import annotations

import importlib

from ._version import __version__
from .core.cond import Shared
from .core.velocity import ModelVelocity
from .gradients.reversible import ReconstructionWarning, reconstruction_drift
from .graphed import ValueAndGrad, value_and_grad
from .ops.build import build_info
from .optim.adam import AdamOptions
from .optim.lbfgs import LBFGSOptions
from .optimize import IterationInfo, OptimizeResult, optimize
from .priors import ChiPrior, backward_blend
from .solve import solve

#: submodules reachable as attributes, imported on first access
_LAZY = ("reference", "models", "data", "metrics", "tasks", "apps", "adapters", "core",
         "gradients", "optim", "ops", "kernels", "jobs", "molecules")

__all__ = ["solve", "optimize", "OptimizeResult", "IterationInfo", "LBFGSOptions", "AdamOptions",
           "ChiPrior", "backward_blend", "ModelVelocity", "Shared", "build_info", "ReconstructionWarning",
           "reconstruction_drift", "ValueAndGrad", "value_and_grad", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module  # later accesses skip __getattr__
        return module
    raise AttributeError(f"module 'dflow_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
