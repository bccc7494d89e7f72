"""Strong-Wolfe line searches: one sample's as a scalar state machine (the reference twin), and B
samples' at once as [B] device tensors (what the batched L-BFGS runs).

Algorithm: Nocedal & Wright, Numerical Optimization (2nd ed.), Alg. 3.5/3.6 (bracketing and zoom)
with cubic interpolation (eq. 3.59); constants and safeguards as ``torch.optim.LBFGS``'s
``_strong_wolfe``, so that a sample's trial steps equal torch's.

:class:`WolfeSearches` is :func:`strong_wolfe` with every branch turned into a mask: the same IEEE
float64 operations in the same order, so each sample's trial steps are bitwise those of the scalar
search (tests/optim/test_wolfe.py). Nothing in it reads a device value on the host: the batched
L-BFGS decides what to evaluate next from one read per batched evaluation (docs/design.md,
section 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator, Optional

import torch
from torch import Tensor

C1, C2 = 1e-4, 0.9  # sufficient decrease, curvature (torch)
#: evaluations one search may take when the caller sets no limit (torch's ``_strong_wolfe``
#: default ``max_ls=25`` allows 26). torch.optim.LBFGS itself always passes ``max_ls = max_eval -
#: evaluations so far``, i.e. ``max_eval - nfev + 1`` evaluations: the batched L-BFGS does the same.
MAX_LS = 26


@dataclass
class Trial:
    """One evaluated point of a sample's line search."""

    t: float
    f: float
    gtd: float
    x: Optional[Tensor] = None  # [D]; None for the start point (t = 0)
    g: Optional[Tensor] = None  # [D]
    x1: Optional[Tensor] = None  # [*S]


def _sqrt(v: float) -> float:
    """The square root torch computes for a float64 tensor, as in ``torch.optim.LBFGS``'s cubic
    interpolation and :func:`cubic_min`; on the CPU it is not always correctly rounded (1 ulp from
    ``math.sqrt`` now and then), so the scalar search uses it too, to stay bitwise the batched
    one's twin."""
    return torch.tensor(v, dtype=torch.float64).sqrt().item()


def _cubic_min(a: Trial, b: Trial, lo: float, hi: float) -> float:
    """Minimizer of the cubic matching f and f' at a and b, clamped to [lo, hi] (N&W eq. 3.59);
    the interval's middle when the cubic has no minimizer."""
    if a.t == b.t:
        return 0.5 * (lo + hi)
    d1 = a.gtd + b.gtd - 3.0 * (a.f - b.f) / (a.t - b.t)
    disc = d1 * d1 - a.gtd * b.gtd
    if not disc >= 0.0:  # also catches NaN
        return 0.5 * (lo + hi)
    d2 = math.copysign(_sqrt(disc), b.t - a.t)
    den = b.gtd - a.gtd + 2.0 * d2
    if den == 0.0:
        return 0.5 * (lo + hi)
    t = b.t - (b.t - a.t) * (b.gtd + d2 - d1) / den
    return min(max(t, lo), hi) if math.isfinite(t) else 0.5 * (lo + hi)


LineSearch = Generator[float, Trial, Optional[Trial]]


def strong_wolfe(t: float, start: Trial, d_inf: float, c1: float = C1, c2: float = C2,
                 tolerance_change: float = 1e-9, max_ls: int = MAX_LS) -> LineSearch:
    """One sample's strong-Wolfe line search along d: yields trial steps t, is sent the evaluated
    Trial, and returns the accepted Trial (``start`` itself if no decrease was found), or None if
    an evaluation was not finite. ``max_ls``: the evaluations it may take (>= 1). As torch's, the
    point that uses up the evaluations while bracketing is not tested for the Wolfe conditions:
    the search returns the lower of it and the start."""
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
        if n >= max_ls:  # out of evaluations (torch: bracket [0, t], keep its lower end)
            return cur if cur.f < f0 else start
        # torch compares with the previous point from the third evaluation on (``ls_iter > 1``)
        if cur.f > f0 + c1 * cur.t * g0 or (n > 2 and cur.f >= prev.f):
            break
        if abs(cur.gtd) <= -c2 * g0:
            return cur
        if cur.gtd >= 0:
            break
        t = _cubic_min(prev, cur, cur.t + 0.01 * (cur.t - prev.t), 10.0 * cur.t)
        prev = cur
    # The bracket [prev, cur]; its low end holds the lower value (torch: prev on a tie).
    lo, hi = (cur, prev) if cur.f < prev.f else (prev, cur)

    # Zoom: shrink the bracket; lo holds its lower value (the start point until one is lower).
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
            if cur.f < lo.f:  # torch keeps the bracket's low end by value alone
                lo, hi = cur, lo
        else:
            if abs(cur.gtd) <= -c2 * g0:
                return cur
            if cur.gtd * (hi.t - lo.t) >= 0:
                hi = lo
            lo = cur
    return lo


