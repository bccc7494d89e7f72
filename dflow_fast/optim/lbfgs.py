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
from dataclasses import dataclass, replace
from typing import Callable, Generator, Optional

import torch
from torch import Tensor

from ..core.checks import check_positive, check_tolerances
from ..ops import twins
from .samples import Evaluate, OnIteration, Samples


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


def batched_lbfgs(evaluate: Evaluate, x: Tensor, options: LBFGSOptions, *,
                  on_iteration: Optional[OnIteration] = None,
                  direction: Callable = twins.lbfgs_direction):
    """Minimize B independent objectives from ``x`` [B, D].

    ``direction(g, S, Y, rho, gamma)`` is the two-loop recursion of the chosen backend.
    ``on_iteration(samples, x, f, done)`` runs after every batched evaluation in which the samples
    ``done`` (a list) completed an iteration; ``x`` holds each sample's latest iterate (samples
    advance at their own pace: ``samples.nit``). Returning True stops all.
    Returns ``(x [B, D], f [B], x1 [B, *S], samples)``; each sample ends on its last accepted
    (finite) iterate with ``samples.status[i]`` saying why it stopped.
    """
    st = _LBFGS(evaluate, x, options.checked(), direction)
    while True:
        st.start_searches()
        if not st.pending:
            break
        done = st.evaluate_pending()
        if done and on_iteration is not None and on_iteration(st.smp, st.x, st.f, done):
            for i in st.smp.active():
                st.smp.stop(i, "callback")
            st.drop_stopped()
    return st.x, st.f, st.x1, st.smp


