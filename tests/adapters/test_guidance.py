"""Classifier-free guidance, :func:`dflow_fast.adapters.classifier_free_guidance`: the formula in
exactly one call of 2n rows, scale 1 / 0 exactly the conditional / unconditional velocity,
per-sample conditioning (and per-sample unconditional values) following optimize's active rows,
the same x0-gradient under every scheme, and bad input refused before the model runs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dflow_fast as df
from dflow_fast.adapters import classifier_free_guidance
from dflow_fast.adapters.guidance import FromCond

F64 = torch.float64
CLASSES, NULL = 4, 4  # labels 0..3, NULL = the unconditional class


class ClassVelocity(nn.Module):
    """v(t, x, labels, c=None, gain=1.0): an MLP on (x, t, embedding(labels), c); counts calls
    and the rows of each."""

    def __init__(self, dim: int = 3, hidden: int = 16, width: int = 2):
        super().__init__()
        self.emb = nn.Embedding(CLASSES + 1, 4)
        self.net = nn.Sequential(nn.Linear(dim + 5 + width, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))
        self.width, self.rows = width, []

    def forward(self, t, x, labels, c=None, gain=1.0):
        self.rows.append(x.shape[0])
        if c is None:
            c = x.new_zeros(x.shape[0], self.width)
        h = torch.cat([x, t.expand(x.shape[0], 1), self.emb(labels), c.expand(x.shape[0], -1)], 1)
        return gain * self.net(h)


def _model(seed: int = 0) -> ClassVelocity:
    torch.manual_seed(seed)
    return ClassVelocity().double().requires_grad_(False)


def _max_err(a, b) -> float:
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("scale", [3.0, -0.5, 7.5])
def test_equals_the_formula_in_one_call_of_2n_rows(scale):
    v = _model()
    n = 4
    x, t = torch.randn(n, 3, dtype=F64), torch.tensor(0.3, dtype=F64)
    cond = {"labels": torch.tensor([0, 1, 2, 3]), "c": torch.randn(n, 2, dtype=F64), "gain": 0.8}
    guided = classifier_free_guidance(v, scale, {"labels": torch.tensor([NULL])})
    out = guided(t, x, **cond)
    assert v.rows == [2 * n]  # one call, conditional and unconditional rows together
    v_c = v(t, x, **cond)
    v_u = v(t, x, **{**cond, "labels": torch.full((n,), NULL)})
    ref = v_u + scale * (v_c - v_u)
    # the two halves of one 2n-row call vs two n-row calls: rounding of the same products
    assert _max_err(out, ref) <= 1e-14 * (1 + abs(scale)) * float(v_c.abs().max() + 1)
    v.rows.clear()
    N = 5
    df.solve(guided, torch.randn(n, 3, dtype=F64), steps=N, cond=cond)
    assert v.rows == [2 * n] * (2 * N)  # midpoint: 2 evaluations per step, each one call of 2n


def test_scale_one_and_zero_are_exactly_conditional_and_unconditional():
    v = _model()
    n = 3
    x, t = torch.randn(n, 3, dtype=F64), torch.tensor(0.6, dtype=F64)
    cond = {"labels": torch.tensor([2, 0, 1]), "c": torch.randn(n, 2, dtype=F64)}
    null = torch.randn(1, 2, dtype=F64)
    uncond = {"labels": torch.tensor([NULL]), "c": null}
    one = classifier_free_guidance(v, 1.0, uncond)(t, x, **cond)
    assert torch.equal(one, v(t, x, **cond))
    zero = classifier_free_guidance(v, 0, uncond)(t, x, **cond)
    assert torch.equal(zero, v(t, x, labels=torch.full((n,), NULL), c=null.expand(n, 2)))
    assert v.rows == [n, n, n, n]  # each a single call of n rows: the other half has weight 0


def _targets(B=5):
    torch.manual_seed(0)
    spread = torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0], dtype=F64)[:B, None]
    return torch.randn(B, 3, dtype=F64) * spread, torch.randn(B, 3, dtype=F64)


@pytest.mark.parametrize("kind", ["shared_null", "per_sample_null"])
def test_per_sample_cond_under_optimize_equals_solo_runs(kind):
    """Each sample's labels (and, with FromCond, its own unconditional labels) travel with the
    active rows as the active set shrinks: every sample ends where its solo run ends."""
    v = _model(1)
    target, x0 = _targets()
    labels = torch.tensor([0, 3, 1, 2, 3])
    nulls = torch.tensor([NULL, 0, NULL, 1, 2])
    if kind == "shared_null":
        guided = classifier_free_guidance(v, 2.5, {"labels": torch.tensor([NULL])})
        cond = lambda rows: {"labels": labels[rows], "gain": 0.8}  # noqa: E731
    else:
        guided = classifier_free_guidance(v, 2.5, {"labels": FromCond("null_labels")})
        cond = lambda rows: {"labels": labels[rows], "null_labels": nulls[rows]}  # noqa: E731
    active = []
    res = df.optimize(guided, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=4, max_iter=25,
                      cond=cond(slice(None)),
                      callback=lambda info: active.append(int(info.active.sum())))
    assert len(set(active)) > 1, "the active set never shrank: the test would prove nothing"
    assert all(r % 2 == 0 for r in v.rows)
    for i in range(5):
        solo = df.optimize(guided, lambda x1: (x1 - target[i:i + 1]).pow(2).sum(1),
                           x0[i:i + 1], steps=4, max_iter=25, cond=cond(slice(i, i + 1)))
        assert _max_err(res.x0[i], solo.x0[0]) <= 1e-9, i
        assert res.nit[i] == solo.nit[0] and res.status[i] == solo.status[0]


def test_held_per_sample_uncond_works_in_solve():
    """An unconditional value with one row per sample, held by the guidance: fine when every row
    is evaluated (solve), equal to passing it through cond with FromCond."""
    v = _model(2)
    x0 = torch.randn(4, 3, dtype=F64)
    labels, nulls = torch.tensor([0, 1, 2, 3]), torch.tensor([NULL, 3, NULL, 0])
    held = df.solve(classifier_free_guidance(v, 3.0, {"labels": nulls}), x0, steps=3,
                    cond={"labels": labels})
    passed = df.solve(classifier_free_guidance(v, 3.0, {"labels": FromCond("nl")}), x0, steps=3,
                      cond={"labels": labels, "nl": nulls})
    assert torch.equal(held, passed)


@pytest.mark.parametrize("gradient, solver, budget", [
    ("adjoint", "midpoint", None), ("auto", "midpoint", 0.0), ("auto", "midpoint", math.inf),
    ("auto", "euler", None), ("reversible", "reversible_heun", None)])
def test_every_gradient_scheme_gives_backprops_gradient(gradient, solver, budget):
    """x0's gradient, the model's weights' and a learned null embedding's (an uncond tensor that
    requires grad, found by discovery through the guidance) equal backprop's in float64."""
    grads = {}
    for scheme in ("backprop", gradient):
        v = _model(3).requires_grad_(True)
        null = torch.full((1, 2), 0.3, dtype=F64, requires_grad=True)
        guided = classifier_free_guidance(v, 4.0, {"labels": torch.tensor([NULL]), "c": null})
        x0 = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
        x0.requires_grad_(True)
        c = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(8))
        x1 = df.solve(guided, x0, steps=4, solver=solver, gradient=scheme,
                      memory_budget=budget if scheme == "auto" else None,
                      cond={"labels": torch.tensor([1, 0, 3]), "c": c})
        (x1 * torch.linspace(-1, 2, 9, dtype=F64).reshape(3, 3)).sum().backward()
        grads[scheme] = [x0.grad, null.grad] + [p.grad for p in v.parameters()]
    for k, (a, b) in enumerate(zip(grads["backprop"], grads[gradient])):
        assert a is not None and b is not None, k
        assert _max_err(a, b) <= 1e-12 * max(1.0, float(a.abs().max())), k


