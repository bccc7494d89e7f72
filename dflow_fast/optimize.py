"""``optimize``: D-Flow source-point optimization for a batch of independent problems."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .core.checks import check_cost_value, check_depends, check_gradient, check_x0
from .core.compiled import CompiledVelocity, check_compile
from .core.plan import Plan, make_plan
from .core.precision import compute_dtype, resolve_autocast
from .core.velocity import CheckedVelocity, Velocity
from .gradients.dispatch import run
from .graphed import GraphedObjective, check_cuda_graphs
from .optim.adam import AdamOptions, batched_adam
from .optim.lbfgs import LBFGSOptions, batched_lbfgs
from .optim.samples import SUCCESS, Samples
from .priors import ChiPrior

Cost = Callable[[Tensor], Tensor]
#: optimizer name -> its options dataclass (the flat keywords of optimize() are its fields)
OPTIMIZERS = {"lbfgs": LBFGSOptions, "adam": AdamOptions}
DEFAULT_STEPS = 6
Options = Union[LBFGSOptions, AdamOptions]


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns, per sample where shaped [B] (scipy.optimize style).

    ``status[i]`` is one of: ``"converged"`` (gradient, step or loss change below tolerance),
    ``"max_iter"``, ``"max_eval"``, ``"nonfinite"`` (cost or gradient turned NaN/inf: the sample
    kept its last finite iterate), ``"line_search_failed"`` (no decrease found), ``"callback"``,
    ``"target"`` (its loss reached ``stop_loss``).
    ``success[i]`` is True when the sample ended normally: converged, on target or out of its
    budget.
    """

    x0: Tensor  # [B, *S] optimized source points
    x1: Tensor  # [B, *S] their solutions
    loss: Tensor  # [B] cost (+ regularization) at x0
    success: Tensor  # [B] bool
    status: list[str]
    nit: Tensor  # [B] optimizer iterations
    nfev: Tensor  # [B] cost-and-gradient evaluations
    nfe: Tensor  # [B] velocity evaluations spent on each sample's solves
    history: list[list[float]]  # per sample: loss at the start and after each iteration
    wall_time: float  # seconds
    peak_memory: Optional[int] = None  # bytes, torch.cuda.max_memory_allocated on CUDA
    # batched velocity calls (what the wall time follows), gradient="auto"'s one-off
    # memory-measuring step included (``extra["measuring_calls"]``; not in nfe)
    velocity_calls: int = 0
    message: str = ""
    extra: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        counts = {s: self.status.count(s) for s in sorted(set(self.status))}
        return (f"OptimizeResult(B={len(self.status)}, loss mean={self.loss.mean().item():.4g}, "
                f"status={counts}, nit max={int(self.nit.max())}, "
                f"velocity_calls={self.velocity_calls}, wall_time={self.wall_time:.3g}s)")


@dataclass
class IterationInfo:
    """Passed to ``callback`` after every batched evaluation in which at least one sample
    completed an iteration. With L-BFGS, samples advance at their own pace (a sample whose line
    search ended does not wait for the others), so ``nit`` may differ between samples; with Adam
    every active sample completes one iteration per call."""

    iteration: int  # how many times the callback has been called
    x0: Tensor  # [B, *S] each sample's latest iterate
    loss: Tensor  # [B]
    active: Tensor  # [B] bool: still optimizing
    nit: Tensor  # [B] iterations completed by each sample


