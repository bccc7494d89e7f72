"""ChiPrior with its degrees of freedom given (``dim``: an int or one per sample), as molecules in
the zero-centre-of-mass subspace need (docs/molecules.md): the value and closed-form gradient,
``rows`` following the samples, and ``optimize`` with a shrinking active set equal to each
sample's solo run (float64, < 1 s)."""
from __future__ import annotations

import pytest
import torch

import dflow_fast as df

F64 = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_per_sample_dim_value_and_closed_form_gradient():
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    dim = torch.tensor([3, 11, 20])
    prior = df.ChiPrior(0.7, dim=dim)
    sq = x.detach().flatten(1).square().sum(1)
    want = 0.7 * (0.5 * sq - 0.5 * (dim.double() - 1) * torch.log(sq))
    assert _rel(prior(x), want) <= 1e-14
    g, = torch.autograd.grad(prior(x).sum(), x)
    assert _rel(prior.grad(x.detach()), g) <= 1e-14
    # d = the rows' width is the default prior (its closed form is the fused op's twin), and an
    # int dim is that int for every row
    full = df.ChiPrior(0.7, dim=torch.full((3,), 20))
    assert not full.fusable and df.ChiPrior(0.7).fusable
    assert _rel(full(x), df.ChiPrior(0.7)(x)) <= 1e-15
    assert _rel(full.grad(x.detach()), df.ChiPrior(0.7).grad(x.detach())) <= 1e-15
    assert _rel(df.ChiPrior(0.7, dim=11)(x), df.ChiPrior(0.7, dim=torch.full((3,), 11))(x)) == 0
    # the gradient vanishes on each sample's own shell r = sqrt(d - 1)
    on_shell = x.detach() / sq.sqrt()[:, None, None] * (dim.double() - 1).sqrt()[:, None, None]
    assert prior.grad(on_shell).abs().max() <= 1e-13


def test_rows_select_the_per_sample_dim_and_a_mismatch_is_refused():
    x = torch.randn(4, 6, dtype=F64)
    prior = df.ChiPrior(1.0, dim=torch.tensor([2, 3, 4, 5]))
    idx = torch.tensor([3, 0])
    assert torch.equal(prior.rows(idx)(x[idx]), prior(x)[idx])
    assert prior.rows(None) is prior and df.ChiPrior(1.0, dim=4).rows(idx).dim == 4
    with pytest.raises(ValueError, match=r"dim for 4 samples but x0 has 2 rows"):
        prior(x[idx])


@pytest.mark.parametrize("dim", [0, -3, True, 2.5, torch.tensor([[3]]), torch.tensor([3, 0]),
                                 torch.tensor([True]), torch.tensor([float("nan")])])
def test_bad_dim_is_refused(dim):
    with pytest.raises(ValueError, match="ChiPrior dim"):
        df.ChiPrior(1.0, dim=dim)


def _problem():
    """A smooth non-linear velocity on [B, 6] and per-sample targets / scales that make the
    samples converge after different numbers of iterations."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=F64) / 3
    y = torch.randn(3, 6, generator=g, dtype=F64)
    scale = torch.tensor([1.0, 30.0, 0.2], dtype=F64)

    def velocity(t, x):
        return torch.tanh(x @ A.T) * (1 + t)

    def cost_for(rows):
        return lambda x1: scale[rows] * (x1 - y[rows]).square().sum(1)

    x0 = torch.randn(3, 6, generator=g, dtype=F64)
    return velocity, cost_for, x0


def test_optimize_with_per_sample_dim_equals_each_solo_run_and_the_fused_prior():
    velocity, cost_for, x0 = _problem()
    dim = torch.tensor([2, 5, 6])
    kw = dict(steps=3, max_iter=30, tolerance_grad=1e-9, tolerance_change=1e-14)
    res = df.optimize(velocity, cost_for(slice(None)), x0,
                      regularization=df.ChiPrior(0.5, dim=dim), **kw)
    assert len(set(res.nit.tolist())) > 1  # the active set shrank while the others went on
    for i in range(3):
        solo = df.optimize(velocity, cost_for(slice(i, i + 1)), x0[i:i + 1],
                           regularization=df.ChiPrior(0.5, dim=int(dim[i])), **kw)
        assert _rel(res.x0[i:i + 1], solo.x0) <= 1e-10, i
        assert res.nit[i] == solo.nit[0]
    # d = the width given per sample (unfused, autograd) against the default (the fused op)
    full = df.optimize(velocity, cost_for(slice(None)), x0,
                       regularization=df.ChiPrior(0.5, dim=torch.full((3,), 6)), **kw)
    fused = df.optimize(velocity, cost_for(slice(None)), x0, regularization=df.ChiPrior(0.5),
                        **kw)
    assert _rel(full.x0, fused.x0) <= 1e-10 and _rel(full.loss, fused.loss) <= 1e-12