def test_bad_input_is_refused_before_the_model_runs():
    v = _model()
    x, t = torch.randn(2, 3, dtype=F64), torch.tensor(0.5, dtype=F64)
    null = {"labels": torch.tensor([NULL])}
    with pytest.raises(TypeError, match="velocity must be callable"):
        classifier_free_guidance("v", 2.0, null)
    for scale, err in ((math.nan, ValueError), (math.inf, ValueError), (True, TypeError),
                       ("2", TypeError), (torch.ones(2), ValueError)):
        with pytest.raises(err, match="scale"):
            classifier_free_guidance(v, scale, null)
    with pytest.raises(TypeError, match="uncond must map"):
        classifier_free_guidance(v, 2.0, [torch.tensor([NULL])])
    with pytest.raises(ValueError, match="uncond is empty"):
        classifier_free_guidance(v, 2.0, {})
    with pytest.raises(ValueError, match="0-dim"):
        classifier_free_guidance(v, 2.0, {"labels": torch.tensor(NULL)})
    with pytest.raises(TypeError, match="must be a tensor"):
        classifier_free_guidance(v, 2.0, {"labels": NULL})
    with pytest.raises(TypeError, match="FromCond needs"):
        FromCond("not a name")

    guided = classifier_free_guidance(v, 2.0, {"labels": torch.tensor([NULL]),
                                               "c": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"uncond has key\(s\) \['c'\]"):
        df.solve(guided, x, steps=2, cond={"labels": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match=r"FromCond\('nl'\) but cond has no key 'nl'"):
        classifier_free_guidance(v, 2.0, {"labels": FromCond("nl")})(
            t, x, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float64 but uncond"):  # dtype mismatch
        classifier_free_guidance(v, 2.0, {"c": torch.zeros(1, 2)})(
            t, x, labels=torch.tensor([0, 1]), c=torch.zeros(2, 2, dtype=F64))
    with pytest.raises(ValueError, match="must be a tensor with a leading batch"):
        classifier_free_guidance(v, 2.0, null)(t, x, labels=1)
    assert v.rows == []  # nothing above reached the model
    bad = classifier_free_guidance(lambda t, x, labels: x[:1], 2.0, null)
    with pytest.raises(ValueError, match="returned"):
        bad(t, x, labels=torch.tensor([0, 1]))


def test_held_per_sample_uncond_under_a_shrinking_active_set_names_fromcond():
    """A held [B] unconditional value cannot follow optimize's active rows: when the set shrinks,
    the evaluation raises and names the fix (FromCond)."""
    v = _model(1)
    target, x0 = _targets()
    guided = classifier_free_guidance(v, 2.5, {"labels": torch.tensor([NULL, 0, NULL, 1, 2])})
    with pytest.raises(ValueError, match="FromCond"):
        df.optimize(guided, lambda x1: (x1 - target).pow(2).sum(1), x0, steps=4, max_iter=25,
                    cond={"labels": torch.tensor([0, 3, 1, 2, 3])})
