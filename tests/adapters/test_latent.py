"""D-Flow through a decoder (examples/latent_dflow.py): a latent flow, the cost decoding x1 with a
tiny diffusers AutoencoderKL (random weights, built from a config) and comparing in pixel space.
The pixel cost decreases, the gradient through decoder + solve under the adjoint equals
backprop's (float64), and the decoder runs once per cost evaluation while the velocity runs
4N times (midpoint adjoint: 2N forward, 2N in the backward sweep)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed")

import dflow_fast as df  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "latent_dflow.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("latent_dflow", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


ex = _load_example()




def test_pixel_cost_decreases_and_the_decoder_runs_once_per_evaluation():
    steps = 3
    p = ex.make_problem(batch=2, steps=steps)
    forwards = []
    hook = p.decode.vae.decoder.register_forward_hook(lambda *args: forwards.append(1))
    evaluations = []

    def cost(z1):
        evaluations.append(z1.shape[0])
        return p.cost(z1)

    try:
        res = df.optimize(p.velocity, cost, p.x0, steps=steps, max_iter=6)
    finally:
        hook.remove()
    for i in range(2):
        assert float(res.loss[i]) < 0.5 * res.history[i][0], (i, res.history[i])
    # the decoder is in the cost: one forward per cost evaluation (its graph lives for that
    # evaluation's backward only), never one per solver step
    assert len(forwards) == p.decode.calls == len(evaluations) >= 2
    # midpoint, the default gradient "auto" keeping the graphs: 2 evaluations per step and cost
    # evaluation, plus auto's one measuring step (2 evaluations) for this new velocity
    assert res.velocity_calls == 2 * steps * len(evaluations) + 2


@pytest.mark.parametrize("gradient, budget", [("adjoint", None), ("auto", 0), ("auto", None)])
def test_gradient_through_decoder_and_solve_equals_backprop(gradient, budget):
    """float64: relative difference of x0's gradient <= 1e-12 (measured ~1e-16)."""
    p = ex.make_problem(batch=2, steps=4)
    grads = {}
    for scheme in ("backprop", gradient):
        x0 = p.x0.clone().requires_grad_(True)
        z1 = df.solve(p.velocity, x0, steps=4, gradient=scheme,
                      memory_budget=budget if scheme == "auto" else None)
        p.cost(z1).sum().backward()
        grads[scheme] = x0.grad
    a, b = grads["backprop"], grads[gradient]
    assert float(a.norm()) > 0
    assert float((a - b).norm() / a.norm()) <= 1e-12
