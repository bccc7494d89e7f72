"""One gradient d cost(x1)/d x0 by any of the methods the benchmarks compare: the reference loop,
dflow_fast's gradient schemes and backends, and the peers (torch.utils.checkpoint, torchdiffeq,
flow_matching) that dflow_fast itself never imports (:func:`solve_by`, :func:`one_gradient`);
which of them run here (:func:`available_methods`), and the error between two gradients."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

#: methods compared by the gradient benchmark; "reference" is dflow_fast.reference.solve
METHODS = ("reference", "backprop", "adjoint")


def mse_cost(x1: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error ``[B]`` of ``x1, target: [B, *S]``."""
    return (x1 - target).pow(2).flatten(1).mean(1)


#: peers and baselines that :func:`solve_by` also knows (benchmark-only: dflow_fast never imports
#: torchdiffeq or flow_matching). "vjp" is no solve but one network evaluation, the unit of the
#: memory goal ("one network VJP's peak").
PEER_METHODS = ("checkpoint", "torchdiffeq", "torchdiffeq-adjoint", "torchdiffeq-adjoint-ss",
                "flow_matching")
BASELINE_METHODS = ("vjp",)
#: dflow_fast's other gradient schemes: "auto" (default memory budget: on a GPU with room to spare
#: it keeps every step's graph), "auto-0" (budget 0: nothing kept, the adjoint's memory) and
#: "reversible" (the reversible midpoint solver, default coupling: a different discretization of
#: the same ODE, so its gradient differs from the reference's by the method's error, not rounding).
DFLOW_EXTRA_METHODS = ("auto", "auto-0", "reversible")


def peer_available(method: str) -> Optional[str]:
    """None if ``method``'s package imports, else the reason it cannot run."""
    module = {"torchdiffeq": "torchdiffeq", "flow_matching": "flow_matching"}.get(
        method.split("-")[0])
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError as e:
        return f"{module} is not installed ({e}); pip install {module} (setup.py extra 'bench')"
    return None


def import_peers() -> None:
    """Import what the peers import (torch.utils.checkpoint pulls in torch._dynamo), so that the
    first measured call does not pay for it."""
    import torch.utils.checkpoint  # noqa: F401
    for m in ("torchdiffeq", "flow_matching.solver"):
        try:
            __import__(m)
        except ImportError:
            pass
    try:
        torch.utils.checkpoint.checkpoint(lambda x: x * 2, torch.ones(1, requires_grad=True),
                                          use_reentrant=False).sum().backward()
    except Exception:  # only a warm-up
        pass


def available_methods(device: torch.device | str) -> list[str]:
    """Every method that can run on ``device`` here: the reference, dflow_fast's backprop, its
    adjoint on each backend that loads for the device, and the installed peers."""
    import dflow_fast

    dev = torch.device(device).type
    usable = {"cpu": ("torch", "cpp"), "cuda": ("torch", "cuda", "triton")}.get(dev, ("torch",))
    backends = [b for b in dflow_fast.build_info()["backends"] if b in usable]
    methods = (["reference", "backprop"] + [f"adjoint-{b}" for b in backends]
               + list(DFLOW_EXTRA_METHODS))
    return methods + [m for m in PEER_METHODS if peer_available(m) is None] + ["vjp"]


def _grid(steps: int) -> list[float]:
    return [k / steps for k in range(steps + 1)]  # t0=0, t1=1: dflow_fast.reference's grid


def _step(velocity, x: Tensor, ta: float, h: float, solver: str) -> Tensor:
    """One Euler or midpoint step, the formulas of dflow_fast.reference.solve."""
    t = torch.tensor(ta, dtype=x.dtype, device=x.device)
    if solver == "euler":
        return x + h * velocity(t, x)
    tm = torch.tensor(ta + h / 2, dtype=x.dtype, device=x.device)
    return x + h * velocity(tm, x + (h / 2) * velocity(t, x))


def _checkpoint_solve(velocity, x0: Tensor, *, steps: int, solver: str) -> Tensor:
    """Plain loop with ``torch.utils.checkpoint`` around every step: the forward keeps each step's
    input, the backward re-runs one step at a time (the textbook way to trade time for memory)."""
    from torch.utils.checkpoint import checkpoint

    grid = _grid(steps)
    x = x0
    for ta, tb in zip(grid[:-1], grid[1:]):
        x = checkpoint(_step, velocity, x, ta, tb - ta, solver, use_reentrant=False)
    return x


def _torchdiffeq_solve(velocity, x0: Tensor, *, steps: int, solver: str, adjoint: bool,
                       step_size: bool) -> Tensor:
    """torchdiffeq's fixed-grid solver. ``step_size=False``: ``t`` lists all N+1 grid points (the
    solution at each is returned, and odeint_adjoint stores all of them and restarts its backward
    solve of x from each); ``True``: ``t = [0, 1]`` with ``options={"step_size": 1/N}`` (only x1 is
    kept; odeint_adjoint reconstructs x by integrating backward: O(1) memory, larger error)."""
    import torchdiffeq

    if step_size:
        t = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
        options = {"step_size": 1.0 / steps}
    else:
        t = torch.tensor(_grid(steps), dtype=x0.dtype, device=x0.device)
        options = None
    if adjoint:
        # adjoint_params=(): x0's gradient only, as every other method here computes.
        return torchdiffeq.odeint_adjoint(velocity, x0, t, method=solver, options=options,
                                          adjoint_params=())[-1]
    return torchdiffeq.odeint(velocity, x0, t, method=solver, options=options)[-1]


