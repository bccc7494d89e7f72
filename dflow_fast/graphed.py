"""CUDA graphs for optimize's batched objective, and a graphed gradient for solve
(docs/gradients.md, "CUDA graphs"; docs/design.md section 2).

Small D-Flow models, and large ones at batch 1, are launch- and Python-bound: one evaluation of
the objective (solve, adjoint sweep, cost, regularization, gradient) launches thousands of small
kernels. :class:`GraphedObjective` records that evaluation once per *bucket* in a CUDA graph and
replays it; L-BFGS's scalar logic (line search, acceptance, stopping) stays outside any graph.

Buckets: the powers of two below the batch size B, and B itself (:func:`buckets`). An evaluation
of n rows runs in the smallest bucket nb >= n (:func:`bucket_for`). The padded rows are inert:

- X is padded with copies of the first evaluated row (finite whenever that row is);
- the rows are written into an extended solution buffer ``x1_ext`` [B + 1, *S] whose last row is
  scratch: padded rows write there (the *sentinel* B), never over a real row, and the cost sees
  only ``x1_ext[:B]``; ``x1_full`` (what the optimizer holds and updates in place) is that view;
- per-sample ``cond`` rows and a per-sample ChiPrior's ``dim`` are gathered with the sentinel
  replaced by a real row (a valid index);
- the padded rows' values are selected away with ``torch.where`` before the sum that autograd
  differentiates (a mask multiplied in would turn 0 * NaN into NaN) and sliced off the outputs, so
  a NaN or inf in any row stays in that row;
- ``nfe`` counts only the real rows.

``capture=False`` runs exactly this padded, static-shape computation eagerly: the CPU-testable twin
of the graph. ``capture=True`` (CUDA): a bucket's first use runs eagerly (it is also where
gradient="auto" takes its one measuring step, never inside a capture); its second use runs one
more eager warm-up on the capture stream under ``torch.cuda.set_sync_debug_mode("error")`` (a host
synchronization raises there instead of corrupting a capture; the warm-up also counts the
velocity calls of one evaluation), then captures the computation with static input buffers
(X, row indices, mask) and replays it; later uses only copy their inputs in and replay. Outputs are
cloned after a replay (the next one overwrites them). All buckets share one memory pool: a
graph's outputs are consumed before any other graph replays.

Captured by address: the velocity's parameters and buffers, ``cond`` tensors, the cost's tensors,
and ``x1_ext``. Changing them *in place* is seen by the next replay; *reassigning* them (a new
tensor object) is not: the graph keeps reading the old memory.

What cannot be captured: host synchronizations (``.item()``, ``.cpu()``, ``bool(tensor)`` in
control flow, a CPU tensor moved to the GPU, data-dependent shapes such as boolean masks),
anything else a capture rejects. ``cuda_graphs=True`` raises naming the cause; ``"auto"`` logs one
line and evaluates eagerly (unpadded) from then on. The library's own evaluation path keeps such
syncs out of the captured region: see the module's notes in docs/gradients.md.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .core.checks import check_cost_value, check_depends, check_gradient, check_x0
from .core.plan import make_plan
from .core.precision import compute_dtype, resolve_autocast
from .core.velocity import CheckedVelocity, Velocity
from .gradients import auto
from .gradients.dispatch import run
from .priors import ChiPrior

log = logging.getLogger("dflow_fast")

#: the values ``cuda_graphs=`` accepts
CUDA_GRAPHS = (False, True, "auto")
#: tests only: run ``cuda_graphs`` True or "auto" as the eager padded twin (capture=False) on any
#: device
_TWIN = False


def buckets(B: int) -> list[int]:
    """The bucket sizes of a batch of B: powers of two below B, then B (``buckets(6) ==
    [1, 2, 4, 6]``)."""
    if isinstance(B, bool) or not isinstance(B, int) or B < 1:
        raise ValueError(f"buckets: B must be an int >= 1, got {B!r}")
    out, p = [], 1
    while p < B:
        out.append(p)
        p *= 2
    return out + [B]


def bucket_for(n: int, B: int) -> int:
    """The smallest bucket of a batch of B that holds n rows, 1 <= n <= B."""
    if not 1 <= n <= B:
        raise ValueError(f"bucket_for: n must be in [1, B={B}], got {n}")
    return next(b for b in buckets(B) if b >= n)


def check_value(cuda_graphs: Any) -> None:
    """``cuda_graphs`` is one of :data:`CUDA_GRAPHS` (exactly: not 0, 1 or "yes")."""
    if not (cuda_graphs is True or cuda_graphs is False
            or (isinstance(cuda_graphs, str) and cuda_graphs == "auto")):
        raise ValueError(f"cuda_graphs must be False, True or 'auto', got {cuda_graphs!r}")


def check_cuda_graphs(cuda_graphs: Any, x0: Tensor, gradient: str,
                      compiled: bool = False) -> tuple[bool, Optional[str]]:
    """Validate ``cuda_graphs`` before any work: (capture or not, why not under "auto").
    True refuses what it cannot run: x0 off CUDA, gradient="reversible" (its backward reads the
    reconstruction drift on the host), a torch.compile'd velocity."""
    check_value(cuda_graphs)
    if cuda_graphs is False:
        return False, None
    why, off_cuda = None, not x0.is_cuda and not _TWIN
    if off_cuda:
        why = f"x0 is on {x0.device}"
    elif gradient == "reversible":
        why = ("gradient='reversible' checks its reconstruction drift on the host (a sync no "
               "graph can hold)")
    elif compiled:
        why = ("a torch.compile'd velocity (use compile={'mode': 'reduce-overhead'} for "
               "inductor's own CUDA graphs instead)")
    if why is None:
        return True, None
    if cuda_graphs is True:
        if off_cuda:
            raise ValueError(f"cuda_graphs=True needs x0 on a CUDA device (CUDA graphs record "
                             f"GPU work); x0 is on {x0.device}. Move x0 and the velocity to a "
                             f"GPU, or pass cuda_graphs='auto' (eager here) or False")
        raise ValueError(f"cuda_graphs=True cannot capture {why}; pass cuda_graphs='auto' "
                         f"(runs it eagerly) or False")
    (log.info if not x0.is_cuda else log.warning)(
        "dflow_fast: cuda_graphs='auto': %s; evaluating eagerly", why)
    return False, why


