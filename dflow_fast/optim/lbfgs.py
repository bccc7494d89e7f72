"""Batched L-BFGS: B independent problems, each with its own history, line search and stopping.

The vector algebra (two-loop recursion, history updates) runs batched over the active samples, and
so do the samples' strong-Wolfe line searches (optim/wolfe.py: each sample's state a row of [B]
device tensors, every branch a mask), so the trial points of all active samples are evaluated
together in one batched call. Samples advance asynchronously: one whose line search ends starts
its next iteration in the next call, so no call waits on the slowest search. A sample's iterates
therefore do not depend on the other samples in the batch (up to the rounding of batched
arithmetic).

Host synchronisation: everything between two batched evaluations (line-search steps, acceptance,
history, stopping tests, the next directions and their descent tests) stays on the device; the
host reads one small packed tensor per evaluation (status, moved, value of each sample), which
decides the next active set. Index tensors go to the device without a blocking copy.

Algorithm: Nocedal & Wright, Numerical Optimization (2nd ed.), Alg. 7.4 (two-loop recursion) and
Alg. 3.5/3.6 (strong-Wolfe bracketing and zoom) with cubic interpolation (eq. 3.59); the safeguards
and stopping tests follow the conventions of ``torch.optim.LBFGS`` so that defaults mean the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor

from ..core.checks import check_positive, check_tolerances
from ..ops import twins
from .samples import Evaluate, OnIteration, Samples
from .wolfe import WolfeSearches


@dataclass(frozen=True)
class LBFGSOptions:
    """L-BFGS settings; each means what it means in ``torch.optim.LBFGS``.

    max_iter: iterations per sample. max_eval: cost-and-gradient evaluations per sample (None:
    ``max_iter * 5 // 4``, as torch). lr: initial step scale. history_size: memory m.
    tolerance_grad / tolerance_change: stop when ``max |g|`` / the step or loss change falls below.
    """

    max_iter: int = 20
    max_eval: Optional[int] = None
    lr: float = 1.0
    history_size: int = 10
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9

    def checked(self) -> "LBFGSOptions":
        """Validated, with ``max_eval`` filled in; raises ValueError naming the field."""
        check_positive("max_iter", self.max_iter, integer=True)
        check_positive("history_size", self.history_size, integer=True)
        max_eval = default_max_eval(self.max_iter) if self.max_eval is None else self.max_eval
        check_positive("max_eval", max_eval, integer=True)
        check_positive("lr", self.lr)
        check_tolerances(self)
        return replace(self, max_eval=max_eval)


def default_max_eval(max_iter: int) -> int:
    """L-BFGS's cost-and-gradient evaluations per sample when ``max_eval`` is not given (as
    torch.optim.LBFGS: 5/4 of the iterations)."""
    return max_iter * 5 // 4


def batched_lbfgs(evaluate: Evaluate, x: Tensor, options: LBFGSOptions, *,
                  on_iteration: Optional[OnIteration] = None,
                  direction: Callable = twins.lbfgs_direction):
    """Minimize B independent objectives from ``x`` [B, D].

    ``direction(g, S, Y, rho, gamma)`` is the two-loop recursion of the chosen backend.
    ``on_iteration(samples, x, f, done)`` runs after every batched evaluation in which the samples
    ``done`` (a list) completed an iteration; ``x`` holds each sample's latest iterate (samples
    advance at their own pace: ``samples.nit``). Returning True stops all; it may also stop single
    samples with ``samples.stop(i, why)``.
    Returns ``(x [B, D], f [B], x1 [B, *S], samples)``; each sample ends on its last accepted
    (finite) iterate with ``samples.status[i]`` saying why it stopped.
    """
    st = _LBFGS(evaluate, x, options.checked(), direction)
    while st.active:
        done = st.evaluate_active()
        if done and on_iteration is not None:
            if on_iteration(st.smp, st.x, st.f, done):
                for i in st.smp.active():
                    st.smp.stop(i, "callback")
            st.adopt_host_stops()  # the callback may also stop single samples ("target")
    return st.x, st.f, st.x1, st.smp


#: per-sample status codes on the device (0: still optimizing) and their names in Samples.status
STATUSES = ("converged", "max_iter", "max_eval", "nonfinite", "line_search_failed")
_CODE = {name: k + 1 for k, name in enumerate(STATUSES)}
_HOST_STOP = -1  # stopped from the host (callback, target): Samples.status has the reason


def _to_device(ids: list[int], device: torch.device) -> Tensor:
    """Sample indices as an int64 tensor on ``device`` without waiting for it: from pinned memory
    with a non-blocking copy on CUDA (a pageable copy would synchronise the stream)."""
    t = torch.tensor(ids, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Rows:
    """The rows a step works on: ``ids`` [n] (on the device; what ``evaluate`` is given), and
    whether they are all B rows in order, where reading a [B, ...] tensor's rows is the tensor
    itself and writing them a copy (no gathers or scatters while every sample is active).
    Reads may alias the state: callers read everything they need before they write."""

    def __init__(self, ids: Tensor, B: int, every: bool):
        self.ids, self.B, self.every = ids, B, every
        self.n = B if every else ids.shape[0]

    def take(self, t: Tensor) -> Tensor:
        return t if self.every else t.index_select(0, self.ids)

    def put(self, t: Tensor, v: Tensor) -> None:
        if self.every:
            t.copy_(v)
        else:
            t.index_copy_(0, self.ids, v)

    def full(self, v: Tensor, fill: float) -> Tensor:
        """[n] -> [B] float64, ``fill`` outside the rows."""
        v = v.double()
        if self.every:
            return v
        return torch.full((self.B,), fill, dtype=torch.float64, device=v.device).index_copy_(
            0, self.ids, v)

    def mask(self) -> Tensor:
        """[B] bool: these rows."""
        m = torch.zeros(self.B, dtype=torch.bool, device=self.ids.device)
        return m.fill_(True) if self.every else m.index_fill_(0, self.ids, True)


class _LBFGS:
    """The state of a batched L-BFGS run, all of it on x's device: iterates ``x`` [B, D], values
    ``f`` [B], gradients ``g`` [B, D] and solutions ``x1`` [B, *S] of each sample's accepted point;
    the histories ``S, Y`` [B, m, D], ``rho`` [B, m] as rings whose oldest slot (the next one
    written) is ``pos`` [B], ``gamma`` [B]; directions ``d`` [B, D];
    ``status`` [B] (0 while active, else 1 + its index in :data:`STATUSES`), ``nit``, ``nfev``
    [B]; the line searches ``ls`` and the gradient ``g_lo`` [B, D] and solution ``x1_lo``
    [B, *S] of each search's best point. The host keeps ``smp`` (:class:`Samples`) and the list
    ``active``, both updated from one read per batched evaluation.

    Samples advance asynchronously (module docstring): the number of batched evaluations is the
    largest per-sample count, not the sum over iterations of the longest line search."""

    def __init__(self, evaluate: Evaluate, x: Tensor, opt: LBFGSOptions, direction: Callable):
        B, D = x.shape
        m, dev = opt.history_size, x.device
        self.evaluate, self.opt, self.direction = evaluate, opt, direction
        self.x = x.clone()
        self.f, self.g, self.x1 = evaluate(None, self.x)
        self.S = x.new_zeros(B, m, D)
        self.Y = x.new_zeros(B, m, D)
        self.rho = x.new_zeros(B, m)
        self.gamma = x.new_ones(B)
        self.pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self.d = torch.zeros_like(x)
        self.g_lo = torch.zeros_like(self.g)
        self.x1_lo = torch.zeros_like(self.x1)
        self.status = torch.zeros(B, dtype=torch.int64, device=dev)
        self.nit = torch.zeros(B, dtype=torch.int64, device=dev)
        self.nfev = torch.ones(B, dtype=torch.int64, device=dev)
        self.ls = WolfeSearches(B, dev, opt.tolerance_change)
        self._stop(~(torch.isfinite(self.f) & torch.isfinite(self.g).all(1)), "nonfinite")
        # in g's dtype, as torch.optim.LBFGS's first test (the later ones compare in float64)
        self._stop(self.g.abs().amax(1) <= opt.tolerance_grad, "converged")
        self.every = _Rows(torch.arange(B, device=dev), B, every=True)
        self._begin(self.every, self.status == 0)
        self.smp = Samples(B)
        status, f = torch.stack((self.status.double(), self.f.double())).tolist()  # the one read
        for i in range(B):
            self.smp.nfev[i] = 1
            self.smp.history[i].append(f[i])
        self._read_status(range(B), status)

    def _stop(self, rows: Tensor, why: str) -> None:
        """Stop the still-active samples of the [B] mask ``rows`` with status ``why``."""
        self.status = torch.where(rows & (self.status == 0), _CODE[why], self.status)

    def _read_status(self, ids, status: list[float]) -> None:
        """Record on the host the device statuses of the samples ``ids``."""
        for i in ids:
            if status[i]:
                self.smp.stop(i, STATUSES[int(status[i]) - 1])
        self.active = self.smp.active()

    def adopt_host_stops(self) -> None:
        """Stop on the device the samples stopped on the host since the last evaluation (a
        non-blocking upload, only when there are any)."""
        now = self.smp.active()
        if len(now) < len(self.active):
            gone = sorted(set(self.active) - set(now))
            self.status.index_fill_(0, _to_device(gone, self.status.device), _HOST_STOP)
            self.active = now

    def _begin(self, rows: _Rows, start: Tensor) -> None:
        """Begin an iteration for the ``rows`` whose [B] mask ``start`` is set: the L-BFGS
        direction (batched two-loop recursion over ``rows``) into ``d``, the descent test, and a
        strong-Wolfe search whose first step is 1 / ||g||_1 (capped at 1) times lr in a sample's
        first iteration and lr afterwards (as torch.optim.LBFGS)."""
        opt = self.opt
        g_i = rows.take(self.g)
        # Each row's ring read oldest first: the order the two-loop recursion expects (one flat
        # index_select per history: advanced indexing with two index tensors is slower on CPUs).
        n, m, D = rows.n, self.rho.shape[1], self.x.shape[1]
        ring = (rows.ids[:, None] * m + (rows.take(self.pos)[:, None]
                                         + torch.arange(m, device=g_i.device)) % m).flatten()
        d_i = self.direction(g_i, self.S.view(-1, D).index_select(0, ring).view(n, m, D),
                             self.Y.view(-1, D).index_select(0, ring).view(n, m, D),
                             self.rho.view(-1).index_select(0, ring).view(n, m),
                             rows.take(self.gamma))
        d_i = torch.where(rows.take(start)[:, None], d_i, rows.take(self.d))
        gtd = rows.full((g_i * d_i).sum(1), 0.0)
        g_l1 = rows.full(g_i.abs().sum(1), 0.0)
        d_inf = rows.full(d_i.abs().amax(1), 0.0)
        rows.put(self.d, d_i)
        self._stop(start & ~(gtd <= -opt.tolerance_change), "converged")  # not descent (or NaN)
        start = start & (self.status == 0)
        t = torch.where(self.nit == 0, torch.minimum(1.0 / g_l1, torch.ones_like(g_l1)) * opt.lr,
                        torch.full_like(g_l1, opt.lr))
        # torch.optim.LBFGS's budget: a search may take max_eval - (evaluations so far) + 1
        self.ls.start(start, t, self.f.double(), gtd, d_inf, opt.max_eval - self.nfev + 1)

    def evaluate_active(self) -> list[int]:
        """One batched evaluation of every active sample's trial step; advances the line
        searches, accepts the points of those that ended and begins their next iterations, then
        reads the outcome in one transfer. Returns the samples that moved (completed an
        iteration)."""
        ids, B, dt = self.active, self.x.shape[0], self.x.dtype
        rows = (self.every if len(ids) == B else
                _Rows(_to_device(ids, self.x.device), B, every=False))
        t = rows.take(self.ls.t).to(dt)  # the step actually taken, rounded to x's dtype
        d_i = rows.take(self.d)
        xt = rows.take(self.x) + t[:, None] * d_i
        ft, gt, x1t = self.evaluate(rows.ids, xt)
        ev = rows.mask()
        self.nfev += ev.long()
        takes, ends, bad = self.ls.step(ev, rows.full(t, math.nan), rows.full(ft, math.nan),
                                        rows.full((gt * d_i).sum(1), math.nan))
        take = rows.take(takes)
        rows.put(self.g_lo, torch.where(take[:, None], gt, rows.take(self.g_lo)))
        rows.put(self.x1_lo, torch.where(take.view(-1, *[1] * (x1t.dim() - 1)), x1t,
                                         rows.take(self.x1_lo)))
        self._stop(bad, "nonfinite")  # keeps its last finite iterate
        # no decrease found: within the budget, or before the budget ran out
        self._stop(ends & self.ls.lo_is_start & (self.nfev >= self.opt.max_eval), "max_eval")
        self._stop(ends & self.ls.lo_is_start, "line_search_failed")
        moved = ends & (self.status == 0)
        self._accept(rows, moved)
        self._begin(rows, moved & (self.status == 0))
        status, moved_h, f = torch.stack((self.status.double(), moved.double(),
                                          self.ls.f_lo)).tolist()  # the one read
        done = []
        for i in ids:
            self.smp.nfev[i] += 1
            if moved_h[i]:
                self.smp.nit[i] += 1
                self.smp.history[i].append(f[i])
                done.append(i)
        self._read_status(ids, status)
        return done

    def _accept(self, rows: _Rows, moved: Tensor) -> None:
        """Move the ``rows`` whose [B] mask ``moved`` is set to their search's accepted point,
        update their histories and apply the stopping tests of torch.optim.LBFGS."""
        opt, mv = self.opt, rows.take(moved)
        x_old, g_old, f_old = rows.take(self.x), rows.take(self.g), rows.take(self.f)
        # The accepted point's x exactly as it was evaluated: x + t d with t in x's dtype.
        x_new = x_old + rows.take(self.ls.t_lo).to(x_old.dtype)[:, None] * rows.take(self.d)
        g_new = rows.take(self.g_lo)
        s, y = x_new - x_old, g_new - g_old
        g_inf, step_inf = rows.full(g_new.abs().amax(1), 0.0), rows.full(s.abs().amax(1), 0.0)
        f_change = (self.ls.f_lo - rows.full(f_old, 0.0)).abs()
        self._update_history(rows, mv, s, y)
        col = mv[:, None]
        rows.put(self.x, torch.where(col, x_new, x_old))
        rows.put(self.g, torch.where(col, g_new, g_old))
        rows.put(self.f, torch.where(mv, rows.take(self.ls.f_lo).to(f_old.dtype), f_old))
        rows.put(self.x1, torch.where(mv.view(-1, *[1] * (self.x1.dim() - 1)),
                                      rows.take(self.x1_lo), rows.take(self.x1)))
        self.nit += moved.long()
        self._stop(moved & (self.nit >= opt.max_iter), "max_iter")
        self._stop(moved & (self.nfev >= opt.max_eval), "max_eval")
        self._stop(moved & (g_inf <= opt.tolerance_grad), "converged")
        self._stop(moved & ((step_inf <= opt.tolerance_change) | (f_change < opt.tolerance_change)),
                   "converged")

    def _update_history(self, rows: _Rows, mv: Tensor, s: Tensor, y: Tensor) -> None:
        """Append the curvature pairs (s, y) [n, D] of the ``rows`` with mask ``mv``; pairs
        with <y, s> too small are skipped (the inverse-Hessian update needs it > 0)."""
        ys = (y * s).sum(1)
        yy = (y * y).sum(1)
        keep = mv & (ys > 1e-10)
        # Overwrite each kept row's oldest slot (a ring: no copy of the other m - 1 pairs).
        m, D = self.rho.shape[1], s.shape[1]
        p = rows.take(self.pos)
        slot = rows.ids * m + p  # rows of the [B * m, ...] views
        col = keep[:, None]
        for hist, new in ((self.S.view(-1, D), s), (self.Y.view(-1, D), y)):
            hist.index_copy_(0, slot, torch.where(col, new, hist.index_select(0, slot)))
        rho = self.rho.view(-1)
        rho.index_copy_(0, slot, torch.where(keep, 1.0 / ys, rho.index_select(0, slot)))
        rows.put(self.gamma, torch.where(keep, ys / yy, rows.take(self.gamma)))
        rows.put(self.pos, (p + keep.long()) % m)
