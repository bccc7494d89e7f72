"""dflow_fast.models.egnn: the flow velocity is E(3)-equivariant and permutation-equivariant over
real atoms, ignores padded slots, returns zero-CoM positions; the regressor is invariant; both
round-trip through a safetensors checkpoint (float64, tiny random models: < 1 s)."""
from __future__ import annotations

import pytest
import torch

from dflow_fast.models import EGNNFlow, EGNNRegressor, load_checkpoint, save_checkpoint
from dflow_fast.models.egnn import remove_mean, zero_com_noise

from .helpers import padded_batch, random_rotation


def _flow(seed=0):
    torch.manual_seed(seed)
    f = EGNNFlow(hidden=16, n_layers=3).double()
    # the coordinate heads start near zero; make them matter so equivariance is really tested
    for layer in f.net.layers:
        torch.nn.init.normal_(layer.coord.weight, std=0.3)
    return f.eval()


def _regressor(seed=0):
    torch.manual_seed(seed)
    return EGNNRegressor(hidden=16, n_layers=3, mean=70.0, std=8.0).double().eval()


def _state(g):
    mask, pos, feats = padded_batch(g)
    return torch.cat([pos, feats], -1), mask


def test_velocity_is_equivariant_under_rotation_translation_permutation():
    g = torch.Generator().manual_seed(0)
    f = _flow()
    x, mask = _state(g)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    v = f(t, x, mask)
    assert v[..., :3].abs().max() > 1e-2  # the position part is not trivially zero
    for reflect in (False, True):
        Q = random_rotation(g, reflect=reflect)
        shift = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
        x2 = x.clone()
        x2[..., :3] = x[..., :3] @ Q.T + shift  # rotate (reflect) and translate
        # permute the real atoms of each molecule among themselves
        perms = []
        for b in range(x.shape[0]):
            n = int(mask[b].sum())
            p = torch.cat([torch.randperm(n, generator=g), torch.arange(n, x.shape[1])])
            perms.append(p)
            x2[b] = x2[b, p]
        v2 = f(t, x2, mask)
        for b, p in enumerate(perms):
            want = torch.cat([v[b, p, :3] @ Q.T, v[b, p, 3:]], -1)
            assert torch.allclose(v2[b], want, atol=1e-10), (reflect, b)


def test_padding_is_ignored_and_gets_zero_velocity_and_no_gradient():
    g = torch.Generator().manual_seed(1)
    f = _flow()
    x, mask = _state(g)
    t = torch.tensor(0.3, dtype=torch.float64)
    v = f(t, x, mask)
    assert (v[~mask] == 0).all()
    # garbage in the padded slots changes nothing on the real atoms
    x2 = x.clone()
    x2[~mask] = 100 * torch.randn(int((~mask).sum()), 8, generator=g, dtype=torch.float64)
    assert torch.equal(f(t, x2, mask), v)
    # ... and a molecule gives the same velocity alone, without any padding
    n = int(mask[0].sum())
    alone = f(t, x[:1, :n], mask[:1, :n])
    assert torch.allclose(alone[0], v[0, :n], atol=1e-12)
    # no gradient reaches the padded inputs
    xg = x.clone().requires_grad_(True)
    f(t, xg, mask).square().sum().backward()
    assert (xg.grad[~mask] == 0).all() and xg.grad[mask].abs().max() > 0


def test_velocity_has_zero_centre_of_mass_and_t_forms_agree():
    g = torch.Generator().manual_seed(2)
    f = _flow()
    x, mask = _state(g)
    v = f(torch.tensor(0.7, dtype=torch.float64), x, mask)
    com = (v[..., :3] * mask[..., None]).sum(1)
    assert com.abs().max() < 1e-12
    vb = f(torch.full((3,), 0.7, dtype=torch.float64), x, mask)
    assert torch.allclose(v, vb, atol=1e-14)
    # no mask: every slot is a real atom
    assert f(torch.tensor(0.7, dtype=torch.float64), x).shape == x.shape


def test_zero_com_noise_and_remove_mean():
    mask = torch.arange(7)[None] < torch.tensor([3, 7, 5])[:, None]
    z = zero_com_noise(mask, 5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 7, 8) and (z[~mask] == 0).all()
    assert (z[..., :3].sum(1)).abs().max() < 1e-5
    p = torch.randn(3, 7, 3)
    r = remove_mean(p, mask.float())
    assert torch.allclose(remove_mean(r, mask.float()), r, atol=1e-6)  # a projection


def test_regressor_is_invariant():
    g = torch.Generator().manual_seed(3)
    reg = _regressor()
    mask, pos, feats = padded_batch(g)
    types = torch.softmax(feats, -1)
    y = reg(pos, types, mask)
    assert y.shape == (3,)
    Q = random_rotation(g, reflect=True)
    pos2 = pos @ Q.T + torch.randn(1, 1, 3, generator=g, dtype=torch.float64)
    p = torch.cat([torch.randperm(5, generator=g), torch.arange(5, pos.shape[1])])
    pos2[0], types2 = pos2[0, p], types.clone()
    types2[0] = types[0, p]
    pos2[~mask] = 50.0  # padding is ignored
    assert torch.allclose(reg(pos2, types2, mask), y, atol=1e-10)
    # it depends on the geometry and the types
    assert not torch.allclose(reg(pos * 1.2, types, mask), y)
    assert not torch.allclose(reg(pos, types.roll(1, -1), mask), y)


def test_bad_shapes_fail_early():
    f, reg = _flow(), _regressor()
    x = torch.zeros(2, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be"):
        f(torch.tensor(0.5), x[..., :7])
    with pytest.raises(ValueError, match="mask"):
        f(torch.tensor(0.5), x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="t must be"):
        f(torch.zeros(3), x)
    with pytest.raises(ValueError, match="types"):
        reg(x[..., :3], x[..., :4])


def test_checkpoint_round_trip(tmp_path):
    g = torch.Generator().manual_seed(4)
    x, mask = _state(g)
    for model in (_flow().float(), _regressor().float()):
        path = tmp_path / f"{type(model).__name__}.safetensors"
        save_checkpoint(model, path, extra_metadata={"training": {"steps": 1}})
        back = load_checkpoint(path)
        assert type(back) is type(model) and back.config == model.config
        xs = x.float()
        if isinstance(model, EGNNFlow):
            a, b = model(torch.tensor(0.4), xs, mask), back(torch.tensor(0.4), xs, mask)
        else:
            a, b = model(xs[..., :3], xs[..., 3:], mask), back(xs[..., :3], xs[..., 3:], mask)
        assert torch.equal(a, b)