class _Slot:
    """One bucket's static buffers (the graph reads and writes these addresses): X [nb, D],
    ``put`` [nb] (rows of x1_ext, the sentinel B for padding), ``take`` [nb] (rows of cond, prior
    and cost; padding repeats a real row), ``mask`` [nb] (real rows). ``full``: the whole batch in
    order (idx None): the solution is the cost's input itself."""

    def __init__(self, nb: int, D: int, full: bool, like: Tensor, B: int):
        dev = like.device
        self.nb, self.full, self.uses, self.calls, self.solves = nb, full, 0, 0, 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self.X = like.new_zeros(nb, D)
        self.put = torch.arange(nb, device=dev)
        self.take = torch.arange(nb, device=dev)
        self.mask = torch.ones(nb, dtype=torch.bool, device=dev)
        self.B = B

    def stage(self, idx: Optional[Tensor], X: Tensor) -> None:
        """Copy one evaluation's inputs in (device copies only, no host sync)."""
        n = X.shape[0]
        self.X[:n].copy_(X)
        if n < self.nb:
            self.X[n:].copy_(X[:1].expand(self.nb - n, -1))
        if idx is None:
            return
        self.put[:n].copy_(idx)
        self.take[:n].copy_(idx)
        self.mask[:n].fill_(True)
        if n < self.nb:
            self.put[n:].fill_(self.B)
            self.take[n:].copy_(idx[:1].expand(self.nb - n))
            self.mask[n:].fill_(False)


