"""torch.compile: a compiled velocity under every gradient scheme equals the eager one, and
``optimize(..., compile=...)`` compiles the batch dimension dynamic, so the shrinking active set
does not compile a graph per batch size. The tests compile with backends that skip inductor's
code generation (minutes on a CPU): "aot_eager" (dynamo + AOTAutograd, the parts that meet the
gradient schemes) and a recording backend; inductor itself is measured by bench/bench_compile.py."""
from __future__ import annotations

import pytest
import torch

import dflow_fast as df
from dflow_fast.core.compiled import CompiledVelocity

from tests.helpers import make_velocity, rel_err

#: every scheme; the reversible solvers' evaluation pattern under auto and reversible
CASES = [("midpoint", "auto"), ("midpoint", "adjoint"), ("midpoint", "backprop"),
         ("reversible_heun", "auto"), ("reversible_midpoint", "reversible")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def grads(velocity, params, x0, **kw):
    x = x0.clone().requires_grad_(True)
    x1 = df.solve(velocity, x, steps=3, **kw)
    return [x1, *torch.autograd.grad(x1.square().sum() + x1.sin().sum(), [x, *params])]


@pytest.mark.parametrize("solver, gradient", CASES)
def test_a_compiled_velocity_equals_the_eager_one_under_every_scheme(solver, gradient):
    v, shape = make_velocity("conv", torch.float32)
    W = torch.randn(shape, requires_grad=True)  # closed over: discovered through the compile

    def velocity(t, x):
        return v(t, x) + 0.3 * torch.tanh(W) * x

    compiled = torch.compile(velocity, backend="aot_eager")
    x0 = torch.randn(3, *shape)
    params = [W, *v.parameters()]
    kw = dict(solver=solver, gradient=gradient)
    for a, b in zip(grads(compiled, params, x0, **kw), grads(velocity, params, x0, **kw)):
        assert b.norm() > 0 and rel_err(a, b) <= 1e-6  # float32 rounding


class Recorder:
    """A compile backend that keeps each graph's placeholders and runs the graph eagerly."""

    def __init__(self):
        self.inputs: list[list] = []

    def __call__(self, gm, example_inputs):
        self.inputs.append([n.meta.get("example_value") for n in gm.graph.nodes
                            if n.op == "placeholder"])
        return gm.forward

    def state_batch_sizes(self, shape) -> list:
        """Dimension 0 of the state placeholder [n, *shape] of each graph (a SymInt if dynamic)."""
        return [p.shape[0] for ph in self.inputs for p in ph
                if isinstance(p, torch.Tensor) and tuple(p.shape[1:]) == tuple(shape)]


@pytest.mark.parametrize("gradient", ["auto", "adjoint"])
def test_optimize_compiles_one_graph_for_every_batch_size(gradient):
    v, shape = make_velocity("conv", torch.float32)
    v.requires_grad_(False)
    B = 8
    g = torch.Generator().manual_seed(0)
    y, x0 = torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
    weight = torch.logspace(-2, 1, B)  # unlike problems: samples stop at different iterations

    def cost(x1):
        return weight * (x1 - y).square().flatten(1).sum(1)

    active = set()
    rec = Recorder()
    kw = dict(steps=3, max_iter=15, gradient=gradient)
    res = df.optimize(v, cost, x0, compile={"backend": rec}, **kw,
                      callback=lambda info: active.add(int(info.active.sum())))
    sizes = rec.state_batch_sizes(shape)
    assert len({n for n in active if n >= 2}) >= 3  # the active set shrank through many sizes
    assert all(isinstance(n, torch.SymInt) or n == 1 for n in sizes)  # none specialized to one
    # one graph per grad mode (and per whether x requires grad), dynamic, plus size 1's
    assert len(rec.inputs) <= 6
    ref = df.optimize(v, cost, x0, **kw)
    assert rel_err(res.x0, ref.x0) <= 1e-6 and res.status == ref.status
    assert res.extra["compile"] == {"backend": repr(rec)}
    n = len(rec.inputs)
    df.optimize(v, cost, x0, compile={"backend": rec}, **kw)  # a second run: nothing new
    assert len(rec.inputs) == n


def test_compiled_velocity_marks_per_sample_conditioning_dynamic():
    emb = torch.nn.Embedding(3, 4)
    emb.requires_grad_(False)
    rec = Recorder()
    cv = CompiledVelocity(lambda t, x, labels: torch.tanh(x) + emb(labels), {"backend": rec})
    for n in (5, 4, 3):
        out = cv(torch.tensor(0.5), torch.randn(n, 4), labels=torch.arange(n) % 3)
        assert out.shape == (n, 4)
    assert len(rec.inputs) == 1 and isinstance(rec.state_batch_sizes((4,))[0], torch.SymInt)


@pytest.mark.parametrize("compile, error, match", [
    ("yes", TypeError, "compile must be a bool or a mapping"),
    ({"dynamic": True}, ValueError, "'dynamic' is chosen by dflow_fast"),
    ({1: "x"}, TypeError, "keyword names"),
])
def test_bad_compile_is_refused_before_any_work(compile, error, match):
    calls = []
    v = lambda t, x: calls.append(1) or -x  # noqa: E731
    with pytest.raises(error, match=match):
        df.optimize(v, lambda x1: x1.square().sum(1), torch.randn(2, 3), steps=2, compile=compile)
    assert not calls
