"""dflow_fast: fast D-Flow (Ben-Hamu et al., ICML 2024) — controlled generation by optimizing the
source noise of a flow-matching model through its ODE solve.

Public API:
    solve(velocity, x0, *, steps, solver, gradient, ...) -> x1
    optimize(velocity, cost, x0, *, steps, solver, gradient, optimizer, ...) -> OptimizeResult
    ChiPrior(weight), backward_blend(velocity, x1_guess, *, alpha, ...), ModelVelocity(model)
    reconstruction_drift(velocity, x0, *, solver, steps, ...), ReconstructionWarning:
        the reversible solvers' rebuild error (docs/reversible.md)
    dflow_fast.reference: the plain-PyTorch paper recipe (oracle and baseline)
"""
from ._build import build_info
from .ode import ModelVelocity, solve
from .optimize import IterationInfo, OptimizeResult, optimize
from .priors import ChiPrior, backward_blend
from .reversible import ReconstructionWarning, reconstruction_drift

__version__ = "0.1.0"

__all__ = ["solve", "optimize", "OptimizeResult", "IterationInfo", "ChiPrior", "backward_blend",
           "ModelVelocity", "build_info", "ReconstructionWarning", "reconstruction_drift",
           "__version__"]