class GraphedObjective:
    """optimize's objective ``(idx [n] or None, X [n, D]) -> (f [n], g [n, D], x1 [n, *S])``
    evaluated in padded buckets, eagerly (``capture=False``, the twin) or replayed from CUDA graphs
    (``capture=True``); module doc. ``mode``: True raises when a capture fails, "auto" falls back
    to eager (unpadded) evaluation with one log line. ``memory_budget`` as in optimize
    (gradient="auto"; a capture fixes the budget of its bucket when it is first captured).

    Counters: ``calls`` the velocity calls of the evaluations (a replay counts what its capture's
    warm-up called), ``warmup_calls`` the extra ones of warm-ups, ``nfe`` [B] per sample (CPU)."""

    def __init__(self, u: CheckedVelocity, plan, cost: Callable, reg: Optional[Callable],
                 gradient: str, shape: torch.Size, memory_budget: Optional[float] = None, *,
                 capture: bool = False, mode: Any = True, pad: bool = True):
        self.u, self.plan, self.cost, self.gradient = u, plan, cost, gradient
        self.shape, self.memory_budget = torch.Size(shape), memory_budget
        self.capture, self.mode, self.pad = capture, mode, pad
        self.reg, self._dim = reg, None
        if isinstance(reg, ChiPrior) and isinstance(reg.dim, Tensor):
            self._dim = reg.dim.to(plan.times.device)  # moved once: no copy per evaluation
        self.B = self.shape[0]
        self.x1_ext: Optional[Tensor] = None
        self.x1_full: Optional[Tensor] = None
        self._nfe = torch.zeros(self.B, dtype=torch.int64, device=plan.times.device)
        self._slots: dict[tuple[int, bool], _Slot] = {}
        self.calls = self.warmup_calls = self.replays = self.eager = 0
        self.fallback: Optional[str] = None
        self._pool = self._stream = self._budget = None

    @classmethod
    def wrap(cls, obj, mode: Any) -> "GraphedObjective":
        """optimize's ``_Objective`` (its fields: u, plan, cost, reg, gradient, shape,
        memory_budget) graphed under ``cuda_graphs=mode`` (True or "auto")."""
        return cls(obj.u, obj.plan, obj.cost, obj.reg, obj.gradient, obj.shape,
                   obj.memory_budget, capture=not _TWIN, mode=mode)

    @property
    def nfe(self) -> Tensor:
        """[B] int64 (CPU): velocity evaluations spent on each sample."""
        return self._nfe.cpu()

    def report(self) -> dict:
        """What optimize records as ``extra["cuda_graphs"]``."""
        captured = sorted(nb for (nb, _), s in self._slots.items() if s.graph is not None)
        uses = {str(nb): s.uses for (nb, full), s in sorted(self._slots.items()) if not full}
        return {"mode": self.mode, "capture": self.capture, "buckets": captured,
                "captures": len(captured), "replays": self.replays, "bucket_uses": uses,
                "eager_evaluations": self.eager, "warmup_calls": self.warmup_calls,
                "fallback": self.fallback}

    def __call__(self, idx: Optional[Tensor], X: Tensor):
        n, B = X.shape[0], self.B
        if self.x1_ext is None:
            if idx is not None:
                raise RuntimeError("GraphedObjective: the first evaluation must be of the whole "
                                   "batch (idx=None): it starts the solution buffer")
            self.x1_ext = X.new_zeros(B + 1, *self.shape[1:])
            self.x1_full = self.x1_ext[:B]
        full = idx is None
        nb = n if full or not self.pad or self.fallback else bucket_for(n, B)
        f, g, x1 = self._evaluate(self._slot(nb, full), idx, X)
        if full:
            self.x1_full.copy_(x1)
            return f[:n].clone(), g[:n].clone(), self.x1_full
        return f[:n].clone(), g[:n].clone(), x1[:n].clone()

    # ---- evaluation -------------------------------------------------------------------------

    def _slot(self, nb: int, full: bool) -> _Slot:
        key = (nb, full)
        if key not in self._slots:
            self._slots[key] = _Slot(nb, self.shape[1:].numel(), full, self.plan.times, self.B)
        return self._slots[key]

    def _count(self, idx: Optional[Tensor], n: int, calls: int, solves: int) -> None:
        """``calls`` velocity calls, of which ``solves`` were the solves' (the rest: gradient=
        "auto"'s measuring step, left out of the per-sample counts as optimize does)."""
        self.calls += calls
        if idx is None:
            self._nfe += solves
        else:  # on the device: no host read of idx
            self._nfe.index_add_(0, idx, torch.full((n,), solves, dtype=torch.int64,
                                                    device=idx.device))

    def _calls(self) -> tuple[int, int]:
        return self.u.calls, self.u.calls - self.u.measuring_calls

    def _evaluate(self, slot: _Slot, idx: Optional[Tensor], X: Tensor):
        slot.stage(idx, X)
        slot.uses += 1
        if self.capture and self.fallback is None:
            if slot.graph is None and slot.uses >= 2:
                try:
                    self._capture(slot)
                except Exception as e:  # noqa: BLE001 - reported or re-raised with the cause
                    self._failed(e)
                    if self.pad:  # restage unpadded: from now on exactly the eager objective
                        slot = self._slot(X.shape[0], slot.full)
                        slot.stage(idx, X)
            if slot.graph is not None:
                slot.graph.replay()
                self.replays += 1
                self._count(idx, X.shape[0], slot.calls, slot.solves)
                return slot.out
        calls, solves = self._calls()
        out = self._compute(slot, self.memory_budget)
        self.eager += 1
        self._count(idx, X.shape[0], self._calls()[0] - calls, self._calls()[1] - solves)
        return out

    def _failed(self, e: Exception) -> None:
        sync = "synchroniz" in str(e)
        cause = (("the objective synchronizes with the host (.item(), .cpu(), bool() of a tensor "
                  "in control flow, a CPU tensor moved to the GPU, a data-dependent shape), "
                  "which a CUDA graph cannot hold") if sync else
                 "the capture of the objective failed")
        msg = f"{cause}: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
        if self.mode is True:
            raise RuntimeError(f"cuda_graphs=True: {msg}. Remove the sync from the velocity / "
                               f"cost, or pass cuda_graphs='auto' (falls back to eager) or "
                               f"False") from e
        self.fallback = msg
        log.warning("dflow_fast: cuda_graphs='auto': %s; evaluating eagerly from now on", msg)

    def _capture(self, slot: _Slot) -> None:
        """Warm up under the sync check on the capture stream, then capture ``slot``."""
        dev = slot.X.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
            self._pool = torch.cuda.graph_pool_handle()
        if self.gradient == "auto" and self._budget is None:  # fixed: mem_get_info stays out
            self._budget = (self.memory_budget if self.memory_budget is not None
                            else auto.default_budget(dev))
        main, side = torch.cuda.current_stream(dev), self._stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            calls, solves = self._calls()
            with _sync_check():
                self._compute(slot, self._budget)
            slot.calls, slot.solves = self._calls()[0] - calls, self._calls()[1] - solves
            self.warmup_calls += slot.calls
        main.wait_stream(side)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=self._pool)
            try:
                out = self._compute(slot, self._budget)
            except BaseException:
                with contextlib.suppress(Exception):  # ends the invalidated capture
                    graph.capture_end()
                raise
            graph.capture_end()
        main.wait_stream(side)
        slot.graph, slot.out = graph, out

    def _compute(self, slot: _Slot, budget: Optional[float]):
        """The padded evaluation of ``slot``'s staged inputs: (f [nb], g [nb, D], x1 [nb, *S]).
        Static shapes, no host reads: this is what a graph records."""
        nb, B, reg = slot.nb, self.B, self.reg
        x0 = slot.X.detach().view(nb, *self.shape[1:]).requires_grad_(True)
        take = None if slot.full else slot.take
        fused = isinstance(reg, ChiPrior) and reg.fusable
        with torch.enable_grad():  # the rows' own conditioning travels with them
            x1 = run(self.u.rows(take), self.plan, x0, self.gradient, (), guard=False,
                     memory_budget=budget)
            full = x1 if slot.full else self.x1_ext.index_put((slot.put,), x1)[:B]
            c = check_cost_value(self.cost(full), B)
            f = c if slot.full else c.index_select(0, take)
            if reg is not None and not fused:
                f = f + self._reg_rows(take)(x0)
            check_depends(f)
            # padded rows selected away (not multiplied by 0: 0 * NaN is NaN)
            total = f.sum() if slot.full else torch.where(slot.mask, f, torch.zeros_like(f)).sum()
            g, = torch.autograd.grad(total, x0)
            g = g.reshape(nb, -1)
        if fused:
            _, value, rgrad = self.plan.ops.chi_prior(slot.X, reg.weight)
            f = f + value.to(f.dtype)
            g = g + rgrad
        return f.detach(), g, x1.detach()

    def _reg_rows(self, take: Optional[Tensor]):
        """The regularization of the rows ``take``: a per-sample ChiPrior's dim gathered on the
        device without ChiPrior.rows' validation (a host read)."""
        if self._dim is None or take is None:
            return self.reg if self._dim is None else _with_dim(self.reg, self._dim)
        return _with_dim(self.reg, self._dim.index_select(0, take))