def optimizer_options(optimizer: str, options: Optional[Options], flat: dict) -> Options:
    """The options of ``optimizer``: ``options`` (default: the dataclass's defaults) with the flat
    keywords of :func:`optimize` applied on top, validated. A keyword that is not a field of
    that optimizer's options is refused, naming it."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    kind = OPTIMIZERS[optimizer]
    if options is None:
        options = kind()
    elif not isinstance(options, kind):
        raise TypeError(f"options for optimizer={optimizer!r} must be a {kind.__name__}, got "
                        f"{type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(flat) - fields)
    if unknown:
        raise TypeError(f"optimize() got keyword(s) {unknown} that optimizer={optimizer!r} does "
                        f"not take; its options are {sorted(fields)} ({kind.__name__})")
    given = {k: v for k, v in flat.items() if v is not None}
    return dataclasses.replace(options, **given).checked()


class _Objective:
    """f(x0) = cost(x1(x0)) + R(x0) and its gradient, for a subset of the batch.

    The cost always receives the full batch: rows not being evaluated hold their accepted x1, so a
    cost closing over per-sample targets needs no index bookkeeping. Only the evaluated rows go
    through the velocity, which dominates the work.
    """

    def __init__(self, u: CheckedVelocity, plan: Plan, cost: Cost, reg: Optional[Cost],
                 gradient: str, shape: torch.Size, memory_budget: Optional[float] = None):
        self.u, self.plan, self.cost, self.reg, self.gradient = u, plan, cost, reg, gradient
        self.memory_budget = memory_budget
        self.shape = shape  # [B, *S]
        self.x1_full: Optional[Tensor] = None  # accepted x1 of every sample, set by the optimizer
        self.nfe = torch.zeros(shape[0], dtype=torch.int64)

    def __call__(self, idx: Optional[Tensor], X: Tensor):
        """idx: [n] sample indices or None for all; X: [n, D]. Returns (f [n], g [n, D],
        x1 [n, *S])."""
        n = X.shape[0]
        calls = self.u.calls - self.u.measuring_calls
        x0 = X.detach().reshape(n, *self.shape[1:]).requires_grad_(True)
        with torch.enable_grad():  # the rows' own conditioning travels with them
            x1 = run(self.u.rows(idx), self.plan, x0, self.gradient, (), guard=False,
                     memory_budget=self.memory_budget)
            full = x1 if idx is None else self.x1_full.index_put((idx,), x1)
            c = check_cost_value(self.cost(full), self.shape[0])
            f = c if idx is None else c[idx]
            # value and gradient in one fused op, unless d is per sample (ChiPrior(dim=...))
            fused = isinstance(self.reg, ChiPrior) and self.reg.fusable
            if self.reg is not None and not fused:
                # a per-sample prior follows the rows being evaluated, as cond does
                reg = self.reg.rows(idx) if isinstance(self.reg, ChiPrior) else self.reg
                f = f + reg(x0)
            check_depends(f)
            g, = torch.autograd.grad(f.sum(), x0)
            g = g.reshape(n, -1)
        if fused:
            _, value, rgrad = self.plan.ops.chi_prior(X.detach(), self.reg.weight)
            f = f + value.to(f.dtype)
            g = g + rgrad
        # the solves' evaluations: gradient="auto"'s one-off measuring step is not a sample's
        used = self.u.calls - self.u.measuring_calls - calls
        if idx is None:
            self.nfe += used
            # The full-batch evaluation starts the optimizer's x1 buffer; the optimizer writes
            # accepted rows into it in place, so the cost sees them on later calls.
            self.x1_full = x1.detach().clone()
            return f.detach(), g, self.x1_full
        self.nfe.index_add_(0, idx.cpu(), torch.full((n,), used, dtype=torch.int64))
        return f.detach(), g, x1.detach()


def optimize(velocity: Velocity, cost: Cost, x0: Tensor, *, steps: Optional[int] = None,
             solver: str = "midpoint", gradient: str = "auto", optimizer: str = "lbfgs",
             options: Optional[Options] = None, t0: float = 0.0, t1: float = 1.0,
             time_grid: Sequence[float] | Tensor | None = None,
             regularization: Optional[Cost] = None,
             callback: Optional[Callable[[IterationInfo], Optional[bool]]] = None,
             progress: bool = False, backend: Optional[str] = None,
             coupling: Optional[float] = None, memory_budget: Optional[float] = None,
             stop_loss: float | Tensor | None = None, cond: Mapping[str, Any] | None = None,
             autocast: Optional[torch.dtype] = None,
             compile: bool | Mapping[str, Any] = False, cuda_graphs: bool | str = False,
             **optimizer_kwargs) -> OptimizeResult:
    """D-Flow: minimize ``cost(x1(x0)) + regularization(x0)`` over the source points x0.

    Every sample is an independent problem with its own optimizer state; samples that stop
    (converged, out of budget, non-finite) leave the active set and cost no further velocity
    evaluations, while the others go on, batched.

    Args:
        velocity: ``velocity(t, x, **cond) -> [B, *S]`` of a flow model (t=0 noise, t=1 data).
        cost: ``cost(x1 [B, *S]) -> [B]``, differentiable, one independent value per sample. It
            always receives the full batch; rows of stopped samples hold their final x1.
        x0: ``[B, *S]`` initial source points (Gaussian noise, or :func:`backward_blend`).
        steps, solver, t0, t1, time_grid: the ODE solve, as in :func:`solve`. Defaults follow the
            paper's recipe as publicly re-implemented: midpoint, 6 steps (``steps=None`` without
            a ``time_grid`` means 6) from t=0 to t=1.
        gradient: ``"auto"`` (default: backprop's speed where the graphs fit ``memory_budget``,
            the adjoint's memory where they do not; its measuring step runs once per velocity,
            not per evaluation), ``"adjoint"`` (exact, memory of one step), ``"backprop"`` or
            ``"reversible"`` (reversible solvers), as in :func:`solve`.
        optimizer: ``"lbfgs"`` (default; per-sample histories and strong-Wolfe line search) or
            ``"adam"``.
        options: the optimizer's settings, an :class:`LBFGSOptions` (max_iter 20, max_eval
            ``max_iter * 5 // 4``, lr 1, history_size 10, tolerance_grad 1e-7,
            tolerance_change 1e-9; as in torch.optim.LBFGS) or an :class:`AdamOptions`
            (max_iter 20, lr 0.05, tolerance_grad 1e-7, betas, eps). Default: its defaults.
        **optimizer_kwargs: the same settings as flat keywords (``max_iter=50, lr=0.5``),
            applied on top of ``options``; one the chosen optimizer does not take is an error.
        regularization: ``R(x0) -> [B]`` added to the cost, e.g. :class:`ChiPrior`.
        callback: called with an :class:`IterationInfo` after every batched evaluation in which
            a sample completed an iteration; returning True stops all samples (status
            ``"callback"``).
        progress: show a tqdm bar with the mean loss and the number of active samples.
        backend: who runs the solver's state algebra and the optimizer's batched algebra
            (two-loop recursion, χ_d prior), as in :func:`solve`.
        coupling, memory_budget: as in :func:`solve` (coupled reversible solvers; "auto").
        stop_loss: a number or a ``[B]`` tensor: a sample stops (status ``"target"``) after the
            first iteration whose loss (cost + regularization) is at or below its value. For a
            noisy inverse problem ``||A x1 - y||^2`` with noise sigma on m measurements, the
            discrepancy principle ``stop_loss = m * sigma**2`` stops before the noise is fitted
            (``Problem.noise_level``).
        cond: keyword arguments of the velocity, as in :func:`solve`: each per-sample tensor
            (first dimension B) is indexed with the rows being evaluated, so a sample always
            sees its own conditioning however the active set shrinks.
        autocast: ``None``, ``torch.bfloat16`` or ``torch.float16``: the velocity under
            ``torch.autocast``, as in :func:`solve`. The cost, the χ_d prior and the optimizer's
            state (iterates, gradients, L-BFGS history) stay in x0's dtype (float32); inside a
            caller's autocast region (``autocast=None`` takes its dtype) they run with autocast
            disabled.
        compile: ``True`` compiles the velocity with ``torch.compile`` (inductor), a mapping
            passes its keyword arguments (``{"backend": "aot_eager"}``, ``{"mode": ...}``). The
            batch dimension is compiled dynamic, so the shrinking active set does not recompile
            at every batch size (:mod:`dflow_fast.core.compiled`). Default False.
        cuda_graphs: ``True`` records each evaluation of the objective (solve, gradient sweep,
            cost, regularization) in a CUDA graph per bucket of active rows (powers of two up
            to B) and replays it (:mod:`dflow_fast.graphed`, docs/gradients.md): x0 must be on
            CUDA, and a velocity or cost that synchronizes with the host is refused with the
            cause. ``"auto"``: the same, falling back to eager evaluation with a log line where
            a graph cannot be used (the CPU included). Default False.

    Returns:
        :class:`OptimizeResult`.
    """
    check_x0(x0)
    if not callable(cost):
        raise TypeError(f"cost must be callable as cost(x1) -> [B], got {type(cost).__name__}")
    if regularization is not None and not callable(regularization):
        raise TypeError("regularization must be callable as R(x0) -> [B] or None")
    check_gradient(gradient, memory_budget)
    low = resolve_autocast(autocast, x0)
    compile_options = check_compile(compile)
    graphs, no_graphs = check_cuda_graphs(cuda_graphs, x0, gradient, compile_options is not None)
    call = velocity if compile_options is None else CompiledVelocity(velocity, compile_options)
    u = CheckedVelocity(call, cond, x0.shape[0], autocast=low, key=velocity)
    opts = optimizer_options(optimizer, options, optimizer_kwargs)
    targets = _check_stop_loss(stop_loss, x0.shape[0])
    if steps is None and time_grid is None:
        steps = DEFAULT_STEPS
    plan = make_plan(solver, steps, t0, t1, time_grid, x0, backend, gradient=gradient,
                     coupling=coupling, autocast=low, low=compute_dtype(velocity, low))

    cuda = x0.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats(x0.device)
    start = time.perf_counter()
    obj = _Objective(u, plan, cost, regularization, gradient, x0.shape, memory_budget)
    evaluate = GraphedObjective.wrap(obj, cuda_graphs) if graphs else obj
    B = x0.shape[0]
    bar = _progress_bar(progress, opts.max_iter)
    iteration = 0

    def on_iteration(smp: Samples, X: Tensor, f: Tensor, done: list[int]) -> bool:
        nonlocal iteration
        iteration += 1
        if targets is not None:  # only the samples that just moved: the others' losses are old
            f_done = f[torch.tensor(done, dtype=torch.long, device=f.device)].tolist()
            for i, fi in zip(done, f_done):
                if smp.status[i] is None and fi <= targets[i]:
                    smp.stop(i, "target")
        active = [s is None for s in smp.status]
        if bar is not None:
            live = f[torch.isfinite(f)]
            bar.update(min(opts.max_iter, max(smp.nit)) - bar.n)  # the most advanced sample
            bar.set_postfix(loss=f"{live.mean().item():.4g}" if live.numel() else "nan",
                            active=sum(active))
        if callback is None:
            return False
        info = IterationInfo(iteration, X.detach().reshape(x0.shape), f.detach(),
                             torch.tensor(active), torch.tensor(smp.nit))
        return bool(callback(info))

    X = x0.detach().reshape(B, -1)
    # Only the velocity runs in low precision (it enters its own autocast region): a caller's
    # region must not reach the cost, the prior or the optimizer's algebra.
    try:
        with torch.autocast(x0.device.type, enabled=False):
            X, f, x1, smp = _run_optimizer(optimizer, evaluate, X, opts, on_iteration, plan)
    finally:
        if bar is not None:
            bar.close()
    for i in smp.active():
        smp.stop(i, "max_iter")
    status = list(smp.status)
    return OptimizeResult(
        x0=X.reshape(x0.shape), x1=x1, loss=f,
        success=torch.tensor([s in SUCCESS for s in status]),
        status=status, nit=torch.tensor(smp.nit), nfev=torch.tensor(smp.nfev), nfe=evaluate.nfe,
        history=smp.history, wall_time=time.perf_counter() - start,
        peak_memory=torch.cuda.max_memory_allocated(x0.device) if cuda else None,
        velocity_calls=evaluate.calls if graphs else u.calls, message=_summary(status),
        extra={"optimizer": optimizer, "solver": solver, "steps": plan.steps,
               "gradient": gradient, "options": dataclasses.asdict(opts),
               "measuring_calls": u.measuring_calls,
               "autocast": _dtype_name(low),
               # the precision whose cotangent scaling applies: autocast's or the velocity's own
               "compute_dtype": _dtype_name(plan.low),
               "compile": None if compile_options is None else  # JSON-friendly
               {k: v if isinstance(v, (str, int, float, bool)) else repr(v)
                for k, v in compile_options.items()},
               "cuda_graphs": evaluate.report() if graphs else
               None if cuda_graphs is False else {"mode": cuda_graphs, "fallback": no_graphs}})


def _run_optimizer(optimizer: str, obj: "_Objective", X: Tensor, opts: Options, on_iteration,
                   plan: Plan):
    """The batched optimizer over the flat iterates X [B, D]: (X, f, x1, Samples)."""
    if optimizer == "lbfgs":
        return batched_lbfgs(obj, X, opts, on_iteration=on_iteration,
                             direction=plan.ops.lbfgs_direction)
    return batched_adam(obj, X, opts, on_iteration=on_iteration)


def _check_stop_loss(stop_loss, B: int) -> list[float] | None:
    """stop_loss as B floats (None: no target)."""
    if stop_loss is None:
        return None
    if isinstance(stop_loss, Tensor):
        if stop_loss.dim() > 1 or (stop_loss.dim() == 1 and stop_loss.shape[0] != B):
            raise ValueError(f"stop_loss must be a number or a [B] = [{B}] tensor, got shape "
                             f"{list(stop_loss.shape)}")
        values = stop_loss.detach().double().cpu().expand(B).tolist()
    elif isinstance(stop_loss, (int, float)) and not isinstance(stop_loss, bool):
        values = [float(stop_loss)] * B
    else:
        raise TypeError(f"stop_loss must be a number or a [B] tensor, got "
                        f"{type(stop_loss).__name__}")
    if any(math.isnan(v) for v in values):
        raise ValueError("stop_loss must not be NaN")
    return values


def _progress_bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="dflow_fast.optimize", unit="it")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _summary(status: list[str]) -> str:
    counts = {s: status.count(s) for s in sorted(set(status))}
    return ", ".join(f"{n} {s}" for s, n in counts.items())
