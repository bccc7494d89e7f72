"""Benchmark suite (pytest-benchmark): the gradient methods incl. the peers, the batched optimize vs
the per-image loop, and the benchmark scripts themselves, on CPU-sized problems.

What is asserted is correctness, never timing (docs/design.md section 6): every exact method's
gradient equals the reference's, torchdiffeq's continuous adjoints are close but measurably not
exact, the batched optimize reaches the per-image loop's final costs, the scripts write their files
and run as modules. Peers (torchdiffeq, flow_matching: the ``bench`` extra) are skipped, with the
reason, when not installed. Cases marked ``gpu`` are sized for a CUDA GPU and skip without one.

    python -m pytest bench/test_bench_suite.py -q --benchmark-disable      # CI: checks only
    python -m pytest bench/test_bench_suite.py -q --benchmark-json=bench/results/suite_cpu.json
    python -m pytest bench/test_bench_suite.py -q -m gpu                   # on a CUDA machine
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import dflow_fast
from bench import bench_budget, bench_e2e, bench_gradient, profile_gradient
from bench.lib import (REPO_ROOT, RssPeak, available_methods, build_velocity, guard_oom,
                       mse_cost, one_gradient, peer_available, rel_err, saved_bytes_gradient)

STEPS, BATCH = 4, 2
TOL_F32 = 1e-5  # as in test_bench_smoke.py: float32 rounding through a few network evaluations
EXACT = ("reference", "backprop", "adjoint-torch", "adjoint-cpp", "auto", "auto-0", "checkpoint",
         "torchdiffeq", "flow_matching")
# The reversible solver discretizes the ODE differently: its gradient is checked against backprop
# through the same reversible solver, not against the plain midpoint reference.
REVERSIBLE = ("reversible",)
APPROX = ("torchdiffeq-adjoint", "torchdiffeq-adjoint-ss")  # continuous adjoints

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="CUDA is not available: gpu benchmark cases need a GPU")
# One torch thread per module: bench/conftest.py's autouse fixture.


def _skip_unavailable(method: str, device: str = "cpu") -> None:
    why = peer_available(method)
    if why:
        pytest.skip(why)
    _, _, backend = method.partition("-")
    if method.startswith("adjoint-") and method not in available_methods(device):
        built = dflow_fast.build_info()["backends"]
        pytest.skip(f"backend {backend!r} is not available on {device} in this build "
                    f"(dflow_fast.build_info()['backends'] = {built})")


def _problem(config: str, batch: int, device="cpu", seed: int = 0):
    net, shape = build_velocity(config, device=device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(batch, *shape, generator=gen).to(device)
    target = torch.randn(batch, *shape, generator=gen).to(device)
    return net, dflow_fast.ModelVelocity(net), x0, target


# ----------------------------------------------------------------------------- gradients

def _reversible_backprop_gradient(velocity, x0, target, steps):
    x = x0.detach().requires_grad_(True)
    x1 = dflow_fast.solve(velocity, x, steps=steps, solver="reversible_midpoint",
                          gradient="backprop")
    return torch.autograd.grad(mse_cost(x1, target).sum(), x)[0]


@pytest.mark.parametrize("method", EXACT + APPROX + REVERSIBLE)
def test_gradient_method_cpu(benchmark, method):
    """Every method's gradient through a 4-step midpoint solve of the tiny U-Net, timed."""
    _skip_unavailable(method)
    net, velocity, x0, target = _problem("tiny", BATCH)
    kw = dict(steps=STEPS, solver="midpoint")
    if method in REVERSIBLE:
        g_ref = _reversible_backprop_gradient(velocity, x0, target, STEPS)
    else:
        g_ref = one_gradient("reference", velocity, x0, target, **kw)
    benchmark.group = "suite-gradient-cpu-midpoint"
    benchmark.extra_info.update(steps=STEPS, batch=BATCH, net="tiny", method=method)
    g = benchmark.pedantic(one_gradient, args=(method, velocity, x0, target), kwargs=kw,
                           rounds=5, warmup_rounds=1, iterations=1)
    assert g.shape == x0.shape and bool(torch.isfinite(g).all())
    err = rel_err(g, g_ref)
    benchmark.extra_info["rel_err_vs_ref"] = err
    if method in EXACT + REVERSIBLE:
        assert err <= TOL_F32
    else:
        # The continuous adjoint discretizes the adjoint ODE instead of differentiating the
        # discrete solve: close, but off by far more than rounding.
        assert 1e-5 < err < 0.1


