"""Batched L-BFGS: B independent problems, each with its own history, line search and stopping.

The vector algebra (two-loop recursion, history updates) runs batched over the active samples;
each sample's strong-Wolfe line search is a small scalar state machine (a Python generator) that
proposes step lengths, so the trial points of all active samples are evaluated together in one
batched call. Samples advance asynchronously: one whose line search ends starts its next iteration
in the next call, so no call waits on the slowest search. A sample's iterates therefore do not
depend on the other samples in the batch (up to the rounding of batched arithmetic).

Algorithm: Nocedal & Wright, Numerical Optimization (2nd ed.), Alg. 7.4 (two-loop recursion) and
Alg. 3.5/3.6 (strong-Wolfe bracketing and zoom) with cubic interpolation (eq. 3.59); the safeguards
and stopping tests follow the conventions of ``torch.optim.LBFGS`` so that defaults mean the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

import torch
from torch import Tensor

from . import _reference

# evaluate(idx [n] int64 or None for all, X [n, D]) -> (f [n], g [n, D], x1 [n, *S])
Evaluate = Callable[[Optional[Tensor], Tensor], "tuple[Tensor, Tensor, Tensor]"]


@dataclass
class Trial:
    """One evaluated point of a sample's line search."""

    t: float
    f: float
    gtd: float
    x: Optional[Tensor] = None  # [D]; None for the start point (t = 0)
    g: Optional[Tensor] = None  # [D]
    x1: Optional[Tensor] = None  # [*S]


def _cubic_min(a: Trial, b: Trial, lo: float, hi: float) -> float:
    """Minimizer of the cubic matching f and f' at a and b, clamped to [lo, hi] (N&W eq. 3.59);
    the interval's middle when the cubic has no minimizer."""
    if a.t == b.t:
        return 0.5 * (lo + hi)
    d1 = a.gtd + b.gtd - 3.0 * (a.f - b.f) / (a.t - b.t)
    disc = d1 * d1 - a.gtd * b.gtd
    if not disc >= 0.0:  # also catches NaN
        return 0.5 * (lo + hi)
    d2 = math.copysign(math.sqrt(disc), b.t - a.t)
    den = b.gtd - a.gtd + 2.0 * d2
    if den == 0.0:
        return 0.5 * (lo + hi)
    t = b.t - (b.t - a.t) * (b.gtd + d2 - d1) / den
    return min(max(t, lo), hi) if math.isfinite(t) else 0.5 * (lo + hi)


LineSearch = Generator[float, Trial, Optional[Trial]]


def strong_wolfe(t: float, start: Trial, d_inf: float, c1: float = 1e-4, c2: float = 0.9,
                 tolerance_change: float = 1e-9, max_ls: int = 25) -> LineSearch:
    """One sample's strong-Wolfe line search along d: yields trial steps t, is sent the evaluated
    Trial, and returns the accepted Trial (``start`` itself if no decrease was found), or None if
    an evaluation was not finite."""
    f0, g0 = start.f, start.gtd
    prev, n = start, 0

    def armijo_fails(p: Trial, ref: Trial) -> bool:
        return p.f > f0 + c1 * p.t * g0 or p.f >= ref.f

    # Bracketing: grow t until the interval [lo, hi] must contain a strong-Wolfe point.
    while True:
        cur = yield t
        n += 1
        if not (math.isfinite(cur.f) and math.isfinite(cur.gtd)):
            return None
        if cur.f > f0 + c1 * cur.t * g0 or (n > 1 and cur.f >= prev.f):
            lo, hi = prev, cur
            break
        if abs(cur.gtd) <= -c2 * g0:
            return cur
        if cur.gtd >= 0:
            lo, hi = cur, prev
            break
        if n >= max_ls:
            return cur  # out of evaluations; cur satisfies the sufficient decrease condition
        t = _cubic_min(prev, cur, cur.t + 0.01 * (cur.t - prev.t), 10.0 * cur.t)
        prev = cur

    # Zoom: shrink the bracket; lo always holds the lowest value satisfying sufficient decrease.
    stuck = False
    while n < max_ls and abs(hi.t - lo.t) * d_inf >= tolerance_change:
        left, right = min(lo.t, hi.t), max(lo.t, hi.t)
        t = _cubic_min(lo, hi, left, right)
        # Keep trial points away from the bracket's ends, or the bracket may stop shrinking.
        eps = 0.1 * (right - left)
        if min(right - t, t - left) < eps:
            if stuck or t >= right or t <= left:
                t = right - eps if abs(t - right) < abs(t - left) else left + eps
                stuck = False
            else:
                stuck = True
        else:
            stuck = False
        cur = yield t
        n += 1
        if not (math.isfinite(cur.f) and math.isfinite(cur.gtd)):
            return None
        if armijo_fails(cur, lo):
            hi = cur
        else:
            if abs(cur.gtd) <= -c2 * g0:
                return cur
            if cur.gtd * (hi.t - lo.t) >= 0:
                hi = lo
            lo = cur
    return lo


