"""optimize(): batched per-sample L-BFGS and Adam against per-sample runs, torch.optim and closed
forms; the active set; non-finite samples; the result object."""
from __future__ import annotations

import math

import pytest
import torch

import dflow_fast as df
from dflow_fast import reference

from tests.helpers import make_velocity, rel_err
from tests.test_solve import closed_form, gaussian_fm_velocity

F64 = torch.float64


def problem(B=5, kind="mlp", seed=0):
    """A nonlinear velocity, per-sample targets and a per-sample data-fit cost."""
    velocity, shape = make_velocity(kind, F64, seed)
    velocity.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(B, *shape, generator=g, dtype=F64)
    x0 = torch.randn(B, *shape, generator=g, dtype=F64)

    def cost_for(target):
        return lambda x1: ((x1 - target) ** 2).flatten(1).sum(1)
    return velocity, cost_for, y, x0


def test_each_sample_equals_running_it_alone():
    velocity, cost_for, y, x0 = problem()
    res = df.optimize(velocity, cost_for(y), x0, steps=4, max_iter=12)
    assert res.x0.shape == x0.shape and res.loss.shape == (5,)
    assert set(res.status) <= {"converged", "max_iter", "max_eval"}
    assert len(set(res.nit.tolist())) > 1 or len(set(res.nfev.tolist())) > 1  # really per-sample
    for i in range(5):
        alone = df.optimize(velocity, cost_for(y[i:i + 1]), x0[i:i + 1], steps=4, max_iter=12)
        assert rel_err(alone.x0[0], res.x0[i]) <= 1e-10
        assert alone.status[0] == res.status[i]
        assert alone.nit[0] == res.nit[i] and alone.nfev[0] == res.nfev[i]
        assert alone.history[0] == pytest.approx(res.history[i], rel=1e-10)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stop_loss_stops_each_sample_at_its_own_target(optimizer):
    """A reachable target stops its sample at the first iteration at or below it; the others run
    exactly as without a target."""
    velocity, cost_for, y, x0 = problem(B=3)
    kw = dict(steps=4, max_iter=15, optimizer=optimizer)
    free = df.optimize(velocity, cost_for(y), x0, **kw)
    hist0 = free.history[0]
    # sample 0: the loss it reaches after 3 iterations; sample 1: unreachable; sample 2: reached
    # by the starting point already (stops after its first iteration)
    target = torch.tensor([hist0[3], -1.0, free.history[2][0] + 1.0], dtype=F64)
    res = df.optimize(velocity, cost_for(y), x0, stop_loss=target, **kw)
    assert res.status[0] == "target" and int(res.nit[0]) == 3
    assert float(res.loss[0]) <= float(target[0])
    assert res.status[2] == "target" and int(res.nit[2]) == 1
    assert res.status[1] == free.status[1] and int(res.nit[1]) == int(free.nit[1])
    assert rel_err(res.x0[1], free.x0[1]) <= 1e-12
    assert bool(res.success.all())
    one = df.optimize(velocity, cost_for(y), x0, stop_loss=float(hist0[3]), **kw)  # a number
    assert one.status[0] == "target"


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stop_loss_when_every_sample_turns_nonfinite(optimizer):
    """The target check copes with an iteration in which no sample moved."""
    velocity, cost_for, y, x0 = problem(B=2)
    calls = [0]

    def cost(x1):  # finite at the start, NaN at every later point
        calls[0] += 1
        c = ((x1 - y) ** 2).flatten(1).sum(1)
        return c if calls[0] == 1 else c * float("nan")

    res = df.optimize(velocity, cost, x0, steps=2, max_iter=5, optimizer=optimizer,
                      gradient="backprop", stop_loss=0.0)
    assert res.status == ["nonfinite"] * 2 and res.nit.tolist() == [0, 0]
    assert rel_err(res.x0, x0) == 0


def test_reference_refuses_stop_loss():
    velocity, cost_for, y, x0 = problem(B=1)
    with pytest.raises(ValueError, match="stop_loss is not supported"):
        reference.optimize(velocity, cost_for(y), x0, steps=2, stop_loss=1.0)


