"""The batched strong-Wolfe line search (device tensors, branches as masks) against its scalar
twin (a Python generator): the same trial steps, bitwise, and the same outcome for every sample,
over one-dimensional functions chosen to reach every branch."""
from __future__ import annotations

import math
import random

import torch

from dflow_fast.optim.wolfe import MAX_LS, Trial, WolfeSearches, strong_wolfe

F64 = torch.float64
TOL = 1e-9


def _functions(n: int, seed: int = 0):
    """n functions phi(t) -> (value, slope) on t >= 0, each with phi'(0) < 0 (or a lying slope
    for the no-decrease case), with their first step t0 and max |d|."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        kind = k % 7
        f0, g0 = rnd.uniform(-2, 2), -rnd.uniform(0.05, 3.0)
        a, w, c = rnd.uniform(0.0, 1.0), rnd.uniform(0.5, 20.0), rnd.uniform(0.01, 50.0)
        if kind == 0:  # smooth bowl: accepted at once or after a short zoom
            phi = (lambda f0, g0, c: lambda t: (f0 + g0 * t + 0.5 * c * t * t, g0 + c * t))(
                f0, g0, c)
        elif kind == 1:  # wiggly: long zooms, the safeguards near the bracket's ends
            phi = (lambda f0, g0, a, w, c: lambda t: (
                f0 + g0 * t + a * math.sin(w * t) + 0.5 * c * t * t,
                g0 + a * w * math.cos(w * t) + c * t))(f0, g0 + 0.0, a, w, c)
        elif kind == 2:  # flat curvature: extrapolation grows t
            phi = (lambda f0, g0: lambda t: (f0 + g0 * t + 1e-4 * t ** 4, g0 + 4e-4 * t ** 3))(
                f0, g0)
        elif kind == 3:  # linear: never satisfies the curvature test, runs out of evaluations
            phi = (lambda f0, g0: lambda t: (f0 + g0 * t, g0))(f0, g0)
        elif kind == 4:  # not finite beyond a point
            cut = rnd.uniform(0.2, 3.0)
            phi = (lambda f0, g0, cut: lambda t: (f0 + g0 * t if t < cut else math.nan, g0))(
                f0, g0, cut)
        elif kind == 5:  # a kink: the zoom's interpolation lands near the bracket's ends
            m = rnd.uniform(0.05, 2.0)
            phi = (lambda f0, g0, m, c: lambda t: (
                f0 + g0 * m * (1 - abs(t - m) / m) + c * (t - m) ** 2 * (t > m),
                -g0 * math.copysign(1.0, t - m) + 2 * c * (t - m) * (t > m)))(f0, g0, m, c)
        else:  # the slope lies (the function rises): no decrease, the search fails
            phi = (lambda f0, g0, c: lambda t: (f0 + 0.5 * c * t + t * t, 0.5 * c + 2 * t))(
                f0, g0, c)
        t0 = rnd.choice([1.0, rnd.uniform(0.01, 5.0)])
        out.append((phi, t0, f0, g0, rnd.uniform(0.1, 3.0)))
    # phi(0) = 0, phi'(0) = -1, phi(1) = -1, phi'(1) = -4: the first extrapolation's cubic has a
    # discriminant of exactly 0 (d1 = -2, d1^2 = phi'(0) phi'(1)), the edge of its sqrt branch
    out.append((lambda t: (-t + 3 * t * t - 3 * t ** 3, -1 + 6 * t - 9 * t * t), 1.0, 0.0, -1.0,
                1.0))
    return out


def _scalar(phi, t0, f0, g0, d_inf, limit=MAX_LS):
    """The twin: trial steps and the outcome ("nonfinite", "failed" or the accepted step)."""
    steps, search = [], strong_wolfe(t0, Trial(0.0, f0, g0), d_inf, tolerance_change=TOL,
                                     max_ls=limit)
    t = next(search)
    while True:
        steps.append(t)
        f, g = phi(t)
        try:
            t = search.send(Trial(t, f, g, x=torch.zeros(1)))
        except StopIteration as end:
            got = end.value
            return steps, ("nonfinite" if got is None else "failed" if got.x is None else got.t)


def _batched(funcs, limits=None):
    B = len(funcs)
    ls = WolfeSearches(B, torch.device("cpu"), TOL)
    col = lambda k: torch.tensor([fn[k] for fn in funcs], dtype=F64)  # noqa: E731
    ls.start(torch.ones(B, dtype=torch.bool), col(1), col(2), col(3), col(4),
             None if limits is None else torch.tensor(limits))
    steps, outcome = [[] for _ in range(B)], [None] * B
    live = torch.ones(B, dtype=torch.bool)
    while bool(live.any()):
        t = ls.t.tolist()
        f, g = [math.nan] * B, [math.nan] * B
        for i in map(int, live.nonzero()):
            steps[i].append(t[i])
            f[i], g[i] = funcs[i][0](t[i])
        _, ends, bad = ls.step(live.clone(), ls.t.clone(), torch.tensor(f, dtype=F64),
                               torch.tensor(g, dtype=F64))
        for i in map(int, (ends & live).nonzero()):
            outcome[i] = ("nonfinite" if bad[i] else "failed" if ls.lo_is_start[i]
                          else float(ls.t_lo[i]))
        live &= ~ends
    return steps, outcome


def test_batched_line_search_equals_the_scalar_twin_bitwise():
    funcs = _functions(210)
    assert len(funcs) == 211
    steps, outcome = _batched(funcs)
    lengths, kinds = [], set()
    for i, fn in enumerate(funcs):
        s_steps, s_out = _scalar(*fn)
        assert steps[i] == s_steps, f"sample {i}: trial steps differ"
        assert outcome[i] == s_out, f"sample {i}: outcome differs"
        lengths.append(len(s_steps))
        kinds.add(s_out if isinstance(s_out, str) else
                  "grown" if s_out > fn[1] else "shrunk" if s_out < fn[1] else "first")
    # every branch was reached: first step accepted, extrapolation, zoom, out of evaluations,
    # a non-finite value and a failed search
    assert kinds == {"first", "grown", "shrunk", "nonfinite", "failed"}
    assert max(lengths) == MAX_LS and min(lengths) == 1 and len(set(lengths)) > 5


def test_per_sample_evaluation_limits():
    """torch.optim.LBFGS gives each search ``max_eval - evaluations so far + 1`` evaluations: with a
    limit per sample (1 to 6) the batched search still equals its twin bitwise, no search takes
    more than its limit, and searches cut short end on the lower of their last point and the
    start (a failure where the start is lower), as torch's do."""
    funcs = _functions(140, seed=1)
    limits = [1 + i % 6 for i in range(len(funcs))]
    steps, outcome = _batched(funcs, limits)
    cut = 0
    for i, fn in enumerate(funcs):
        s_steps, s_out = _scalar(*fn, limit=limits[i])
        assert steps[i] == s_steps, f"sample {i}: trial steps differ"
        assert outcome[i] == s_out, f"sample {i}: outcome differs"
        assert len(s_steps) <= limits[i]
        full, _ = _scalar(*fn)
        cut += len(full) > limits[i]
    assert cut > 30  # the limits did cut many searches short


def test_rows_outside_the_mask_are_left_alone():
    funcs = _functions(6, seed=1)[:6]
    B = len(funcs)
    ls = WolfeSearches(B, torch.device("cpu"), TOL)
    col = lambda k: torch.tensor([fn[k] for fn in funcs], dtype=F64)  # noqa: E731
    ls.start(torch.ones(B, dtype=torch.bool), col(1), col(2), col(3), col(4))
    before = {k: v.clone() for k, v in vars(ls).items() if isinstance(v, torch.Tensor)}
    ev = torch.tensor([True, False] * 3)
    vals = [fn[0](fn[1]) for fn in funcs]
    ls.step(ev, col(1), torch.tensor([v[0] for v in vals], dtype=F64),
            torch.tensor([v[1] for v in vals], dtype=F64))
    for k, v in before.items():
        assert torch.equal(getattr(ls, k)[~ev], v[~ev]), k
    assert ls.n.tolist() == [1, 0] * 3