class _LBFGS:
    """The state of a batched L-BFGS run: iterates ``x`` [B, D], values ``f`` [B], gradients
    ``g`` [B, D] and solutions ``x1`` [B, *S] of each sample's accepted point; the histories
    ``S, Y`` [B, m, D], ``rho`` [B, m], ``gamma`` [B]; each searching sample's direction ``d``
    [B, D], its line search and the step it wants evaluated next.

    Samples advance asynchronously (module docstring): the number of batched evaluations is the
    largest per-sample count, not the sum over iterations of the longest line search."""

    def __init__(self, evaluate: Evaluate, x: Tensor, opt: LBFGSOptions, direction: Callable):
        B, D = x.shape
        m = opt.history_size
        self.evaluate, self.opt, self.direction = evaluate, opt, direction
        self.x = x.clone()
        self.f, self.g, self.x1 = evaluate(None, self.x)
        self.smp = Samples(B)
        self.smp.start(self.f, self.g)
        for i, small in enumerate((self.g.abs().amax(1) <= opt.tolerance_grad).tolist()):
            if small:
                self.smp.stop(i, "converged")
        self.S = x.new_zeros(B, m, D)
        self.Y = x.new_zeros(B, m, D)
        self.rho = x.new_zeros(B, m)
        self.gamma = x.new_ones(B)
        self.d = torch.zeros_like(x)
        self.searches: dict[int, LineSearch] = {}
        self.pending: dict[int, float] = {}  # sample -> the step its search wants evaluated next

    def start_searches(self) -> None:
        """Begin an iteration for every active sample without a search: its L-BFGS direction
        (batched two-loop recursion) into ``d`` and a strong-Wolfe search whose first step goes
        into ``pending``."""
        fresh = [i for i in self.smp.active() if i not in self.searches]
        if not fresh:
            return
        opt, smp = self.opt, self.smp
        idx = torch.tensor(fresh, device=self.x.device)
        g_i = self.g[idx]
        d_i = self.direction(g_i, self.S[idx], self.Y[idx], self.rho[idx], self.gamma[idx])
        self.d[idx] = d_i
        gtd = (g_i * d_i).sum(1).tolist()
        g_l1 = g_i.abs().sum(1).tolist()
        d_inf = d_i.abs().amax(1).tolist()
        f_now = self.f[idx].tolist()  # one device sync, not one per sample
        for r, i in enumerate(fresh):
            if not gtd[r] <= -opt.tolerance_change:  # not a descent direction (or NaN)
                smp.stop(i, "converged")
                continue
            t = min(1.0, 1.0 / g_l1[r]) * opt.lr if smp.nit[i] == 0 else opt.lr
            ls = strong_wolfe(t, Trial(0.0, f_now[r], gtd[r]), d_inf[r],
                              tolerance_change=opt.tolerance_change)
            self.searches[i] = ls
            self.pending[i] = next(ls)

    def evaluate_pending(self) -> list[int]:
        """One batched evaluation of every pending trial step; feeds each result to its search
        and accepts the points of the searches that ended. Returns the samples that moved."""
        ids = list(self.pending)
        sel = torch.tensor(ids, device=self.x.device)
        # Steps rounded to x's dtype (the step actually taken), read back without a sync.
        ts_host = torch.tensor([self.pending[i] for i in ids], dtype=self.x.dtype)
        steps = ts_host.tolist()
        di = self.d[sel]
        xt = self.x[sel] + ts_host.to(self.x.device)[:, None] * di
        ft, gt, x1t = self.evaluate(sel, xt)
        gtd_t = (gt * di).sum(1).tolist()
        self.pending = {}
        accepted: dict[int, Optional[Trial]] = {}
        for r, (i, fi) in enumerate(zip(ids, ft.tolist())):
            self.smp.nfev[i] += 1
            try:
                self.pending[i] = self.searches[i].send(
                    Trial(steps[r], fi, gtd_t[r], xt[r], gt[r], x1t[r]))
            except StopIteration as done:
                accepted[i] = done.value
                del self.searches[i]
        return self.accept(accepted) if accepted else []

    def drop_stopped(self) -> None:
        """Forget the searches of samples stopped from outside (the callback)."""
        for i in [i for i in self.pending if self.smp.status[i] is not None]:
            del self.pending[i], self.searches[i]

    def accept(self, accepted: dict[int, Optional[Trial]]) -> list[int]:
        """Move each sample to its accepted point, update its history and test its stopping
        rules; returns the samples that moved (completed an iteration)."""
        smp, opt = self.smp, self.opt
        moved = []
        for i, tr in accepted.items():
            if tr is None:
                smp.stop(i, "nonfinite")  # keeps its last finite iterate
            elif tr.x is None:
                smp.stop(i, "line_search_failed")  # no decrease along a descent direction
            else:
                moved.append(i)
        if not moved:
            return moved
        idx = torch.tensor(moved, device=self.x.device)
        trials = [accepted[i] for i in moved]
        x_new = torch.stack([tr.x for tr in trials])
        g_new = torch.stack([tr.g for tr in trials])
        s = x_new - self.x[idx]
        y = g_new - self.g[idx]
        self._update_history(idx, s, y)
        f_old = self.f[idx].tolist()
        step_inf = s.abs().amax(1).tolist()
        g_inf = g_new.abs().amax(1).tolist()
        self.x[idx] = x_new
        self.g[idx] = g_new
        self.f[idx] = torch.tensor([tr.f for tr in trials], dtype=self.f.dtype,
                                   device=self.f.device)
        self.x1[idx] = torch.stack([tr.x1 for tr in trials])
        for r, (i, tr) in enumerate(zip(moved, trials)):
            smp.nit[i] += 1
            smp.history[i].append(tr.f)
            if smp.nit[i] >= opt.max_iter:
                smp.stop(i, "max_iter")
            elif smp.nfev[i] >= opt.max_eval:
                smp.stop(i, "max_eval")
            elif g_inf[r] <= opt.tolerance_grad:
                smp.stop(i, "converged")
            elif step_inf[r] <= opt.tolerance_change or abs(tr.f - f_old[r]) < opt.tolerance_change:
                smp.stop(i, "converged")
        return moved

    def _update_history(self, idx: Tensor, s: Tensor, y: Tensor) -> None:
        """Append the curvature pairs (s, y) of samples ``idx``; pairs with <y, s> too small are
        skipped (the inverse-Hessian update needs it > 0)."""
        ys = (y * s).sum(1)
        yy = (y * y).sum(1)
        keep = ys > 1e-10
        if bool(keep.any()):
            k = idx[keep]
            self.S[k] = torch.cat((self.S[k, 1:], s[keep, None]), 1)
            self.Y[k] = torch.cat((self.Y[k, 1:], y[keep, None]), 1)
            self.rho[k] = torch.cat((self.rho[k, 1:], (1.0 / ys[keep])[:, None]), 1)
            self.gamma[k] = ys[keep] / yy[keep]
