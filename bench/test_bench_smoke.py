"""Smoke benchmarks: one gradient d cost(x1)/d x0 per method on tiny CPU problems.

Timing is recorded by pytest-benchmark but never asserted (docs/design.md section 6); what is
asserted is that every method's gradient matches ``dflow_fast.reference`` and that the memory meter
sees what the adjoint is supposed to keep. Cases marked ``gpu`` use the 35M-parameter net and skip
without CUDA.

    python -m pytest bench/test_bench_smoke.py -q --benchmark-disable   # parity only
    python -m pytest bench/test_bench_smoke.py -q                       # plus timings
"""
from __future__ import annotations

import pytest
import torch

import dflow_fast
from bench.lib import (METHODS, build_velocity, guard_oom, one_gradient, rel_err,
                       saved_bytes_gradient)

STEPS, BATCH = 4, 2
# float32 gradients through a few network evaluations: rounding is ~1e-7 relative (the float64
# column of bench_gradient.py); 1e-5 leaves room for reordered sums without hiding a wrong formula.
TOL_F32 = 1e-5
# One torch thread per module: bench/conftest.py's autouse fixture.


def _problem(config: str, batch: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """(net, velocity, x0 [B, *S], target [B, *S]) with fixed seeds."""
    net, shape = build_velocity(config, device=device, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    target = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
    return (net, dflow_fast.ModelVelocity(net), x0.to(device, dtype),
            target.to(device, dtype))


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_cpu(benchmark, method, solver):
    net, velocity, x0, target = _problem("tiny", BATCH)
    kw = dict(steps=STEPS, solver=solver)
    g_ref = one_gradient("reference", velocity, x0, target, **kw)
    benchmark.group = f"gradient-cpu-{solver}"
    benchmark.extra_info.update(steps=STEPS, batch=BATCH, net="tiny", method=method)
    g = benchmark.pedantic(one_gradient, args=(method, velocity, x0, target), kwargs=kw,
                           rounds=5, warmup_rounds=1, iterations=1)
    assert g.shape == x0.shape and bool(torch.isfinite(g).all())
    # The net must actually bend the flow, or parity would hold for any solver gradient: the
    # gradient of the cost at x1 = x0 (zero velocity) has to differ clearly from g.
    g_identity = 2 * (x0 - target) / x0[0].numel()
    assert rel_err(g_identity, g_ref) > 1e-2
    assert rel_err(g, g_ref) <= TOL_F32


@pytest.mark.parametrize("method", ["backprop", "adjoint"])
def test_gradient_float64_parity(method):
    """In float64 the schemes agree with the reference to rounding of float64."""
    net, velocity, x0, target = _problem("tiny", BATCH, dtype=torch.float64)
    kw = dict(steps=STEPS, solver="midpoint")
    g_ref = one_gradient("reference", velocity, x0, target, **kw)
    assert rel_err(one_gradient(method, velocity, x0, target, **kw), g_ref) <= 1e-12


def test_saved_bytes_adjoint_keeps_a_fixed_number_of_states_per_step():
    """The meter sees the adjoint's N stored (state, first-stage velocity) pairs after the forward,
    one evaluation's graph at its peak, and the reference's graph growing with steps."""
    net, velocity, x0, target = _problem("tiny", BATCH)
    state = x0.numel() * x0.element_size()
    meters = {}
    for steps in (2, 4):
        for method in ("reference", "adjoint"):
            g, meters[method, steps] = saved_bytes_gradient(method, velocity, net, x0, target,
                                                            steps=steps, solver="midpoint")
            assert meters[method, steps].live == 0  # everything saved was released by backward
    # after forward: N states and their first-stage velocities (midpoint) + the cost's saved
    # (x1 - target)
    for steps in (2, 4):
        assert meters["adjoint", steps].after_forward == (2 * steps + 1) * state
    grow_ref = meters["reference", 4].peak - meters["reference", 2].peak
    grow_adj = meters["adjoint", 4].peak - meters["adjoint", 2].peak
    assert grow_ref > 10 * state  # two more steps of network activations
    assert 0 <= grow_adj <= 4 * state  # two more steps' (state, velocity) pairs at most
    assert meters["adjoint", 4].peak < meters["reference", 4].peak / 2


def test_guard_oom_records_oom():
    def boom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
    assert guard_oom(boom) == "oom"
    with pytest.raises(ValueError):
        guard_oom(lambda: (_ for _ in ()).throw(ValueError("not an OOM")))

# The GPU gradient cases live in bench/test_bench_suite.py (test_gradient_method_gpu).


def test_results_json_is_strict_with_non_finite_values(tmp_path):
    """NaN and infinities are written as strings: strict JSON parsers reject bare NaN/Infinity."""
    import json
    import math

    from bench.lib.env import write_json

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    path = write_json(tmp_path / "r.json", {"a": math.nan, "rows": [{"t": math.inf}, 1.5],
                                            "b": (-math.inf, 2)}, "cpu", meta={})
    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc == {"meta": {}, "a": "nan", "rows": [{"t": "inf"}, 1.5], "b": ["-inf", 2]}
