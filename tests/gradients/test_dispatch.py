"""Every gradient scheme through gradients.dispatch: velocities whose output does not depend on x
(their VJP is zero, not an error), and the scheme named in the leaf guard's error."""
from __future__ import annotations

import math

import pytest
import torch

import dflow_fast as df
from dflow_fast.core.checks import GRADIENTS
from dflow_fast.core.plan import make_plan
from dflow_fast.core.velocity import CheckedVelocity
from dflow_fast.gradients.dispatch import KINDS, SEGMENT, segment

F64 = torch.float64
#: (gradient, solver, memory_budget): every scheme, with auto at both ends of its budget
SCHEMES = [("adjoint", "euler", None), ("adjoint", "midpoint", None),
           ("backprop", "midpoint", None), ("auto", "midpoint", 0), ("auto", "midpoint", math.inf),
           ("adjoint", "reversible_heun", None), ("reversible", "reversible_heun", None),
           ("reversible", "reversible_midpoint", None), ("auto", "reversible_euler", 0)]
IDS = [f"{g}-{s}" + ("" if b is None else f"-budget{b}") for g, s, b in SCHEMES]


def _velocities():
    w = torch.randn(2, 3, dtype=F64, requires_grad=True)
    return {
        "ones_like": (lambda t, x: torch.ones_like(x), ()),
        "t_only": (lambda t, x: (t * t).expand_as(x).clone(), ()),
        "param_only": (lambda t, x: (t * w).expand_as(x), (w,)),
    }


@pytest.mark.parametrize("kind", ["ones_like", "t_only", "param_only"])
@pytest.mark.parametrize("gradient, solver, budget", SCHEMES, ids=IDS)
def test_velocity_that_ignores_x(gradient, solver, budget, kind):
    """x1 = x0 + (something independent of x0): d<c, x1>/dx0 = c, and a parameter's gradient
    equals autograd's through the same solver."""
    velocity, params = _velocities()[kind]
    x0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    c = torch.randn(4, 2, 3, dtype=F64)
    kw = {} if budget is None else {"memory_budget": budget}
    x1 = df.solve(velocity, x0, steps=3, solver=solver, gradient=gradient, **kw)
    grads = torch.autograd.grad((c * x1).sum(), (x0, *params))
    torch.testing.assert_close(grads[0], c, rtol=0, atol=1e-12)
    ref = df.solve(velocity, x0, steps=3, solver=solver, gradient="backprop")
    ref_grads = torch.autograd.grad((c * ref).sum(), (x0, *params))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gradient", ["adjoint", "auto", "backprop"])
def test_leaf_guard_names_the_scheme_asked_for(gradient):
    """A tensor requiring grad that no scheme but plain autograd can find is refused, naming the
    scheme asked for; backprop meets the guard only under float16 autocast (a Function owns its
    graph there), and its message must not suggest backprop itself."""
    hidden = {"w": torch.randn(3, dtype=F64, requires_grad=True)}

    class Opaque:  # hides its tensor from discovery: a __slots__ object, no __dict__ to walk
        __slots__ = ("get",)

    box = Opaque()
    box.get = lambda: hidden["w"]

    def velocity(t, x):
        return x * box.get()

    x0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    kw = {"memory_budget": 0} if gradient == "auto" else {}
    if gradient == "backprop":
        hidden["w"] = hidden["w"].detach().float().requires_grad_(True)
        x0 = x0.detach().float().requires_grad_(True)
        kw = {"autocast": torch.float16}
    with pytest.raises(RuntimeError, match=f"gradient='{gradient}'") as err:
        df.solve(velocity, x0, steps=2, gradient=gradient, **kw).sum().backward()
    assert ("use gradient='backprop'" in str(err.value)) == (gradient != "backprop")


def test_the_table_covers_every_fixed_scheme():
    assert set(SEGMENT) | {"auto"} == set(GRADIENTS)
    assert set(SEGMENT.values()) <= set(KINDS)


def test_unknown_segment_kind_is_refused():
    x0 = torch.randn(2, 3)
    plan = make_plan("euler", 2, 0.0, 1.0, None, x0)
    with pytest.raises(ValueError, match="unknown segment kind 'stroed'"):
        segment("stroed", CheckedVelocity(lambda t, x: x), plan, 0, 2, (x0,), (), None)
