"""Per-sample conditioning, ``velocity(t, x, **cond)``: each sample keeps its own conditioning as
the optimizer's active set shrinks, every gradient scheme differentiates the same closure, and a
per-sample tensor of the wrong batch is refused before any work."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dflow_fast as df

F64 = torch.float64


class ClassVelocity(nn.Module):
    """v(t, x, labels, scale): an MLP on (x, t, embedding(labels)) times a shared scale."""

    def __init__(self, dim: int = 5, classes: int = 4, hidden: int = 24):
        super().__init__()
        self.emb = nn.Embedding(classes, 6)
        self.net = nn.Sequential(nn.Linear(dim + 7, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, x, labels, scale=1.0):
        h = torch.cat([x, t.expand(x.shape[0], 1), self.emb(labels)], 1)
        return scale * self.net(h)


def _setup(B=5):
    torch.manual_seed(0)
    vel = ClassVelocity().double().requires_grad_(False)
    labels = torch.tensor([0, 3, 1, 2, 3])[:B]
    # targets at very different distances: samples stop at different iterations
    target = torch.randn(B, 5, dtype=F64) * torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=F64)[:B,
                                                                                               None]
    x0 = torch.randn(B, 5, dtype=F64)
    return vel, labels, target, x0


def test_each_sample_with_its_labels_equals_its_solo_run():
    vel, labels, target, x0 = _setup()
    cond = {"labels": labels, "scale": 0.8}
    batch_calls = []
    res = df.optimize(vel, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=4, max_iter=25,
                      cond=cond, callback=lambda info: batch_calls.append(int(info.active.sum())))
    assert len(set(batch_calls)) > 1, "the active set never shrank: the test would prove nothing"
    for i in range(len(labels)):
        solo = df.optimize(vel, lambda x1: (x1 - target[i:i + 1]).pow(2).sum(1), x0[i:i + 1],
                           steps=4, max_iter=25, cond={"labels": labels[i:i + 1], "scale": 0.8})
        assert (res.x0[i] - solo.x0[0]).abs().max() <= 1e-9, i
        assert res.nit[i] == solo.nit[0] and res.status[i] == solo.status[0]


@pytest.mark.parametrize("gradient, solver, budget", [
    ("adjoint", "midpoint", None), ("adjoint", "euler", None), ("auto", "midpoint", 0),
    ("auto", "midpoint", math.inf), ("reversible", "reversible_heun", None),
    ("adjoint", "reversible_midpoint", None)])
def test_every_scheme_differentiates_the_same_closure(gradient, solver, budget):
    """Gradients of x0, the velocity's weights and a conditioning tensor that requires grad
    equal autograd's through the same solve."""
    vel, labels, target, x0 = _setup()
    vel.requires_grad_(True)
    ctx = torch.randn(5, 5, dtype=F64, requires_grad=True)

    def velocity(t, x, labels, ctx):
        return vel(t, x + 0.3 * ctx, labels)

    x0 = x0.clone().requires_grad_(True)
    kw = {} if budget is None else {"memory_budget": budget}
    inputs = (x0, ctx, *vel.parameters())

    def grads(g, **extra):
        x1 = df.solve(velocity, x0, steps=3, solver=solver, gradient=g,
                      cond={"labels": labels, "ctx": ctx}, **extra)
        return torch.autograd.grad((x1 * target).sum(), inputs)

    for got, want in zip(grads(gradient, **kw), grads("backprop")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_path_takes_cond():
    vel, labels, target, x0 = _setup()
    cond = {"labels": labels}
    a = df.solve(vel, x0, steps=4, gradient="backprop", cond=cond)
    b = df.reference.solve(vel, x0, steps=4, cond=cond)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cost = lambda x1: (x1 - target).pow(2).sum(1)  # noqa: E731
    r = df.reference.optimize(vel, cost, x0, steps=4, max_iter=3, cond=cond)
    assert r.x1.shape == x0.shape and torch.isfinite(r.loss).all()


def test_backward_blend_takes_cond():
    vel, labels, _, x0 = _setup()
    g = torch.Generator().manual_seed(3)
    got = df.backward_blend(vel, x0, alpha=1.0, steps=3, cond={"labels": labels}, generator=g)
    want = df.solve(lambda t, x: vel(t, x, labels), x0, steps=3, t0=1.0, t1=0.0,
                    gradient="backprop")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_shared_values_are_passed_unchanged():
    seen = {}

    def velocity(t, x, table, bias, name):
        seen.update(table=table.shape, bias=bias.shape, name=name)
        return x * 0 + bias.sum() + table.sum()

    x0 = torch.randn(3, 2)
    df.optimize(velocity, lambda x1: x1.pow(2).sum(1), x0, steps=1, max_iter=2,
                cond={"table": df.Shared(torch.ones(7, 2)), "bias": torch.ones(1, 2),
                      "name": "n"})
    assert seen == {"table": (7, 2), "bias": (1, 2), "name": "n"}


@pytest.mark.parametrize("cond, exc, match", [
    ({"labels": torch.zeros(4, dtype=torch.long)}, ValueError,
     r"cond\['labels'\] has shape \(4,\).*B = 3"),
    ({"emb": torch.zeros(6, 2)}, ValueError, r"cond\['emb'\] has shape \(6, 2\).*Shared"),
    ([("labels", 1)], TypeError, "cond must be a mapping"),
    ({1: torch.zeros(3)}, TypeError, "cond keys must be keyword-argument names"),
])
@pytest.mark.parametrize("entry", ["solve", "optimize", "backward_blend"])
def test_bad_cond_is_refused_before_any_work(entry, cond, exc, match):
    calls = []

    def velocity(t, x, **kw):
        calls.append(1)
        return x

    x0 = torch.randn(3, 2)
    with pytest.raises(exc, match=match):
        if entry == "solve":
            df.solve(velocity, x0, steps=2, cond=cond)
        elif entry == "optimize":
            df.optimize(velocity, lambda x1: x1.pow(2).sum(1), x0, steps=2, cond=cond)
        else:
            df.backward_blend(velocity, x0, cond=cond)
    assert calls == []


def test_model_velocity_forwards_cond():
    model = lambda x, t, labels: x * labels[:, None].to(x.dtype) + t[:, None]  # noqa: E731
    v = df.ModelVelocity(model)
    x = torch.randn(3, 2)
    out = v(torch.tensor(0.5), x, labels=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(out, x * torch.tensor([[1.], [2.], [3.]]) + 0.5)
