"""The plan of a fixed-step solve: the solver table, the time grid and :class:`Plan`.

Notation (docs/design.md section 2): steps k = 0..N-1 on a grid t_0 .. t_N (increasing for a
forward solve, decreasing for a backward one), h = t_{k+1} - t_k.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..ops.registry import Ops, resolve

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


@dataclass(eq=False)  # compared and hashed by identity: gradient="auto" keys what it learns on it
class Plan:
    """A solve's static description: solver, grid, its time points as 0-dim tensors on x's
    device and dtype (built once per solve with one host-to-device copy), the backend ops that
    perform the state algebra, the coupling of a coupled reversible solver, the dtype the
    velocity runs in under ``autocast`` (None: the state's own; docs/design.md section 5), and
    ``low``: the low precision the velocity computes in, by autocast or by its own weights
    (:func:`~dflow_fast.core.precision.compute_dtype`; float16 scales the backward's cotangents)."""

    solver: str
    grid: list[float]
    times: Tensor  # [2N + 1]: t_0 .. t_N, then the midpoints (t_k + t_{k+1}) / 2
    ops: Ops
    coupling: float | None = None
    autocast: torch.dtype | None = None
    low: torch.dtype | None = None

    @classmethod
    def build(cls, solver: str, grid: list[float], like: Tensor, ops: Ops,
              coupling: float | None = None, autocast: torch.dtype | None = None,
              low: torch.dtype | None = None) -> "Plan":
        n = len(grid) - 1
        pts = grid + [0.5 * (grid[k] + grid[k + 1]) for k in range(n)]
        return cls(solver, grid, torch.tensor(pts, dtype=like.dtype, device=like.device), ops,
                   coupling, autocast, autocast if low is None else low)

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

    def h(self, k: int) -> float:
        return self.grid[k + 1] - self.grid[k]

    def t(self, k: int) -> Tensor:
        """t_k for k = 0 .. N."""
        return self.times[k]

    def tmid(self, k: int) -> Tensor:
        """(t_k + t_{k+1}) / 2 for k = 0 .. N-1."""
        return self.times[self.steps + 1 + k]


def make_plan(solver: str, steps: int | None, t0: float, t1: float,
              time_grid: Sequence[float] | Tensor | None, like: Tensor,
              backend: str | None = None, *, gradient: str | None = None,
              coupling: float | None = None, autocast: torch.dtype | None = None,
              low: torch.dtype | None = None) -> Plan:
    """Validate the solver options and build the plan for states like ``like`` [B, *S].
    ``autocast``: the velocity's dtype under torch.autocast, already resolved
    (:func:`~dflow_fast.core.precision.resolve_autocast`); ``low``: the velocity's compute dtype
    (:func:`~dflow_fast.core.precision.compute_dtype`; default: ``autocast``)."""
    check_solver(solver)
    if gradient == "reversible" and solver not in REVERSIBLE:
        raise ValueError(f"gradient='reversible' needs a reversible solver, one of "
                         f"{list(REVERSIBLE)}: solver {solver!r} has no algebraic inverse (use "
                         f"gradient='adjoint' or 'auto' with it)")
    coupling = check_coupling(solver, coupling)
    grid = make_grid(steps, t0, t1, time_grid)
    return Plan.build(solver, grid, like, resolve(backend, like.device), coupling, autocast, low)