@pytest.mark.parametrize("stop_loss, err, match", [
    (torch.zeros(4), ValueError, r"\[B\] = \[3\]"),
    (torch.zeros(3, 1), ValueError, "tensor"),
    ("low", TypeError, "stop_loss must be a number"),
    (float("nan"), ValueError, "NaN"),
])
def test_bad_stop_loss(stop_loss, err, match):
    velocity, cost_for, y, x0 = problem(B=3)
    with pytest.raises(err, match=match):
        df.optimize(velocity, cost_for(y), x0, steps=2, stop_loss=stop_loss)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_single_sample_follows_torch_lbfgs(solver):
    """On one sample our L-BFGS and torch.optim.LBFGS(strong_wolfe) take the same iterates."""
    velocity, cost_for, y, x0 = problem(B=2, kind="conv", seed=3)
    for i in range(2):
        kw = dict(steps=3, solver=solver, max_iter=8, history_size=5)
        ours = df.optimize(velocity, cost_for(y[i:i + 1]), x0[i:i + 1], **kw)
        ref = reference.optimize(velocity, cost_for(y[i:i + 1]), x0[i:i + 1], **kw)
        assert rel_err(ours.x0, ref.x0) <= 1e-9
        assert rel_err(ours.loss, ref.loss) <= 1e-9
        assert ours.nfev[0] == ref.nfev[0]


@pytest.mark.parametrize("max_eval", [2, 3, 4, 6, 10])
def test_max_eval_cuts_the_line_search_as_torch_does(max_eval):
    """A search that would extrapolate far is cut at ``max_eval - evaluations so far + 1``
    evaluations, as torch.optim.LBFGS cuts it (``max_ls=max_eval - current_evals``): the same
    iterate and the same evaluation count (up to max_eval + 1), never more."""
    still = lambda t, x: torch.zeros_like(x)  # noqa: E731  x1 = x0: the cost's own landscape
    cost = lambda x1: -x1.sum(1) + 1e-7 * (x1 ** 4).sum(1)  # noqa: E731  falls far along +x
    x0 = torch.full((2, 2), 1e-3, dtype=torch.float64)
    kw = dict(steps=1, solver="euler", max_iter=3, max_eval=max_eval)
    ours = df.optimize(still, cost, x0, gradient="backprop", **kw)
    for i in range(2):
        ref = reference.optimize(still, cost, x0[i:i + 1], **kw)
        assert int(ours.nfev[i]) == int(ref.nfev[0]) <= max_eval + 1
        assert rel_err(ours.x0[i:i + 1], ref.x0) <= 1e-12
    if max_eval < 6:  # the first search alone would take 5 evaluations
        assert ours.status == ["max_eval", "max_eval"] and ours.nit.tolist() == [1, 1]


def test_nonfinite_sample_stops_and_others_are_unaffected():
    velocity, cost_for, y, x0 = problem(B=4)
    calls = [0]

    def cost(x1):
        calls[0] += 1
        c = ((x1 - y) ** 2).sum(1)
        if calls[0] >= 4:  # sample 2's cost turns NaN mid-run
            c = torch.where(torch.arange(4) == 2, torch.full_like(c, math.nan), c)
        return c

    res = df.optimize(velocity, cost, x0, steps=3, max_iter=15)
    keep = [0, 1, 3]
    clean = df.optimize(velocity, cost_for(y[keep]), x0[keep], steps=3, max_iter=15)
    assert res.status[2] == "nonfinite" and not res.success[2]
    assert torch.isfinite(res.x0[2]).all() and math.isfinite(res.loss[2].item())
    assert res.loss[2].item() == res.history[2][-1]
    assert 0 < res.nit[2] < res.nit[keep].max()
    # its x1 is the solve of its last finite iterate
    x1_2 = df.solve(velocity, res.x0[2:3], steps=3)
    assert rel_err(res.x1[2:3], x1_2) <= 1e-12
    assert rel_err(res.x0[keep], clean.x0) <= 1e-10
    assert [res.status[i] for i in keep] == clean.status
    assert all(res.success[keep])


