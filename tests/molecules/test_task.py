"""dflow_fast.tasks.molecules: D-Flow on padded molecules with node masks (tiny random EGNNs,
float64, a few seconds). Gradients are exact with masks; padded atoms never move and get no
gradient; the centre of mass stays 0; a batch of molecules of different sizes takes each
molecule's solo iterates. (The velocity's equivariance: tests/molecules/test_egnn.py.)"""
from __future__ import annotations

import pytest
import torch

import dflow_fast as df
from dflow_fast.models import EGNNFlow, EGNNRegressor
from dflow_fast.tasks import MOLECULE_TASKS, TASKS, molecule_problem
from dflow_fast.tasks.molecules import masks_for, project, subspace_dim

F64 = torch.float64
SIZES = (5, 9, 3)
STEPS = 3


def _models():
    torch.manual_seed(0)
    flow = EGNNFlow(hidden=16, n_layers=2, n_freqs=2).double()
    for layer in flow.net.layers:  # the coordinate heads start near 0: make positions move
        torch.nn.init.normal_(layer.coord.weight, std=0.3)
    reg = EGNNRegressor(hidden=16, n_layers=2, mean=70.0, std=8.0).double()
    return flow.eval().requires_grad_(False), reg.eval().requires_grad_(False)


def _problem(flow, reg, sizes=SIZES, M=11, offset=4.0):
    """Targets ``offset`` Bohr^3 above what the regressor says of the unsteered samples."""
    mask = masks_for(torch.tensor(sizes), M)
    g = torch.Generator().manual_seed(3)
    p = molecule_problem(reg, torch.zeros(len(sizes)), mask, generator=g, dtype=F64)
    x1 = df.solve(flow, p.x0, steps=STEPS, cond=p.cond)
    return molecule_problem(reg, p.predict(x1).detach() + offset, mask, x0=p.x0, dtype=F64)


def _com(x, mask):
    m = mask[..., None].to(x.dtype)
    return ((x[..., :3] * m).sum(1) / m.sum(1)).abs().max().item()


def _objective_grad(flow, p, gradient):
    x0 = p.x0.clone().requires_grad_(True)
    x1 = df.solve(flow, x0, steps=STEPS, gradient=gradient, cond=p.cond)
    f = p.cost(x1) + p.prior(x0)
    g, = torch.autograd.grad(f.sum(), x0)
    return g


def test_the_problem_lives_in_the_subspace():
    flow, reg = _models()
    p = _problem(flow, reg)
    assert "alpha" in MOLECULE_TASKS and "alpha" not in TASKS  # images' registry untouched
    assert subspace_dim(p.mask, 5).tolist() == [4 * 3 + 5 * 5, 8 * 3 + 9 * 5, 2 * 3 + 3 * 5]
    assert torch.equal(p.prior.dim, p.dim) and p.cond["mask"] is p.mask
    assert (p.x0[~p.mask] == 0).all() and _com(p.x0, p.mask) <= 1e-14
    # a given start is projected; the regressor sees types at one-hot scale
    shifted = molecule_problem(reg, p.y, p.mask, x0=p.x0 + 1.0, dtype=F64)
    assert torch.allclose(shifted.x0[..., :3], p.x0[..., :3], atol=1e-14)
    x = project(p.x0, p.mask)
    assert torch.equal(p.predict(p.x0), reg(x[..., :3], x[..., 3:] / 0.25, p.mask))
    one = p.select([1])
    assert one.x0.shape == (1, 11, 8) and one.y.item() == p.y[1].item()
    assert one.prior.dim.tolist() == [p.dim[1].item()]


@pytest.mark.parametrize("gradient", ["adjoint", "auto"])
def test_gradient_with_node_masks_equals_backprop(gradient):
    flow, reg = _models()
    p = _problem(flow, reg)
    ref = _objective_grad(flow, p, "backprop")
    g = _objective_grad(flow, p, gradient)
    assert ref[p.mask].abs().max() > 1e-3  # the real atoms do get a gradient
    assert ((g - ref).norm() / ref.norm()).item() <= 1e-12


def test_padded_atoms_get_no_gradient_never_move_and_the_com_stays_zero():
    flow, reg = _models()
    p = _problem(flow, reg)
    g = _objective_grad(flow, p, "adjoint")
    assert (g[~p.mask] == 0).all()  # exactly: padded entries are multiplied by the mask
    assert _com(g, p.mask) <= 1e-12 * g.abs().max().item()
    x1 = df.solve(flow, p.x0, steps=STEPS, cond=p.cond)
    assert (x1[~p.mask] == 0).all() and _com(x1, p.mask) <= 1e-13
    res = df.optimize(flow, p.cost, p.x0, steps=STEPS, max_iter=6, regularization=p.prior,
                      cond=p.cond)
    start = p.cost(x1) + p.prior(p.x0)
    assert (res.loss < start).all()  # the iterates did move
    assert (res.x0 - p.x0)[p.mask].abs().max() > 1e-2
    for x in (res.x0, res.x1):
        assert (x[~p.mask] == 0).all() and _com(x, p.mask) <= 1e-12


def test_a_batch_of_different_sizes_equals_each_solo_run():
    flow, reg = _models()
    p = _problem(flow, reg)
    kw = dict(steps=STEPS, max_iter=5, tolerance_change=1e-14)
    res = df.optimize(flow, p.cost, p.x0, regularization=p.prior, cond=p.cond, **kw)
    for i, n in enumerate(SIZES):
        # alone, and with its padding cut off: neither the others nor the padding change it
        one = p.select([i])
        cut = molecule_problem(reg, one.y, one.mask[:, :n], x0=one.x0[:, :n], dtype=F64)
        for q in (one, cut):
            solo = df.optimize(flow, q.cost, q.x0, regularization=q.prior, cond=q.cond, **kw)
            k = q.x0.shape[1]
            err = (res.x0[i, :k] - solo.x0[0]).norm() / solo.x0.norm()
            assert err.item() <= 1e-10, (i, k)
            assert res.nit[i] == solo.nit[0]


def test_bad_input_is_refused_before_any_work():
    flow, reg = _models()
    mask = masks_for(torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="unknown molecule task"):
        molecule_problem(reg, torch.zeros(2), mask, name="gap")
    with pytest.raises(ValueError, match=r"targets must be 2 finite values"):
        molecule_problem(reg, torch.zeros(3), mask)
    with pytest.raises(ValueError, match="at least one real atom"):
        molecule_problem(reg, torch.zeros(2), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x0 must be \[B, M, 3 \+ n_types\]"):
        molecule_problem(reg, torch.zeros(2), mask, x0=torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="n_atoms"):
        masks_for(torch.tensor([2, 0]))
    with pytest.raises(TypeError, match="regressor must be callable"):
        molecule_problem(None, torch.zeros(2), mask)