@pytest.mark.parametrize("method", ["adjoint-torch", "torchdiffeq-adjoint",
                                    "torchdiffeq-adjoint-ss"])
def test_saved_bytes_do_not_grow_with_steps(method):
    """Adjoints keep their saved bytes flat in steps (plus a state or two per step where states are
    stored), and the meter sees everything released by the end: it does not leak the graphs that
    torchdiffeq builds with retain_graph=True."""
    _skip_unavailable(method)
    net, velocity, x0, target = _problem("tiny", BATCH)
    state = x0.numel() * x0.element_size()
    peaks = {}
    for steps in (2, 8):
        _, meter = saved_bytes_gradient(method, velocity, net, x0, target, steps=steps,
                                        solver="midpoint")
        assert meter.live == 0
        peaks[steps] = meter.peak
    assert peaks[8] - peaks[2] <= 13 * state  # dflow_fast's midpoint: 2 per step


def test_rss_meter_sees_a_large_allocation():
    if not RssPeak.available():
        pytest.skip("RSS peak needs Linux /proc/self/clear_refs")
    n = 64 * 2 ** 20

    def alloc():
        return torch.ones(n // 4).sum()
    _, peak = RssPeak.measure(alloc)
    assert peak >= 0.9 * n


def test_available_methods_lists_every_cpu_method():
    methods = available_methods("cpu")
    assert methods[:2] == ["reference", "backprop"] and "adjoint-torch" in methods
    assert {"auto", "auto-0", "reversible"} <= set(methods)
    assert "checkpoint" in methods and methods[-1] == "vjp"
    assert not any(m.startswith(("adjoint-cuda", "adjoint-triton")) for m in methods)


# ----------------------------------------------------------------------------- optimize

def _e2e_args(**kw):
    return types.SimpleNamespace(steps=3, max_iter=8, time="wall", **kw)


@pytest.mark.parametrize("task", ["inpaint_box", "deblur"])
def test_batched_optimize_matches_per_image_loop(benchmark, task):
    """dflow_fast.optimize on a batch of 4 reaches the final costs of the paper's per-image loop
    (dflow_fast.reference.optimize) with the same budget: bench_e2e's "equal final cost"."""
    from dflow_fast.tasks import make as make_task

    net, velocity, _, _ = _problem("tiny", 1)
    truth = torch.tanh(torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    p = make_task(task, truth, sigma=0.05, generator=torch.Generator().manual_seed(4))
    x0 = dflow_fast.backward_blend(velocity, p.guess, alpha=0.1, steps=3,
                                   generator=torch.Generator().manual_seed(5))
    args = _e2e_args()
    device = torch.device("cpu")
    ref = bench_e2e.run_reference(velocity, p, x0, truth, args, device)
    benchmark.group = "suite-optimize-cpu"
    benchmark.extra_info.update(task=task, n=4, steps=3, max_iter=8)
    fast = benchmark.pedantic(bench_e2e.run_dflow,
                              args=(velocity, p, x0, truth, 4, "adjoint", args, device, True),
                              rounds=3, iterations=1)
    bench_e2e.compare([ref, fast], 4)
    assert fast["equal_cost"], (fast["loss_mean"], ref["loss_mean"])
    assert torch.allclose(torch.tensor(fast["loss"]), torch.tensor(ref["loss"]), rtol=2e-2,
                          atol=1e-5)
    curve = fast["curve"]  # the PSNR tracker saw every iteration, starting from x0
    assert curve[0]["iteration"] == 0 and len(curve) >= 2
    assert all(b["seconds"] >= a["seconds"] for a, b in zip(curve, curve[1:]))


# ----------------------------------------------------------------------------- the scripts

SCRIPTS = ("bench_budget", "bench_e2e", "bench_gradient", "bench_kernels", "bench_peers",
           "bench_reversible", "profile_gradient", "bench_autocast", "bench_compile")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_as_a_module(script):
    """``python -m bench.<script> --help`` from the repository root: the way the scripts are run,
    with no sys.path edits of their own."""
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m bench.{script} ")


def test_bench_budget_script_spans_adjoint_to_backprop(tmp_path):
    """bench_budget on the tiny net: the budget-0 row keeps the adjoint's saved bytes, the
    all-graph row backprop's, every midpoint row's gradient equals backprop's; files written."""
    out = tmp_path / "budget.json"
    bench_budget.main(["--config", "tiny", "--batch", "2", "--steps", "4", "--repeats", "1",
                       "--fractions", "0", "0.5", "1", "--out", str(out)])
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["auto/midpoint/0.0000"]["peak_bytes"] == rows["adjoint"]["peak_bytes"]
    assert rows["auto/midpoint/1.0000"]["peak_bytes"] == rows["backprop"]["peak_bytes"]
    assert rows["auto/midpoint/0.0000"]["split"] == {"graph": 0, "stored": 4, "reversible": 0}
    assert rows["auto/reversible_midpoint/0.0000"]["split"]["reversible"] == 4
    assert all(r["rel_err_vs_backprop"] <= TOL_F32 for r in rows.values()
               if r["rel_err_vs_backprop"] is not None)
    for suffix in (".md", "_budget.png"):
        assert (tmp_path / f"budget{suffix}").stat().st_size > 0


def test_bench_peers_script_writes_results(tmp_path):
    """bench_gradient.main with bench_peers' method set on the tiny net: JSON, Markdown, plots."""
    out = tmp_path / "peers.json"
    bench_gradient.main(["--config", "tiny", "--batch", "1", "2", "--steps", "2", "3",
                         "--methods", "all", "--repeats", "1", "--warmup", "0", "--out", str(out),
                         "--plot"], out_stem="peers")
    doc = json.loads(out.read_text())
    assert doc["meta"]["torch"] == torch.__version__ and "commit" in doc["meta"]
    methods = {r["method"] for r in doc["results"]}
    assert {"reference", "backprop", "adjoint-torch", "checkpoint"} <= methods
    assert all(r["status"] == "ok" for r in doc["results"])
    assert [v["batch"] for v in doc["vjp"]] == [1, 2] and doc["goals"]
    # the evaluation-count prediction of the adjoint's time ratio: an evaluation without a graph
    # costs something and less than one with its VJP, so it lies in (1, 2)
    assert all(1 < v["adjoint_time_ratio_predicted"] < 2 for v in doc["vjp"])
    assert all(g["time_vs_backprop_predicted"] > 1 for g in doc["goals"])
    for r in doc["results"]:
        if r["method"] in EXACT:
            assert r["rel_err_vs_ref"] <= TOL_F32
    for suffix in (".md", "_memory.png", "_time.png", "_throughput.png"):
        assert (tmp_path / f"peers{suffix}").stat().st_size > 0
    # gradient="auto" (the default): measured once per velocity in the warm-up, so each measured
    # gradient evaluates the network as often as backprop; budget 0 keeps the adjoint's bytes
    calls = {(r["batch"], r["steps"], r["method"]): r["velocity_calls"] for r in doc["results"]}
    assert all(calls[b, s, "auto"] == calls[b, s, "backprop"] for b, s, _ in calls)
    assert [g["batch"] for g in doc["auto_goals"]] == [1, 2]
    assert all(g["small_budget_mem_vs_adjoint"] == 1.0 for g in doc["auto_goals"])
    assert "| auto (default) |" in (tmp_path / "peers.md").read_text()


def test_profile_script_writes_results(tmp_path):
    """profile_gradient.main on the tiny net: one profiled gradient per method, with the ops that
    took the time (on the CPU no CUDA calls, so their counts are 0 and no device time)."""
    out = tmp_path / "profile.json"
    profile_gradient.main(["--config", "tiny", "--batch", "2", "--steps", "2", "--methods",
                           "backprop", "adjoint-torch", "--repeats", "1", "--warmup", "1",
                           "--out", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["results"]}
    assert set(rows) == {"backprop", "adjoint-torch"}
    for r in rows.values():
        assert r["status"] == "ok" and r["wall_s"] > 0 and r["host_self_s"] > 0
        assert r["device_busy_s"] is None and r["launches"] == r["mallocs"] == 0
        assert any("conv" in o["op"] for o in r["top_ops"])
    assert rows["backprop"]["time_ratio_vs_backprop"] == 1.0
    md = (tmp_path / "profile.md").read_text()
    assert "| adjoint-torch |" in md and "Top ops of `backprop`" in md


def test_bench_e2e_script_on_fashion_mnist(tmp_path):
    """The end-to-end script on the bundled model, 2 images, 2 iterations."""
    from dflow_fast.data import DatasetNotFoundError

    try:
        dflow_fast.data.fashion_mnist("test", limit=2)
        from dflow_fast.models import load_pretrained
        load_pretrained("fashion-mnist")
    except (DatasetNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"Fashion-MNIST or the bundled model is missing: {e}")
    out = tmp_path / "e2e.json"
    bench_e2e.main(["--n", "2", "--batch", "1", "2", "--tasks", "sr2", "--max-iter", "2",
                    "--gradient", "adjoint", "--out", str(out)])
    doc = json.loads(out.read_text())
    runs = doc["tasks"][0]["runs"]
    assert [r["method"] for r in runs] == ["reference", "dflow_fast-adjoint",
                                          "dflow_fast-adjoint"]
    assert all(r["problems_per_hour"] > 0 for r in runs)
    assert runs[2]["curve"] and "equal_cost" in runs[2]
    for suffix in (".md", "_throughput.png", "_psnr.png"):
        assert (tmp_path / f"e2e{suffix}").stat().st_size > 0


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("method", ["reference", "backprop", "adjoint-torch", "adjoint-cuda",
                                    "adjoint-triton", "auto", "auto-0", "reversible",
                                    "checkpoint", "torchdiffeq",
                                    "torchdiffeq-adjoint", "flow_matching"])
def test_gradient_method_gpu(benchmark, method):
    """The 35M-parameter net, batch 8, 3x64x64, 10 midpoint steps: every method incl. peers."""
    _skip_unavailable(method, "cuda")
    device = torch.device("cuda")
    net, velocity, x0, target = _problem("gpu", 8, device=device)
    kw = dict(steps=10, solver="midpoint")
    if method in REVERSIBLE:
        g_ref = guard_oom(lambda: _reversible_backprop_gradient(velocity, x0, target, 10),
                          device)
    else:
        g_ref = guard_oom(lambda: one_gradient("reference", velocity, x0, target, **kw),
                          device)
    if isinstance(g_ref, str):
        pytest.skip("reference gradient ran out of GPU memory")
    benchmark.group = "suite-gradient-gpu-midpoint"
    benchmark.extra_info.update(steps=10, batch=8, net="gpu", method=method)

    def run():
        g = one_gradient(method, velocity, x0, target, **kw)
        torch.cuda.synchronize(device)
        return g
    g = guard_oom(lambda: benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1),
                  device)
    if isinstance(g, str):
        pytest.skip(f"{method} ran out of GPU memory")
    err = rel_err(g, g_ref)
    assert err <= 3e-4 if method in EXACT + REVERSIBLE else 1e-5 < err < 0.1


@pytest.mark.gpu
@requires_cuda
def test_batched_optimize_matches_per_image_loop_gpu(benchmark):
    """Batch 32 on the 35M-parameter net vs the per-image reference loop: equal final cost."""
    from dflow_fast.tasks import make as make_task

    device = torch.device("cuda")
    net, velocity, _, _ = _problem("gpu", 1, device=device)
    truth = torch.tanh(torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    truth = truth.to(device)
    p = make_task("inpaint_box", truth, sigma=0.05, generator=torch.Generator().manual_seed(4))
    x0 = dflow_fast.backward_blend(velocity, p.guess, alpha=0.1, steps=6,
                                   generator=torch.Generator(device).manual_seed(5))
    args = types.SimpleNamespace(steps=6, max_iter=10, time="wall")
    ref = bench_e2e.run_reference(velocity, p, x0, truth, args, device)
    benchmark.group = "suite-optimize-gpu"
    fast = benchmark.pedantic(bench_e2e.run_dflow,
                              args=(velocity, p, x0, truth, 32, "adjoint", args, device, False),
                              rounds=1, iterations=1)
    bench_e2e.compare([ref, fast], 32)
    benchmark.extra_info.update(throughput_ratio_vs_ref=fast["throughput_ratio_vs_ref"])
    assert fast["equal_cost"], (fast["loss_mean"], ref["loss_mean"])


def test_bench_models_compares_the_two_bundled_models(tmp_path):
    """bench_models on one image, one task: both models ran on the same task, the table has a row
    per metric, and the DDPM's training steps are recorded."""
    pytest.importorskip("diffusers", reason="needs the [diffusers] extra")
    from bench import bench_models
    out = tmp_path / "models.json"
    bench_models.main(["--n", "1", "--tasks", "sr4", "--steps", "1", "--max-iter", "1",
                       "--out", str(out)])
    doc = json.loads(out.read_text())
    assert set(doc["reports"]) == set(bench_models.MODELS)
    assert doc["ddpm_training_steps"] > 0 and doc["meta"]["torch"] == torch.__version__
    md = out.with_suffix(".md").read_text()
    assert "| sr4 | PSNR |" in md and "| sr4 | SSIM |" in md