def test_converged_samples_stop_consuming_velocity_evaluations():
    velocity, cost_for, y, x0 = problem(B=3)
    rows = []

    def counted(t, x):
        rows.append(x.shape[0])
        return velocity(t, x)

    steps = 4
    with torch.no_grad():  # sample 0 starts at its minimizer: zero gradient
        y = y.clone()
        y[0] = df.solve(velocity, x0[:1], steps=steps)[0]
    res = df.optimize(counted, cost_for(y), x0, steps=steps, max_iter=10)
    # midpoint: 2 evaluations per step; the default gradient "auto" keeps the graphs (nothing
    # recomputed in the backward) and measures one step's graph once per velocity, in the first
    # evaluation, which holds every sample: its 2 calls count in velocity_calls, not in nfe
    one_eval = 2 * steps
    assert res.status[0] == "converged" and res.nit[0] == 0
    assert res.nfe[0] == one_eval
    assert (res.nfe[1:] > 5 * one_eval).all()
    # every evaluated row belongs to some sample or to the measuring step (all 3 rows)
    assert res.extra["measuring_calls"] == 2
    assert sum(rows) == int(res.nfe.sum()) + 3 * res.extra["measuring_calls"]
    assert max(rows) == 3 and min(rows) <= 2  # later calls ran without sample 0
    assert res.velocity_calls == len(rows)


def test_lbfgs_samples_never_wait_for_each_other():
    """Samples advance asynchronously: every batched evaluation holds every active sample, so the
    number of evaluations is the largest per-sample count (a synchronous batch also pays for
    every round in which only the slowest line searches are still going)."""
    velocity, cost_for, y, x0 = problem(B=6, seed=3)
    scale = torch.tensor([1.0, 30.0, 0.05, 3.0, 0.3, 10.0], dtype=F64)  # unlike line searches
    rows = []

    def counted(t, x):
        rows.append(x.shape[0])
        return velocity(t, x)

    def cost(x1):
        return scale * ((x1 - y) ** 2).flatten(1).sum(1)

    steps = 3
    res = df.optimize(counted, cost, x0, steps=steps, max_iter=15, gradient="backprop")
    per_round = rows[::2 * steps]  # backprop: one batched solve of 2*steps calls per evaluation
    assert len(set(res.nfev.tolist())) > 1  # the samples really needed different counts
    assert len(per_round) == int(res.nfev.max())
    # round k holds exactly the samples that were evaluated at least k + 1 times
    assert per_round == [int((res.nfev > k).sum()) for k in range(len(per_round))]


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_quadratic_through_affine_flow_reaches_analytic_minimizer(gradient):
    d, B = 6, 3
    mu = torch.randn(d, dtype=F64)
    sigma = torch.rand(d, dtype=F64) + 0.5
    velocity, a = gaussian_fm_velocity(mu, sigma)
    y = torch.randn(B, d, dtype=F64)
    steps = 5
    grid = [k / steps for k in range(steps + 1)]
    M, C = closed_form(lambda t: a(torch.tensor(t, dtype=F64)), mu, grid, "midpoint")
    x_star = (y - C * mu) / M  # x1 = M x0 + C mu = y
    res = df.optimize(velocity, lambda x1: ((x1 - y) ** 2).sum(1), torch.randn(B, d, dtype=F64),
                      steps=steps, gradient=gradient, max_iter=50, tolerance_grad=1e-10,
                      tolerance_change=1e-20)
    assert res.status == ["converged"] * B
    assert rel_err(res.x0, x_star) <= 1e-8
    assert res.loss.max() <= 1e-16


def test_nonlinear_problem_no_worse_than_reference():
    """A partial observation with the chi prior (its minimum is not zero), a few iterations."""
    velocity, shape = make_velocity("conv", F64, seed=5)
    velocity.requires_grad_(False)
    B = 4
    mask = (torch.rand(1, *shape) > 0.5).to(F64)  # inpainting-like partial observation
    y = torch.randn(B, *shape, dtype=F64) * mask
    prior = df.ChiPrior(0.1)

    def cost(x1):
        return ((mask * torch.tanh(x1) - y) ** 2).flatten(1).sum(1)

    x0 = torch.randn(B, *shape, dtype=F64)
    kw = dict(steps=4, max_iter=6, regularization=prior)
    ours = df.optimize(velocity, cost, x0, **kw)
    ref = reference.optimize(velocity, cost, x0, **kw)
    start = (cost(df.solve(velocity, x0, steps=4)) + prior(x0)).detach()
    assert (ours.loss < start).all()
    assert ours.loss.sum() <= ref.loss.sum() * (1 + 1e-6)


