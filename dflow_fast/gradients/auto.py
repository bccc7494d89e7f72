"""gradient="auto": backprop's speed where memory allows, the adjoint's memory where it does not.

A solve is split into consecutive segments over the steps, in this order::

    [0, m)          graph       autograd keeps each step's activations (backprop: no recomputation)
    [m, m + r)      stored      the discrete adjoint: one state (coupled solvers: two) per step,
                                each step recomputed with grad in the backward sweep
    [m + r, N)      reversible  only for a reversible solver, and only when even the stored states
                                do not fit: constant memory, states rebuilt by the inverse

Every segment's gradient is exact (the chain is the same computation as the plain solve), so
"auto" equals backprop up to rounding whatever the split; a reversible segment adds the rebuild's
rounding drift, checked as for gradient="reversible".

How m and r are chosen: the bytes one step's graph keeps for backward are *measured*: one step
runs on a detached copy of x0 under a ``saved_tensors_hooks`` pack hook that adds up the storages
autograd saves (each storage once; the velocity's own weights, buffers and closed-over tensors
excluded, since they exist anyway); its graph is dropped right after, and the real solve runs
under the caller's own hooks, untouched. The measurement costs one extra step's evaluations (and,
transiently, one step's graph), and it is made once per velocity object and per (per-sample
shape, dtype, device, solver, autocast dtype, parameters, conditioning signature): it is kept in
a cache keyed weakly on the user's velocity (:func:`graph_bytes`), so repeated ``solve`` calls
and every evaluation of an ``optimize`` run reuse it, and it disappears with the velocity. The
split itself is arithmetic on the measurement, redone per solve for its batch, steps and budget.
The estimate assumes the graph scales linearly with the batch; on
the test velocities it is within 1% of what backprop saves (tests/test_auto.py checks 5%). Then,
with g the graph bytes per step and s the stored bytes per step, m is the largest with
``m g + (N - m) s <= budget`` (all N graph steps when ``N g`` fits); for a reversible solver whose
N stored steps alone exceed the budget, m = 0 and as many stored steps as fit, the rest reversible.

``memory_budget`` counts the bytes a solve keeps for its backward (graphs and stored states), not
x0, the weights, or a step's transient working memory. Default: on CUDA
:data:`CUDA_FREE_FRACTION` of the free device memory (``torch.cuda.mem_get_info``) at the start of
each solve; on the CPU :data:`DEFAULT_CPU_BUDGET`, since host memory is not queried.

Out of memory: a ``torch.OutOfMemoryError`` (CUDA's included) during the forward retries the solve
with half the estimated bytes of the failed split, until the split cannot shrink any more (then it
is raised: the adjoint's one-step recomputation is the floor). One in the backward of the graph
steps frees their graph and recomputes those steps with the adjoint instead. Either lowers the
plan's budget cap (:class:`AutoMemo`), which later solves of the same plan (optimize's
iterations) respect. Both log a warning on the ``dflow_fast`` logger. The graph steps therefore
run inside an autograd.Function (:class:`GraphSegment`) that owns their graph; it keeps the same
tensors as plain backprop.

This module decides; :func:`dflow_fast.gradients.dispatch.run` runs the chosen segments.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.plan import Plan
from ..core.precision import scaled_grad
from ..core.reversible_steps import backward_sweep
from ..core.steps import State, advance, initial_state
from ..core.velocity import Velocity
from .adjoint import adjoint_sweep, forward_states, saved_per_step
from .common import guarded, reachable_tensors

log = logging.getLogger("dflow_fast")

#: memory_budget on the CPU when none is given (bytes)
DEFAULT_CPU_BUDGET = 2 * 2 ** 30
#: memory_budget on CUDA when none is given: this fraction of the free device memory
CUDA_FREE_FRACTION = 0.5


@dataclass(frozen=True)
class Split:
    """Steps per segment, in order: graph, stored, reversible."""

    graph: int
    stored: int
    reversible: int = 0

    def segments(self) -> list[tuple[str, int, int]]:
        """The chain ``[(kind, k0, k1), ...]`` of non-empty segments, in order; the graph steps
        run in a :class:`GraphSegment` ("owned_graph")."""
        out, k = [], 0
        for kind, n in (("owned_graph", self.graph), ("stored", self.stored),
                        ("reversible", self.reversible)):
            if n:
                out.append((kind, k, k + n))
                k += n
        return out


@dataclass(frozen=True)
class Costs:
    """Bytes a solve keeps for backward, for one batch: ``graph`` per graph step, ``first`` extra
    for the first graph step (reversible Heun's initial evaluation), ``stored`` per stored step,
    ``fixed`` for a reversible segment (its saved pairs)."""

    graph: float
    stored: float
    first: float = 0.0
    fixed: float = 0.0

    def of(self, split: Split) -> float:
        graph = split.graph * self.graph + self.first if split.graph else 0.0  # graph may be inf
        return (graph
                + split.stored * self.stored + (self.fixed if split.reversible else 0.0))


def allocate(n: int, costs: Costs, budget: float, reversible_solver: bool) -> Split:
    """The split of n steps with the most graph steps whose bytes fit ``budget``; when nothing
    fits, the split of least memory (the adjoint's, or for a reversible solver the reversible
    sweep's for the steps whose states do not fit)."""
    if costs.of(Split(n, 0)) <= budget:
        return Split(n, 0)
    if reversible_solver and costs.of(Split(0, n)) > budget:
        room = budget - costs.fixed
        r = min(n, int(room // costs.stored)) if room > 0 and costs.stored > 0 else 0
        return Split(0, r, n - r)
    if costs.graph <= costs.stored:  # a graph step is the cheaper way to keep a step
        return Split(n, 0)
    room = budget - costs.of(Split(0, n)) - costs.first
    m = int(room // (costs.graph - costs.stored)) if room > 0 else 0
    return Split(min(m, n - 1), n - min(m, n - 1))


@dataclass
class AutoMemo:
    """What gradient="auto" learns across the solves that share a plan (optimize's iterations):
    the cap that an out-of-memory error put on the budget, and the last split with its estimated
    bytes. (The measured graph bytes outlive the plan: :func:`graph_bytes`.)"""

    budget_cap: float = math.inf
    split: Split | None = None
    estimate: float = math.inf

    def lower_cap(self, cap: float) -> None:
        self.budget_cap = min(self.budget_cap, cap)


# Keyed by the plan's identity and dropped with it: a plan lives as long as its solve or optimize.
_MEMOS: "weakref.WeakKeyDictionary[Plan, AutoMemo]" = weakref.WeakKeyDictionary()


def memo(plan: Plan) -> AutoMemo:
    """The :class:`AutoMemo` of ``plan`` (created empty on first use)."""
    m = _MEMOS.get(plan)
    if m is None:
        m = _MEMOS[plan] = AutoMemo()
    return m


# velocity object -> {measurement key: graph bytes per sample}. Weak: an entry goes with its
# velocity. The values hold no reference to the velocity (that would keep it alive forever).
_GRAPH_BYTES: "weakref.WeakKeyDictionary[object, dict[tuple, float]]" = (
    weakref.WeakKeyDictionary())


def _cache_of(velocity: object) -> tuple[dict | None, tuple]:
    """The measurements cached for ``velocity`` and what to add to their key: a bound method is
    keyed on its object (``model.forward`` is a new object at every attribute access) plus its
    function. None when the velocity cannot be a weak key (not hashable, or no weak references:
    some builtins): it is then measured at every solve, as without the cache."""
    owner, extra = velocity, ()
    if inspect.ismethod(velocity):
        owner, extra = velocity.__self__, (velocity.__func__,)
    try:
        entry = _GRAPH_BYTES.get(owner)
        if entry is None:
            entry = _GRAPH_BYTES[owner] = {}
    except TypeError:
        return None, extra
    return entry, extra


def graph_bytes(u: Velocity, plan: Plan, x0: Tensor, params: tuple[Tensor, ...]) -> float:
    """Bytes one step's graph keeps per sample (:func:`measure_graph_bytes`), measured once per
    velocity and key (module doc) and cached weakly on the user's velocity (``u.key`` of a
    :class:`~dflow_fast.core.velocity.CheckedVelocity`, else ``u``)."""
    signature = u.signature() if hasattr(u, "signature") else ()
    entry, extra = _cache_of(getattr(u, "key", u))
    key = (*extra, tuple(x0.shape[1:]), x0.dtype, x0.device, plan.solver, plan.autocast,
           plan.low, tuple(id(p) for p in params), tuple(p.requires_grad for p in params),
           signature)
    if entry is None:
        return measure_graph_bytes(u, plan, x0, params)
    if key not in entry:
        entry[key] = measure_graph_bytes(u, plan, x0, params)
    return entry[key]


def default_budget(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return CUDA_FREE_FRACTION * free
    return float(DEFAULT_CPU_BUDGET)


def measure_graph_bytes(u: Velocity, plan: Plan, x0: Tensor, params: tuple[Tensor, ...]) -> float:
    """Bytes autograd saves for backward in one step's graph, per sample (see the module doc).
    Reversible Heun's first step also holds the initial evaluation: half of it is one step."""
    skip = {t.untyped_storage().data_ptr() for t in (*reachable_tensors(u), *params)}
    sizes: dict[int, int] = {}
    kept: list[Tensor] = []

    def pack(t: Tensor) -> None:
        # `kept` holds every saved tensor until the end, so storage addresses are unique here and
        # count each storage once. The graph itself holds nothing: a graph that saved the tensors
        # it outputs would form a reference cycle (node -> saved output -> node) that only the
        # cyclic garbage collector frees, and on CUDA that graph stayed allocated through the
        # real solve (measured: auto's peak one step's graph above the adjoint's).
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            sizes[storage.data_ptr()] = storage.nbytes()
        kept.append(t)

    def unpack(_: None) -> Tensor:
        raise RuntimeError("dflow_fast: the memory-measuring step has no backward")

    leaf = x0.detach().requires_grad_(True)
    # its calls are counted apart: per-sample evaluation counts must not depend on the cache
    counted = u.measuring() if hasattr(u, "measuring") else contextlib.nullcontext()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack), counted:
        out = advance(u, plan, 0, 1, initial_state(plan, leaf))
    del out  # the step's graph: transient, the size of what one kept step costs anyway
    kept.clear()
    total = sum(sizes.values())
    per_step = total / 2 if plan.solver == "reversible_heun" else total
    return per_step / x0.shape[0]


def _costs(u: Velocity, plan: Plan, x0: Tensor, params: tuple[Tensor, ...]) -> Costs:
    g = graph_bytes(u, plan, x0, params) * x0.shape[0]
    state = x0.numel() * x0.element_size()
    heun = plan.solver == "reversible_heun"
    per = 2 if plan.base else saved_per_step(plan)  # coupled solvers: the (y, z) pair
    return Costs(graph=g, stored=state * per,
                 first=g if heun else 0.0, fixed=2 * state if plan.reversible else 0.0)


class GraphSegment(torch.autograd.Function):
    """Steps k0 .. k1-1 with their autograd graph kept, owned by this Function so that an
    out-of-memory error in its backward can fall back to recomputing them with the adjoint.
    Inputs: velocity, plan, guard (scheme name or None), k0, k1, the number of state tensors, the
    state (x, or the pair of a reversible solver), then the velocity's parameters."""

    @staticmethod
    def forward(ctx, u, plan: Plan, guard: str | None, k0: int, k1: int, n_state: int,
                *args: Tensor):
        state, params = args[:n_state], args[n_state:]
        # Detached aliases: no copy, and the same version counters, so an in-place change of the
        # inputs before backward is still caught by the graph's saved tensors.
        leaves = tuple(s.detach().requires_grad_(s.requires_grad) for s in state)
        with torch.enable_grad():
            out = advance(guarded(u, params, guard), plan, k0, k1, leaves)
        ctx.kept, ctx.leaves, ctx.u, ctx.plan, ctx.params = out, leaves, u, plan, params
        ctx.k = (k0, k1)
        return tuple(o.detach() for o in out)

    @staticmethod
    @once_differentiable
    def backward(ctx, *cots: Tensor):
        n = len(ctx.leaves)
        need_state = ctx.needs_input_grad[6:6 + n]
        need_p = ctx.needs_input_grad[6 + n:]
        inputs = ([x for x, nd in zip(ctx.leaves, need_state) if nd]
                  + [p for p, nd in zip(ctx.params, need_p) if nd])
        graph, ctx.kept = ctx.kept, None  # consumed either way
        grads = None
        try:
            grads = _graph_vjp(graph, inputs, cots, ctx.plan.low, not any(need_p))
        except torch.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the graph's buffers
        if grads is None:
            del graph
            m = memo(ctx.plan)
            m.lower_cap(m.estimate / 2)
            log.warning("dflow_fast: out of memory in the backward of %d graph steps under "
                        "gradient='auto'; recomputing them with the adjoint", ctx.k[1] - ctx.k[0])
            _empty_cache(ctx.leaves[0])
            grads = _recompute(ctx, cots, need_state, need_p)
        it = iter(grads)
        state_grads = [next(it) if nd else None for nd in need_state]
        return (None,) * 6 + (*state_grads, *[next(it) if nd else None for nd in need_p])


def _graph_vjp(graph: State, inputs: list[Tensor], cots: tuple[Tensor, ...],
               low: torch.dtype | None, per_sample: bool) -> tuple:
    """VJP of the kept graph; outputs without a graph (a velocity constant in x and in every
    input) contribute nothing. ``low``/``per_sample``: float16 cotangent scaling
    (core/precision.py); ``per_sample`` when only states are among ``inputs``."""
    pairs = [(o, c) for o, c in zip(graph, cots) if o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    outs, cs = zip(*pairs)
    return scaled_grad(outs, inputs, cs, low, per_sample)


def _recompute(ctx, cots, need_state, need_p) -> list:
    """The graph segment's gradients by the stored adjoint (its fallback after an OOM)."""
    plan, (k0, k1) = ctx.plan, ctx.k
    params = tuple(p for p, nd in zip(ctx.params, need_p) if nd)
    with torch.no_grad():
        if plan.reversible:
            points: list = []
            advance(ctx.u, plan, k0, k1, ctx.leaves, points)
            a_y, a_w, acc, _ = backward_sweep(ctx.u, plan, k0, k1, *cots, params, points=points)
            state_grads = [a_y, a_w]
        else:
            states, _ = forward_states(ctx.u, plan, k0, k1, ctx.leaves[0])
            a, acc = adjoint_sweep(ctx.u, plan, k0, k1, states, cots[0], params)
            state_grads = [a]
    return [g for g, nd in zip(state_grads, need_state) if nd] + list(acc)


def _empty_cache(like: Tensor) -> None:
    if like.is_cuda:
        torch.cuda.empty_cache()


def choose(u: Velocity, plan: Plan, x0: Tensor, params: tuple[Tensor, ...],
           memory_budget: float | None) -> tuple[Split, Costs]:
    """The split of the plan's steps for this solve, and the costs it was chosen by (see the
    module doc). Records the split and its estimated bytes in :func:`memo`."""
    budget = default_budget(x0.device) if memory_budget is None else float(memory_budget)
    budget = min(budget, memo(plan).budget_cap)
    try:
        costs = _costs(u, plan, x0, params)
    except torch.OutOfMemoryError:
        costs = None  # not even one measuring step fits: keep no graph at all
    if costs is None:
        _empty_cache(x0)
        costs = Costs(graph=math.inf, stored=x0.numel() * x0.element_size())
    split = allocate(plan.steps, costs, budget, plan.reversible)
    _record(plan, split, costs)
    return split, costs


def shrink(plan: Plan, split: Split, costs: Costs) -> Split | None:
    """After an out-of-memory error in the forward of ``split``: the split with half its bytes,
    or None when it cannot shrink any more (the adjoint's one-step recomputation is the floor)."""
    smaller = allocate(plan.steps, costs, costs.of(split) / 2, plan.reversible)
    return None if smaller == split else smaller


def retry(plan: Plan, failed: Split, smaller: Split, costs: Costs, like: Tensor) -> None:
    """Lower the plan's budget cap after a failed forward and log the retry (called outside the
    except block, so the failed attempt's partial graph is already freed)."""
    memo(plan).lower_cap(costs.of(failed) / 2)
    log.warning("dflow_fast: out of memory under gradient='auto' with %s; retrying with %s",
                failed, smaller)
    _empty_cache(like)
    _record(plan, smaller, costs)


def _record(plan: Plan, split: Split, costs: Costs) -> None:
    m = memo(plan)
    m.split, m.estimate = split, costs.of(split)