def _flow_matching_solve(velocity, x0: Tensor, *, steps: int, solver: str) -> Tensor:
    """flow_matching's ``ODESolver.sample`` (torchdiffeq underneath, step_size 1/N) with gradients
    enabled; its velocity is a ``ModelWrapper`` called as ``forward(x, t, **extras)``."""
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Wrapped(ModelWrapper):
        def forward(self, x: Tensor, t: Tensor, **extras) -> Tensor:
            return self.model(t, x)

    return ODESolver(velocity_model=Wrapped(velocity)).sample(
        x_init=x0, step_size=1.0 / steps, method=solver,
        time_grid=torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device), enable_grad=True)


def solve_by(method: str, velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *,
             steps: int, solver: str) -> Tensor:
    """x1 ``[B, *S]`` from x0 ``[B, *S]`` by ``method``:

    - ``"reference"``: dflow_fast.reference.solve, autograd through the plain loop;
    - ``"backprop"``, ``"adjoint"`` or ``"auto"``: dflow_fast.solve's gradient schemes with the
      default backend "auto", or ``"<gradient>-<backend>"`` for an explicit backend, e.g.
      ``"adjoint-cpp"``; ``"auto-0"``: gradient "auto" with ``memory_budget=0``; ``"reversible"``:
      the reversible solver around ``solver`` with gradient "reversible";
    - peers (:data:`PEER_METHODS`): ``"checkpoint"`` (torch.utils.checkpoint per step),
      ``"torchdiffeq"`` (odeint, backprop, t = the grid), ``"torchdiffeq-adjoint"``
      (odeint_adjoint, t = the grid), ``"torchdiffeq-adjoint-ss"`` (odeint_adjoint, t = [0, 1] and
      step_size 1/N), ``"flow_matching"`` (ODESolver.sample, enable_grad=True);
    - ``"vjp"``: no solve, ``velocity(0.5, x0)`` once (one network evaluation and, under a
      gradient, its VJP: the unit of the adjoint's memory goal).
    """
    import dflow_fast
    import dflow_fast.reference

    if method == "reference":
        return dflow_fast.reference.solve(velocity, x0, steps=steps, solver=solver)
    if method == "vjp":
        return velocity(torch.tensor(0.5, dtype=x0.dtype, device=x0.device), x0)
    if method == "checkpoint":
        return _checkpoint_solve(velocity, x0, steps=steps, solver=solver)
    if method in ("torchdiffeq", "torchdiffeq-adjoint", "torchdiffeq-adjoint-ss"):
        return _torchdiffeq_solve(velocity, x0, steps=steps, solver=solver,
                                  adjoint="adjoint" in method, step_size=method.endswith("-ss"))
    if method == "flow_matching":
        return _flow_matching_solve(velocity, x0, steps=steps, solver=solver)
    if method == "auto-0":
        return dflow_fast.solve(velocity, x0, steps=steps, solver=solver, gradient="auto",
                                memory_budget=0)
    if method == "reversible":
        return dflow_fast.solve(velocity, x0, steps=steps, solver=f"reversible_{solver}",
                                gradient="reversible")
    gradient, _, backend = method.partition("-")
    if gradient in ("backprop", "adjoint", "auto"):
        return dflow_fast.solve(velocity, x0, steps=steps, solver=solver, gradient=gradient,
                                backend=backend or None)
    raise ValueError(f"unknown method {method!r}; choose one of "
                     f"{list(METHODS + PEER_METHODS + BASELINE_METHODS)} or "
                     f"'<gradient>-<backend>'")


class CountingVelocity(nn.Module):
    """``velocity(t, x)`` that counts its calls (``n``): a module, so torchdiffeq and
    flow_matching take it as they take a model."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.velocity, self.n = velocity, 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.n += 1
        return self.velocity(t, x)


def one_gradient(method: str, velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor,
                 target: Tensor, *, steps: int, solver: str) -> Tensor:
    """``d sum_b mse(x1_b, target_b) / d x0``: one forward solve and one backward pass.

    ``x0, target: [B, *S]``; returns ``[B, *S]``. ``torch.autograd.grad`` asks for x0 only, so
    nothing lands in weights' ``.grad`` (use a frozen net anyway, see :func:`build_velocity`).
    """
    x = x0.detach().requires_grad_(True)
    x1 = solve_by(method, velocity, x, steps=steps, solver=solver)
    g, = torch.autograd.grad(mse_cost(x1, target).sum(), x)
    return g


def one_eval(velocity: Callable[[Tensor, Tensor], Tensor], x0: Tensor) -> Tensor:
    """``velocity(0.5, x0)`` under ``torch.no_grad``: one network evaluation as the adjoint's
    forward sweep makes it, without a graph; ``x0: [B, *S]``."""
    with torch.no_grad():
        return velocity(torch.tensor(0.5, dtype=x0.dtype, device=x0.device), x0)


def rel_err(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN if either has non-finite entries)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())