@dataclass
class Samples:
    """Per-sample bookkeeping shared by the optimizers."""

    B: int
    status: list = field(default_factory=list)  # None while active, else why it stopped
    nit: list = field(default_factory=list)
    nfev: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.status = [None] * self.B
        self.nit = [0] * self.B
        self.nfev = [0] * self.B
        self.history = [[] for _ in range(self.B)]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s is None]

    def stop(self, i: int, why: str) -> None:
        if self.status[i] is None:
            self.status[i] = why


def _finite_rows(f: Tensor, g: Tensor) -> list[bool]:
    return (torch.isfinite(f) & torch.isfinite(g).all(1)).tolist()


def batched_lbfgs(evaluate: Evaluate, x: Tensor, *, max_iter: int, max_eval: int, lr: float,
                  history_size: int, tolerance_grad: float, tolerance_change: float,
                  on_iteration: Callable[[Samples, Tensor, Tensor, list], bool] | None = None,
                  direction: Callable = _reference.lbfgs_direction):
    """Minimize B independent objectives from ``x`` [B, D].

    ``direction(g, S, Y, rho, gamma)`` is the two-loop recursion of the chosen backend.

    ``on_iteration(samples, x, f, done)`` runs after every batched evaluation in which the samples
    ``done`` (a list) completed an iteration; ``x`` holds each sample's latest iterate (samples
    advance at their own pace: ``samples.nit``). Returning True stops all.
    Returns ``(x [B, D], f [B], x1 [B, *S], samples)``; each sample ends on its last accepted
    (finite) iterate with ``samples.status[i]`` saying why it stopped.
    """
    B, D = x.shape
    m = history_size
    x = x.clone()
    f, g, x1 = evaluate(None, x)
    smp = Samples(B)
    for i, (ok, fi) in enumerate(zip(_finite_rows(f, g), f.tolist())):
        smp.nfev[i] = 1
        smp.history[i].append(fi)
        if not ok:
            smp.stop(i, "nonfinite")
    for i, small in enumerate((g.abs().amax(1) <= tolerance_grad).tolist()):
        if small:
            smp.stop(i, "converged")
    S = x.new_zeros(B, m, D)
    Y = x.new_zeros(B, m, D)
    rho = x.new_zeros(B, m)
    gamma = x.new_ones(B)
    d = torch.zeros_like(x)  # each searching sample's current direction

    # Asynchronous samples (module docstring): the number of batched evaluations is the largest
    # per-sample count, not the sum over iterations of the longest line search.
    searches: dict[int, LineSearch] = {}
    pending: dict[int, float] = {}  # sample -> the step its search wants evaluated next
    while True:
        fresh = [i for i in smp.active() if i not in searches]
        if fresh:
            _start_searches(fresh, x, f, g, d, S, Y, rho, gamma, smp, searches, pending,
                            direction, lr, tolerance_change)
        if not pending:
            break
        ids = list(pending)
        sel = torch.tensor(ids, device=x.device)
        # Steps rounded to x's dtype (the step actually taken), read back without a sync.
        ts_host = torch.tensor([pending[i] for i in ids], dtype=x.dtype)
        steps = ts_host.tolist()
        di = d[sel]
        xt = x[sel] + ts_host.to(x.device)[:, None] * di
        ft, gt, x1t = evaluate(sel, xt)
        gtd_t = (gt * di).sum(1).tolist()
        pending = {}
        accepted: dict[int, Optional[Trial]] = {}
        for r, (i, fi) in enumerate(zip(ids, ft.tolist())):
            smp.nfev[i] += 1
            try:
                pending[i] = searches[i].send(Trial(steps[r], fi, gtd_t[r], xt[r], gt[r], x1t[r]))
            except StopIteration as done:
                accepted[i] = done.value
                del searches[i]
        if not accepted:
            continue
        done = _accept(accepted, x, f, g, x1, S, Y, rho, gamma, smp,
                       max_iter, max_eval, tolerance_grad, tolerance_change)
        if on_iteration is not None and done and on_iteration(smp, x, f, done):
            for i in smp.active():
                smp.stop(i, "callback")
        for i in [i for i in pending if smp.status[i] is not None]:  # stopped by the callback
            del pending[i], searches[i]
    return x, f, x1, smp