def cubic_min(ta: Tensor, fa: Tensor, ga: Tensor, tb: Tensor, fb: Tensor, gb: Tensor,
              lo: Tensor, hi: Tensor) -> Tensor:
    """:func:`_cubic_min` elementwise over [B] float64 tensors (step t, value f, slope gtd of the
    two points a and b; bounds lo, hi): the same operations in the same order."""
    mid = 0.5 * (lo + hi)
    d1 = (ga + gb) - 3.0 * (fa - fb) / (ta - tb)
    disc = d1 * d1 - ga * gb
    d2 = torch.copysign(disc.sqrt(), tb - ta)  # NaN where disc < 0: masked below
    den = (gb - ga) + 2.0 * d2
    t = tb - (tb - ta) * ((gb + d2) - d1) / den
    ok = (ta != tb) & (disc >= 0.0) & (den != 0.0) & torch.isfinite(t)
    return torch.where(ok, torch.minimum(torch.maximum(t, lo), hi), mid)


class WolfeSearches:
    """The strong-Wolfe line searches of B samples, every sample's state a row of [B] tensors on
    the device: ``t`` the step it wants evaluated next; ``lo`` (step, value, slope and whether it
    is the search's start point) the best point found, which a search that ends always accepts
    (a search accepting its current point first makes it ``lo``); ``hi`` the bracket's other end;
    ``zoom`` the phase, ``n`` evaluations so far, ``stuck`` the zoom's safeguard flag; ``f0``,
    ``g0``, ``d_inf`` the start's value, slope and ``max |d|``. Each method takes and returns
    [B] masks and leaves the rows outside its mask unchanged."""

    def __init__(self, B: int, device: torch.device, tolerance_change: float):
        f64 = dict(dtype=torch.float64, device=device)
        self.limit = torch.full((B,), MAX_LS, dtype=torch.int64, device=device)
        self.tol = tolerance_change
        self.t, self.f0, self.g0, self.d_inf = (torch.zeros(B, **f64) for _ in range(4))
        self.t_lo, self.f_lo, self.g_lo = (torch.zeros(B, **f64) for _ in range(3))
        self.t_hi, self.f_hi, self.g_hi = (torch.zeros(B, **f64) for _ in range(3))
        self.lo_is_start = torch.ones(B, dtype=torch.bool, device=device)
        self.zoom = torch.zeros(B, dtype=torch.bool, device=device)
        self.stuck = torch.zeros(B, dtype=torch.bool, device=device)
        self.n = torch.zeros(B, dtype=torch.int64, device=device)

    def start(self, rows: Tensor, t: Tensor, f0: Tensor, g0: Tensor, d_inf: Tensor,
              limit: Optional[Tensor] = None) -> None:
        """Begin a search in each row of the mask ``rows`` with first step ``t`` from the point
        of value ``f0`` and slope ``g0`` along a direction of ``max |d| = d_inf`` ([B] float64),
        taking at most ``limit`` evaluations ([B] int64 >= 1; default MAX_LS)."""
        w = torch.where
        if limit is not None:
            self.limit = w(rows, limit, self.limit)
        self.t, self.f0, self.g0 = w(rows, t, self.t), w(rows, f0, self.f0), w(rows, g0, self.g0)
        self.d_inf = w(rows, d_inf, self.d_inf)
        self.t_lo = w(rows, 0.0, self.t_lo)
        self.f_lo, self.g_lo = w(rows, f0, self.f_lo), w(rows, g0, self.g_lo)
        self.lo_is_start = self.lo_is_start | rows
        self.zoom = self.zoom & ~rows
        self.stuck = self.stuck & ~rows
        self.n = w(rows, 0, self.n)

    def step(self, ev: Tensor, t: Tensor, f: Tensor, gtd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Feed the rows ``ev`` the point they evaluated: step ``t`` (as taken, rounded to x's
        dtype), value ``f`` and slope ``gtd`` ([B] float64; ignored outside ``ev``).

        Returns [B] masks ``(takes, ends, bad)``: the rows whose ``lo`` became this point (the
        caller keeps its vectors), whose search ended (accepting ``lo``; a failure where
        ``lo_is_start``), and whose point was not finite (the search ended without a point). The
        rows still searching get their next step in ``t``."""
        w = torch.where
        n = self.n + ev.long()
        finite = torch.isfinite(f) & torch.isfinite(gtd)
        bad, live = ev & ~finite, ev & finite
        armijo = f > self.f0 + C1 * t * self.g0
        curvature = gtd.abs() <= -C2 * self.g0
        # Bracketing phase (the first loop of strong_wolfe), one case per branch, in its order;
        # lo holds prev here.
        br = live & ~self.zoom
        b_out = br & (n >= self.limit)  # out of evaluations: the lower of start and cur
        b_out_take = b_out & (f < self.f0)
        br = br & ~b_out
        b_up = br & (armijo | ((n > 2) & (f >= self.f_lo)))  # bracket [prev, cur]
        rest = br & ~b_up
        b_take = rest & curvature  # return cur
        rest = rest & ~curvature
        b_turn = rest & (gtd >= 0)  # bracket [prev, cur]
        b_grow = rest & ~b_turn  # next t by extrapolation, prev = cur
        form = b_up | b_turn
        form_low = form & (f < self.f_lo)  # the bracket's low end is cur, else prev
        t_grow = cubic_min(self.t_lo, self.f_lo, self.g_lo, t, f, gtd,
                           t + 0.01 * (t - self.t_lo), 10.0 * t)
        # Zoom phase (the body of the second loop).
        zm = live & self.zoom
        z_fail = zm & (armijo | (f >= self.f_lo))  # hi = cur, or lo = cur and hi = old lo
        z_low = z_fail & (f < self.f_lo)  # when cur is the lower end (torch's order by value)
        z_hi = z_fail & ~z_low
        z_take = zm & ~z_fail & curvature  # return cur
        z_lo = zm & ~z_fail & ~curvature  # (hi = lo if the slope says so), lo = cur
        z_swap = z_lo & (gtd * (self.t_hi - self.t_lo) >= 0)
        # hi first (it may take the old lo), then lo.
        hi_cur, hi_lo = (form & ~form_low) | z_hi, form_low | z_swap | z_low
        self.t_hi = w(hi_cur, t, w(hi_lo, self.t_lo, self.t_hi))
        self.f_hi = w(hi_cur, f, w(hi_lo, self.f_lo, self.f_hi))
        self.g_hi = w(hi_cur, gtd, w(hi_lo, self.g_lo, self.g_hi))
        takes = b_take | form_low | b_out_take | b_grow | z_take | z_lo | z_low
        self.t_lo, self.f_lo, self.g_lo = w(takes, t, self.t_lo), w(takes, f, self.f_lo), \
            w(takes, gtd, self.g_lo)
        # out of evaluations without a lower point: back to the start (no decrease found)
        b_out_start = b_out & ~b_out_take
        self.t_lo, self.f_lo, self.g_lo = w(b_out_start, 0.0, self.t_lo), \
            w(b_out_start, self.f0, self.f_lo), w(b_out_start, self.g0, self.g_lo)
        self.lo_is_start = (self.lo_is_start & ~takes) | b_out_start
        self.zoom = self.zoom | form
        # The zoom loop's head: go on while evaluations remain and the bracket is wide enough.
        head = form | z_fail | z_lo
        go = head & (n < self.limit) & ((self.t_hi - self.t_lo).abs() * self.d_inf >= self.tol)
        left = torch.minimum(self.t_lo, self.t_hi)
        right = torch.maximum(self.t_lo, self.t_hi)
        tz = cubic_min(self.t_lo, self.f_lo, self.g_lo, self.t_hi, self.f_hi, self.g_hi,
                       left, right)
        eps = 0.1 * (right - left)
        near = torch.minimum(right - tz, tz - left) < eps
        force = near & (self.stuck | (tz >= right) | (tz <= left))
        tz = w(force, w((tz - right).abs() < (tz - left).abs(), right - eps, left + eps), tz)
        self.stuck = w(go, near & ~force, self.stuck)
        self.t = w(go, tz, w(b_grow, t_grow, self.t))
        self.n = n
        ends = bad | b_take | b_out | z_take | (head & ~go)
        return takes, ends, bad