def test_adam_equals_torch_adam():
    velocity, cost_for, y, x0 = problem(B=3)
    kw = dict(steps=3, optimizer="adam", lr=0.05, max_iter=7)
    ours = df.optimize(velocity, cost_for(y), x0, **kw)
    ref = reference.optimize(velocity, cost_for(y), x0, **kw)
    assert rel_err(ours.x0, ref.x0) <= 1e-12
    assert rel_err(ours.loss, ref.loss) <= 1e-12
    assert ours.nit.tolist() == [7, 7, 7] and ours.status == ["max_iter"] * 3


def test_result_fields_history_and_callback():
    velocity, cost_for, y, x0 = problem(B=3)
    seen = []

    def callback(info):
        seen.append((info.iteration, info.x0.shape, info.loss.shape, int(info.active.sum()),
                     info.nit.tolist()))
        return info.iteration == 2  # stop everything at the second call

    res = df.optimize(velocity, cost_for(y), x0, steps=3, max_iter=10, callback=callback)
    assert [s[0] for s in seen] == [1, 2]
    assert seen[0][1:3] == (x0.shape, (3,))
    assert res.status == ["callback"] * 3 and not res.success.any()
    assert res.nit.tolist() == seen[-1][4] and min(res.nit) >= 1  # each sample's own count
    for i in range(3):
        assert len(res.history[i]) == int(res.nit[i]) + 1
        assert res.history[i][-1] == pytest.approx(res.loss[i].item(), rel=1e-15)
        assert res.history[i][-1] <= res.history[i][0]
    assert res.x1.shape == x0.shape and res.wall_time > 0 and res.peak_memory is None
    assert rel_err(res.x1, df.solve(velocity, res.x0, steps=3)) <= 1e-12
    assert "callback" in repr(res)


def test_progress_bar_shows_loss_and_active(capsys):
    velocity, cost_for, y, x0 = problem(B=2)
    df.optimize(velocity, cost_for(y), x0, steps=2, max_iter=3, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "active=" in err


def test_chi_prior_value_gradient_and_sign():
    prior = df.ChiPrior(0.5)
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    d = 15
    r = x.detach().flatten(1).norm(dim=1)
    expected = 0.5 * (0.5 * r**2 - (d - 1) * torch.log(r))
    assert rel_err(prior(x), expected) <= 1e-14
    g = torch.autograd.grad(prior(x).sum(), x)[0]
    assert rel_err(prior.grad(x.detach()), g) <= 1e-13
    # minimized on the typical shell ||x|| = sqrt(d - 1), larger away from it on both sides
    u = torch.randn(1, d, dtype=F64)
    u = u / u.norm()
    vals = [prior(u * s).item() for s in (0.5 * math.sqrt(d - 1), math.sqrt(d - 1),
                                          2 * math.sqrt(d - 1))]
    assert vals[1] < vals[0] and vals[1] < vals[2]


def test_regularization_enters_loss_and_gradient():
    velocity, cost_for, y, x0 = problem(B=2)
    prior = df.ChiPrior(1e-2)
    res = df.optimize(velocity, cost_for(y), x0, steps=3, max_iter=5, regularization=prior)
    ref = reference.optimize(velocity, cost_for(y[:1]), x0[:1], steps=3, max_iter=5,
                             regularization=prior)
    alone = df.optimize(velocity, cost_for(y[:1]), x0[:1], steps=3, max_iter=5,
                        regularization=prior)
    assert rel_err(alone.x0, ref.x0) <= 1e-9
    assert rel_err(res.x0[:1], alone.x0) <= 1e-10
    x1 = df.solve(velocity, res.x0, steps=3)
    assert rel_err(res.loss, cost_for(y)(x1) + prior(res.x0)) <= 1e-12


def test_backward_blend():
    velocity, shape = make_velocity("mlp", F64)
    guess = torch.randn(3, *shape, dtype=F64)
    back = df.solve(velocity, guess, steps=6, t0=1.0, t1=0.0)
    x_full = df.backward_blend(velocity, guess, alpha=1.0, steps=6)
    assert rel_err(x_full, back) <= 1e-14
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(guess.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    x_mix = df.backward_blend(velocity, guess, alpha=0.1, steps=6, generator=gen)
    assert rel_err(x_mix, math.sqrt(0.1) * back + math.sqrt(0.9) * noise) <= 1e-14
    # backward then forward with many steps returns close to the guess (the flow is invertible)
    there = df.solve(velocity, df.solve(velocity, guess, steps=200, t0=1.0, t1=0.0), steps=200)
    assert rel_err(there, guess) <= 1e-3
