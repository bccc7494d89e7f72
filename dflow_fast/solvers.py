"""Fixed-step ODE solvers: the time grid, the plan of a solve, and for the plain solvers (Euler,
midpoint) one forward step and one step's vector-Jacobian product for the discrete adjoint. The
reversible solvers' steps live in :mod:`dflow_fast.reversible`.

Notation follows DESIGN.md section 2: steps k = 0..N-1 on a grid t_0 .. t_N (increasing for a
forward solve, decreasing for a backward one), h = t_{k+1} - t_k, ``a`` is the cotangent of x_{k+1}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .backends import Ops

Velocity = Callable[[Tensor, Tensor], Tensor]

#: velocity evaluations per step, by solver name (reversible Heun adds one at the start)
SOLVERS = {"euler": 1, "midpoint": 2, "reversible_heun": 1, "reversible_euler": 2,
           "reversible_midpoint": 4}
#: solvers whose steps invert exactly in algebra (gradient="reversible"); state (y, yhat) / (y, z)
REVERSIBLE = ("reversible_heun", "reversible_euler", "reversible_midpoint")
#: McCallum & Foster's coupled reversible RK: solver name -> its base step
COUPLED = {"reversible_euler": "euler", "reversible_midpoint": "midpoint"}
#: default coupling lambda of the coupled solvers. Measured on the trained Fashion-MNIST flow
#: (docs/reversible.md, bench/results/reversible_cpu.md): lambda near 1 lets the pair's parasitic
#: mode grow (reversible_euler 2-4x less accurate at 0.999 than at 0.8-0.95; reversible_midpoint
#: indifferent), while the inverse amplifies rounding by ~1/lambda per step (float32 drift at 64
#: steps: 0.43 at 0.8, 5e-5 at 0.9, 7e-6 at 0.95, 6e-6 at 0.999). 0.95 takes most of the accuracy
#: at the drift of 0.99.
DEFAULT_COUPLING = 0.95


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")


def check_coupling(solver: str, coupling: float | None) -> float | None:
    """The coupling lambda a solve uses: DEFAULT_COUPLING for a coupled solver when None; a
    coupling given to a solver that has none is an error rather than silently ignored."""
    if solver not in COUPLED:
        if coupling is not None:
            raise ValueError(f"coupling={coupling!r} applies only to the coupled reversible "
                             f"solvers {sorted(COUPLED)}, not to solver {solver!r}")
        return None
    if coupling is None:
        return DEFAULT_COUPLING
    if (isinstance(coupling, bool) or not isinstance(coupling, (int, float))
            or not 0.0 < coupling < 1.0):
        raise ValueError(f"coupling must be a number in (0, 1), got {coupling!r}")
    return float(coupling)


def make_grid(steps: int | None, t0: float, t1: float,
              time_grid: Sequence[float] | Tensor | None) -> list[float]:
    """The time grid as Python floats (float64): ``time_grid`` if given, else ``steps`` uniform
    steps from t0 to t1. Raises ValueError on a bad grid before any work."""
    if time_grid is not None:
        if isinstance(time_grid, Tensor):
            if time_grid.dim() != 1:
                raise ValueError(f"time_grid must be 1-D, got shape {tuple(time_grid.shape)}")
            grid = [float(t) for t in time_grid.detach().cpu().double()]
        else:
            grid = [float(t) for t in time_grid]
        if len(grid) < 2:
            raise ValueError(f"time_grid needs at least 2 points, got {len(grid)}")
        if steps is not None and steps != len(grid) - 1:
            raise ValueError(f"steps={steps} disagrees with time_grid of {len(grid)} points "
                             f"({len(grid) - 1} steps); pass one of them")
        if not all(math.isfinite(t) for t in grid):
            raise ValueError("time_grid has non-finite entries")
        diffs = [b - a for a, b in zip(grid[:-1], grid[1:])]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            raise ValueError("time_grid must be strictly monotone (increasing, or decreasing "
                             "for a backward solve)")
        return grid
    if steps is None:
        raise ValueError("pass steps (an int >= 1) or time_grid")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"t0 and t1 must be finite and differ, got t0={t0}, t1={t1}")
    return [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]


@dataclass
class Plan:
    """A solve's static description: solver, grid, its time points as 0-dim tensors on x's
    device and dtype (built once per solve with one host-to-device copy), the backend ops that
    perform the state algebra, the coupling of a coupled reversible solver, and ``memo``: what
    gradient="auto" learns across the solves that share the plan (optimize's iterations)."""

    solver: str
    grid: list[float]
    times: Tensor  # [2N + 1]: t_0 .. t_N, then the midpoints (t_k + t_{k+1}) / 2
    ops: Ops
    coupling: float | None = None
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, solver: str, grid: list[float], like: Tensor, ops: Ops,
              coupling: float | None = None) -> "Plan":
        n = len(grid) - 1
        pts = grid + [0.5 * (grid[k] + grid[k + 1]) for k in range(n)]
        return cls(solver, grid, torch.tensor(pts, dtype=like.dtype, device=like.device), ops,
                   coupling)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    @property
    def reversible(self) -> bool:
        return self.solver in REVERSIBLE

    @property
    def base(self) -> str | None:
        """The base step (euler/midpoint) of a coupled reversible solver, else None."""
        return COUPLED.get(self.solver)

    @property
    def nfe_per_solve(self) -> int:
        return SOLVERS[self.solver] * self.steps + (self.solver == "reversible_heun")

    def h(self, k: int) -> float:
        return self.grid[k + 1] - self.grid[k]

    def t(self, k: int) -> Tensor:
        """t_k for k = 0 .. N."""
        return self.times[k]

    def tmid(self, k: int) -> Tensor:
        """(t_k + t_{k+1}) / 2 for k = 0 .. N-1."""
        return self.times[self.steps + 1 + k]