def _start_searches(fresh: list[int], x, f, g, d, S, Y, rho, gamma, smp: Samples, searches,
                    pending, direction, lr, tolerance_change) -> None:
    """Begin an iteration for each sample in ``fresh``: its L-BFGS direction (batched two-loop
    recursion) into ``d`` and a strong-Wolfe search whose first step goes into ``pending``."""
    idx = torch.tensor(fresh, device=x.device)
    g_i = g[idx]
    d_i = direction(g_i, S[idx], Y[idx], rho[idx], gamma[idx])
    d[idx] = d_i
    gtd = (g_i * d_i).sum(1).tolist()
    g_l1 = g_i.abs().sum(1).tolist()
    d_inf = d_i.abs().amax(1).tolist()
    f_now = f[idx].tolist()  # one device sync, not one per sample
    for r, i in enumerate(fresh):
        if not gtd[r] <= -tolerance_change:  # not a descent direction (or NaN): stationary
            smp.stop(i, "converged")
            continue
        t = min(1.0, 1.0 / g_l1[r]) * lr if smp.nit[i] == 0 else lr
        ls = strong_wolfe(t, Trial(0.0, f_now[r], gtd[r]), d_inf[r],
                          tolerance_change=tolerance_change)
        searches[i] = ls
        pending[i] = next(ls)


def _accept(accepted, x, f, g, x1, S, Y, rho, gamma, smp: Samples,
            max_iter, max_eval, tolerance_grad, tolerance_change) -> list[int]:
    """Move each sample to its accepted point, update its history and test its stopping rules;
    returns the samples that moved (completed an iteration)."""
    moved = []
    for i, tr in accepted.items():
        if tr is None:
            smp.stop(i, "nonfinite")  # keeps its last finite iterate
        elif tr.x is None:
            smp.stop(i, "line_search_failed")  # no decrease found along a descent direction
        else:
            moved.append(i)
    if not moved:
        return moved
    idx = torch.tensor(moved, device=x.device)
    trials = [accepted[i] for i in moved]
    x_new = torch.stack([tr.x for tr in trials])
    g_new = torch.stack([tr.g for tr in trials])
    s = x_new - x[idx]
    y = g_new - g[idx]
    ys = (y * s).sum(1)
    yy = (y * y).sum(1)
    # Curvature pairs with <y, s> too small are skipped (the inverse-Hessian update needs > 0).
    keep = ys > 1e-10
    if bool(keep.any()):
        k = idx[keep]
        S[k] = torch.cat((S[k, 1:], s[keep, None]), 1)
        Y[k] = torch.cat((Y[k, 1:], y[keep, None]), 1)
        rho[k] = torch.cat((rho[k, 1:], (1.0 / ys[keep])[:, None]), 1)
        gamma[k] = ys[keep] / yy[keep]
    f_old = f[idx].tolist()
    step_inf = s.abs().amax(1).tolist()
    g_inf = g_new.abs().amax(1).tolist()
    x[idx] = x_new
    g[idx] = g_new
    f[idx] = torch.tensor([tr.f for tr in trials], dtype=f.dtype, device=f.device)
    x1[idx] = torch.stack([tr.x1 for tr in trials])
    for r, (i, tr) in enumerate(zip(moved, trials)):
        smp.nit[i] += 1
        smp.history[i].append(tr.f)
        if smp.nit[i] >= max_iter:
            smp.stop(i, "max_iter")
        elif smp.nfev[i] >= max_eval:
            smp.stop(i, "max_eval")
        elif g_inf[r] <= tolerance_grad:
            smp.stop(i, "converged")
        elif step_inf[r] <= tolerance_change or abs(tr.f - f_old[r]) < tolerance_change:
            smp.stop(i, "converged")
    return moved
