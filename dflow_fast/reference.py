"""The reference path: D-Flow as the paper runs it, in plain PyTorch.

Autograd through the unrolled Euler/midpoint loop and ``torch.optim.LBFGS`` with a strong-Wolfe
line search (or ``torch.optim.Adam``) over the whole batch at once. It is the oracle of the tests
and the baseline of the benchmarks, so it is kept short and obviously right and shares no solver
code with the fast path.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .core.cond import check_cond, unwrap
from .optimize import DEFAULT_STEPS, OptimizeResult, optimizer_options


def solve(velocity: Callable[..., Tensor], x0: Tensor, *, steps: Optional[int] = None,
          solver: str = "midpoint", t0: float = 0.0, t1: float = 1.0,
          time_grid: Sequence[float] | Tensor | None = None,
          cond: Mapping[str, Any] | None = None,
          autocast: torch.dtype | None = None) -> Tensor:
    """x1 by the plain unrolled loop; autograd records every step. x0: [B, *S]; ``cond``: the
    velocity's keyword arguments (all rows at once: nothing to index); ``autocast``: each
    velocity call under ``torch.autocast`` with that dtype, its output cast back to x's."""
    if autocast is not None:
        return solve(_under_autocast(velocity, autocast), x0, steps=steps, solver=solver, t0=t0,
                     t1=t1, time_grid=time_grid, cond=cond)
    if cond:
        kwargs = unwrap(check_cond(cond, x0.shape[0]))
        return solve(functools.partial(velocity, **kwargs), x0, steps=steps, solver=solver, t0=t0,
                     t1=t1, time_grid=time_grid)
    if time_grid is None:
        grid = [t0 + (t1 - t0) * k / steps for k in range(steps + 1)]
    else:
        grid = [float(t) for t in time_grid]
    x = x0
    for ta, tb in zip(grid[:-1], grid[1:]):
        h = tb - ta
        t = torch.tensor(ta, dtype=x.dtype, device=x.device)
        if solver == "euler":
            x = x + h * velocity(t, x)
        elif solver == "midpoint":
            tm = torch.tensor(ta + h / 2, dtype=x.dtype, device=x.device)
            x = x + h * velocity(tm, x + (h / 2) * velocity(t, x))
        else:
            raise ValueError(f"unknown solver {solver!r}")
    return x


def _under_autocast(velocity, dtype: torch.dtype):
    def low(t, x, **kw):
        with torch.autocast(x.device.type, dtype=dtype):
            out = velocity(t, x, **kw)
        return out.to(x.dtype)
    return low


def optimize(velocity, cost, x0: Tensor, *, steps: Optional[int] = None, solver: str = "midpoint",
             gradient: str = "backprop", optimizer: str = "lbfgs", options=None, t0: float = 0.0,
             t1: float = 1.0, time_grid=None, regularization=None, callback=None,
             progress: bool = False, stop_loss=None, cond=None, autocast=None,
             **optimizer_kwargs) -> OptimizeResult:
    """Same signature as :func:`dflow_fast.optimize`; one optimizer over the summed batch loss.

    ``gradient`` is accepted for signature compatibility; the reference always backpropagates.
    ``autocast``: the velocity as in :func:`solve` (plain autograd: no float16 cotangent scaling).
    ``callback`` is called with the iteration number after each iteration; ``progress`` is ignored.
    ``stop_loss`` must be None: ``torch.optim.LBFGS`` cannot stop at a loss within one call (give
    the reference the iterations the fast path took instead, as the demo does).
    """
    if stop_loss is not None:
        raise ValueError("dflow_fast.reference.optimize: stop_loss is not supported (torch.optim."
                         "LBFGS runs max_iter iterations); pass max_iter= instead")
    opts = optimizer_options(optimizer, options, optimizer_kwargs)
    if cond:
        velocity = functools.partial(velocity, **unwrap(check_cond(cond, x0.shape[0])))
    if autocast is not None:
        velocity = _under_autocast(velocity, autocast)
    if steps is None and time_grid is None:
        steps = DEFAULT_STEPS
    start = time.perf_counter()
    x = x0.detach().clone().requires_grad_(True)
    calls = [0]

    def counted(t, z):
        calls[0] += 1
        return velocity(t, z)

    def objective():
        x1 = solve(counted, x, steps=steps, solver=solver, t0=t0, t1=t1, time_grid=time_grid)
        f = cost(x1)
        if regularization is not None:
            f = f + regularization(x)
        return f

    losses = []
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=opts.lr, max_iter=opts.max_iter,
                                max_eval=opts.max_eval, history_size=opts.history_size,
                                tolerance_grad=opts.tolerance_grad,
                                tolerance_change=opts.tolerance_change,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = objective()
            f.sum().backward()
            losses.append(f.detach())
            return f.sum()

        opt.step(closure)
        nit = opt.state[opt._params[0]]["n_iter"]
        nfev = opt.state[opt._params[0]]["func_evals"]
    else:
        opt = torch.optim.Adam([x], lr=opts.lr, betas=opts.betas, eps=opts.eps)
        for it in range(opts.max_iter):
            opt.zero_grad()
            f = objective()
            f.sum().backward()
            losses.append(f.detach())
            opt.step()
            if callback is not None:
                callback(it + 1)
        nit, nfev = opts.max_iter, opts.max_iter + 1
    with torch.no_grad():
        x1 = solve(counted, x, steps=steps, solver=solver, t0=t0, t1=t1, time_grid=time_grid)
        f = cost(x1) + (regularization(x) if regularization is not None else 0)
    B = x0.shape[0]
    finite = torch.isfinite(f)
    return OptimizeResult(
        x0=x.detach(), x1=x1, loss=f, success=finite.cpu(),
        status=["max_iter" if ok else "nonfinite" for ok in finite.tolist()],
        nit=torch.full((B,), nit), nfev=torch.full((B,), nfev),
        nfe=torch.full((B,), calls[0]), history=[[float(l[i]) for l in losses] for i in range(B)],
        wall_time=time.perf_counter() - start,
        peak_memory=torch.cuda.max_memory_allocated(x0.device) if x0.is_cuda else None,
        velocity_calls=calls[0], message="reference: torch.optim over the summed batch loss")