def step(u: Velocity, plan: Plan, k: int, x: Tensor, v1: Tensor | None = None) -> Tensor:
    """x_{k+1} from x_k. Runs under whatever grad mode the caller set. Midpoint: ``v1`` is the
    first stage's velocity u(t_k, x_k) when the caller already has it."""
    h, axpy = plan.h(k), plan.ops.axpy
    if plan.solver == "euler":
        return axpy(x, u(plan.t(k), x), h)
    if v1 is None:
        v1 = u(plan.t(k), x)
    xm = axpy(x, v1, 0.5 * h)
    return axpy(x, u(plan.tmid(k), xm), h)


def _vjp(out: Tensor, inputs: tuple[Tensor, ...], cot: Tensor) -> tuple[Tensor | None, ...]:
    return torch.autograd.grad(out, inputs, cot, allow_unused=True)


def step_vjp(u: Velocity, plan: Plan, k: int, x: Tensor, a: Tensor,
             params: tuple[Tensor, ...], v1: Tensor | None = None
             ) -> tuple[Tensor, list[Tensor | None]]:
    """Pull the cotangent ``a`` of x_{k+1} back to x_k by recomputing step k with grad enabled.

    Returns ``(a_prev [B, *S], grads of params)``. Midpoint (DESIGN.md section 2)::

        w2 = vjp(t + h/2, xm, h a);  w1 = vjp(t, x, (h/2) w2);  a_prev = a + w2 + w1

    one evaluation's graph at a time: ``v1 = u(t_k, x_k)`` [B, *S], stored by the forward sweep
    (recomputed without a graph when None), gives xm exactly as the forward built it; the second
    evaluation's graph is built, pulled back and freed before the first one's is rebuilt, so the
    peak is one network VJP instead of two. The parameter gradients of both evaluations are
    returned summed; None where unused.
    """
    h, ops = plan.h(k), plan.ops
    xd = x.detach()  # x may carry history (an x0 computed from a parameter): not walked into
    with torch.enable_grad():
        if plan.solver == "euler":
            xl = xd.requires_grad_(True)
            w, *gp = _vjp(u(plan.t(k), xl), (xl, *params), a * h)
            return ops.adjoint_euler(a, _zero_if_none(w, a)), gp
        if v1 is None:
            with torch.no_grad():
                v1 = u(plan.t(k), xd)
        xm = ops.axpy(xd, v1.detach(), 0.5 * h).requires_grad_(True)
        w2, *gp2 = _vjp(u(plan.tmid(k), xm), (xm, *params), a * h)  # frees the graph
        w2 = _zero_if_none(w2, a)
        xl = xd.detach().requires_grad_(True)
        w1, *gp1 = _vjp(u(plan.t(k), xl), (xl, *params), w2 * (0.5 * h))
    return (ops.adjoint_midpoint(a, w2, _zero_if_none(w1, a)),
            [_add(p, q) for p, q in zip(gp2, gp1)])


def _zero_if_none(w: Tensor | None, like: Tensor) -> Tensor:
    # A velocity that ignores x (e.g. constant in x) has no path to it: its VJP is zero.
    return torch.zeros_like(like) if w is None else w


def _add(p: Tensor | None, q: Tensor | None) -> Tensor | None:
    if p is None:
        return q
    return p if q is None else p + q