def _with_dim(prior: ChiPrior, dim: Tensor) -> ChiPrior:
    view = copy.copy(prior)  # no __init__: its checks read dim on the host
    view.dim = dim
    return view


@contextlib.contextmanager
def _sync_check():
    """Host synchronizations raise (torch.cuda.set_sync_debug_mode("error")) inside."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class ValueAndGrad:
    """A graphed gradient for solve: ``vg(x0) -> (f [B], g [B, *S])`` with
    ``f = cost(x1(x0)) (+ regularization(x0))`` per sample and ``g = d f.sum() / d x0``.

    The arguments mean what they mean in :func:`~dflow_fast.optimize` (the solve's, the gradient
    scheme, ``cond``, ``autocast``). With ``cuda_graphs`` True or "auto" (default) on CUDA, the
    first call runs eagerly, the second captures the evaluation in a CUDA graph and every later
    call with an x0 of the same shape, dtype and device replays it (a new shape builds a new one).
    Only x0 is an input of the graph: everything else is captured by address (module doc). On the
    CPU "auto" is eager; True is refused there."""

    def __init__(self, velocity: Velocity, cost: Callable[[Tensor], Tensor], *,
                 steps: Optional[int] = None, solver: str = "midpoint", gradient: str = "auto",
                 t0: float = 0.0, t1: float = 1.0,
                 time_grid: Sequence[float] | Tensor | None = None,
                 regularization: Optional[Callable[[Tensor], Tensor]] = None,
                 cond: Mapping[str, Any] | None = None, backend: Optional[str] = None,
                 memory_budget: Optional[float] = None, autocast: Optional[torch.dtype] = None,
                 cuda_graphs: Any = "auto"):
        if not callable(velocity) or not callable(cost):
            raise TypeError("velocity and cost must be callable")
        if regularization is not None and not callable(regularization):
            raise TypeError("regularization must be callable as R(x0) -> [B] or None")
        check_gradient(gradient, memory_budget)
        check_value(cuda_graphs)  # the device is checked with the first x0
        self.velocity, self.cost, self.reg, self.cond = velocity, cost, regularization, cond
        self.solver, self.gradient, self.backend = solver, gradient, backend
        self.steps = 6 if steps is None and time_grid is None else steps
        self.t0, self.t1, self.time_grid = t0, t1, time_grid
        self.memory_budget, self.autocast, self.cuda_graphs = memory_budget, autocast, cuda_graphs
        self.objective: Optional[GraphedObjective] = None
        self._key: Optional[tuple] = None

    def __call__(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        check_x0(x0)
        key = (tuple(x0.shape), x0.dtype, x0.device)
        if key != self._key:
            capture, why = check_cuda_graphs(self.cuda_graphs, x0, self.gradient)
            low = resolve_autocast(self.autocast, x0)
            u = CheckedVelocity(self.velocity, self.cond, x0.shape[0], autocast=low,
                                key=self.velocity)
            plan = make_plan(self.solver, self.steps, self.t0, self.t1, self.time_grid, x0,
                             self.backend, gradient=self.gradient, autocast=low,
                             low=compute_dtype(self.velocity, low))
            self.objective = GraphedObjective(
                u, plan, self.cost, self.reg, self.gradient, x0.shape, self.memory_budget,
                capture=capture and not _TWIN, mode=self.cuda_graphs, pad=False)
            self.objective.fallback = why
            self._key = key
        B = x0.shape[0]
        with torch.autocast(x0.device.type, enabled=False):  # only the velocity runs low
            f, g, _ = self.objective(None, x0.detach().reshape(B, -1))
        return f, g.reshape(x0.shape)


def value_and_grad(velocity: Velocity, cost: Callable[[Tensor], Tensor], x0: Tensor,
                   **kwargs) -> tuple[Tensor, Tensor]:
    """One evaluation of :class:`ValueAndGrad` (keywords as there): ``(f [B], g [B, *S])``.
    A single call never replays a graph; keep a ``ValueAndGrad`` to reuse one across calls."""
    return ValueAndGrad(velocity, cost, **kwargs)(x0)
