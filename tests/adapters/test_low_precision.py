"""diffusers models in bfloat16 / float16 (a pipeline loaded with ``torch_dtype=...``), solved with
a float32 state: the adapter casts the state to the model's dtype and the output back, and
declares the model's dtype (``compute_dtype``), so a float16 model's backward cotangents are
scaled as under ``autocast=torch.float16`` (dflow_fast/core/precision.py). Every case is compared
with the same weights in float32; the tolerances are a few units of each dtype's rounding
(bfloat16 keeps 8 significant bits, float16 11). On CUDA the same cases run on the GPU
(bench/gpu_check.sh, stage parity), with one more: the U-Net captured by CUDA graphs."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed")

import dflow_fast as df  # noqa: E402
from dflow_fast.adapters import classifier_free_guidance, from_diffusers  # noqa: E402
from dflow_fast.core.precision import compute_dtype  # noqa: E402

from ..helpers import rel_err  # noqa: E402
from .tiny_diffusers import sd3, unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.bfloat16, torch.float16]
#: relative error of a solve or gradient against the float32 model's (measured on the CPU:
#: bfloat16 4e-3 to 5e-3, float16 5e-4 to 7e-4)
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
#: cost scales: 1e-12 puts the cotangents far below float16's smallest normal number (6e-5)
SCALES = (1.0, 1e-12)


@pytest.fixture(autouse=True)
def exact_float32():
    """On CUDA the float32 reference must be float32: cuDNN convolutions default to TF32 (10-bit
    mantissa), as coarse as the float16 model under test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _x1_and_grad(velocity, x0, y, scale, gradient, **kw):
    x = x0.clone().requires_grad_(True)
    x1 = df.solve(velocity, x, steps=4, t0=0.02, gradient=gradient, **kw)
    (scale * (x1 - y).pow(2).sum()).backward()
    return x1.detach(), x.grad / scale


def _dtypes_seen(model) -> set:
    seen = set()
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.add(
        (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "auto"])
def test_low_precision_unet_in_a_float32_solve(device, dtype, gradient):
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    u32 = from_diffusers(unet().to(device), sched)
    low = unet(dtype=dtype).to(device)  # the same weights, rounded
    u = from_diffusers(low, sched)
    assert u.compute_dtype == dtype and compute_dtype(u32, None) is None
    seen = _dtypes_seen(low)
    g = torch.Generator().manual_seed(1)
    x0, y = (torch.randn(3, 1, 8, 8, generator=g).to(device) for _ in range(2))
    for scale in SCALES:
        x1_ref, g_ref = _x1_and_grad(u32, x0, y, scale, gradient)
        x1, grad = _x1_and_grad(u, x0, y, scale, gradient)
        assert x1.dtype == grad.dtype == torch.float32
        assert rel_err(x1, x1_ref) <= TOL[dtype], scale
        assert rel_err(grad, g_ref) <= TOL[dtype], scale
    assert seen == {dtype}  # the model ran in its own dtype, never float32


@pytest.mark.parametrize("device", DEVICES)
def test_float16_cotangents_underflow_without_the_declaration(device):
    """The same float16 model behind a plain function (no ``compute_dtype``): tiny cotangents
    are cast down unscaled and the network's part of the gradient is lost (measured 0.30 on the
    CPU); declared, it stays at float16 rounding. ``autocast=torch.float16`` repairs the
    undeclared one too."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    u32, u = (from_diffusers(unet(dtype=dt).to(device), sched)
              for dt in (torch.float32, torch.float16))

    def hidden(t, x):
        return u(t, x)
    g = torch.Generator().manual_seed(2)
    x0, y = (torch.randn(3, 1, 8, 8, generator=g).to(device) for _ in range(2))
    _, g_ref = _x1_and_grad(u32, x0, y, 1e-12, "adjoint")
    err = {name: rel_err(_x1_and_grad(v, x0, y, 1e-12, "adjoint", **kw)[1], g_ref)
           for name, v, kw in (("declared", u, {}), ("hidden", hidden, {}),
                               ("hidden+autocast", hidden, {"autocast": torch.float16}))}
    assert err["declared"] <= TOL[torch.float16], err
    assert err["hidden+autocast"] <= TOL[torch.float16], err
    assert err["hidden"] >= 10 * err["declared"], err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_transformer_under_guidance_and_optimize(device, dtype):
    """An SD3 transformer in low precision under classifier-free guidance (which passes the
    declaration on): optimize's batched gradient at iteration 0 is the float32 model's to the
    dtype's rounding, and the run lowers the cost."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    B = 2
    g = torch.Generator().manual_seed(3)
    ehs, pooled = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)
    cond = {"encoder_hidden_states": ehs.to(device), "pooled_projections": pooled.to(device)}
    uncond = {"encoder_hidden_states": torch.zeros(1, 5, 16, device=device),
              "pooled_projections": torch.zeros(1, 8, device=device)}
    vs = {dt: classifier_free_guidance(from_diffusers(sd3(dt).to(device), sched), 2.0, uncond)
          for dt in (torch.float32, dtype)}
    assert vs[dtype].compute_dtype == dtype
    x0 = torch.randn(B, 4, 8, 8, generator=g).to(device)
    y = torch.randn(B, 4, 8, 8, generator=g).to(device)

    def cost(x1):
        return (x1 - y).pow(2).flatten(1).sum(1)
    grads = {}
    for dt, v in vs.items():  # the cost scaled down to tiny cotangents
        x = x0.clone().requires_grad_(True)
        (1e-12 * cost(df.solve(v, x, steps=3, gradient="adjoint", cond=cond))).sum().backward()
        grads[dt] = x.grad
    assert rel_err(grads[dtype], grads[torch.float32]) <= TOL[dtype]
    start = cost(df.solve(vs[dtype], x0, steps=3, cond=cond))
    res = df.optimize(vs[dtype], cost, x0, steps=3, cond=cond, max_iter=3)
    assert res.x0.dtype == torch.float32 and bool((res.loss < start).all()), (res.loss, start)
    assert res.extra["compute_dtype"] == str(dtype).removeprefix("torch.")
    assert res.extra["autocast"] is None  # the model's own precision, no autocast region


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_unet_is_captured_by_cuda_graphs(dtype):
    """A diffusers U-Net through the adapter reads nothing on the host, so optimize(cuda_graphs=
    True) captures it (no fallback), in float32 and as a float16 model (its scaled backward
    captured too), and gives the eager run's results (to rounding, amplified by five L-BFGS
    iterations: a padded bucket may pick other convolution kernels; a wrong capture is off by
    O(1))."""
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
    u = from_diffusers(unet(dtype=dtype).cuda(), sched)
    g = torch.Generator().manual_seed(7)
    x0, y = (torch.randn(4, 1, 8, 8, generator=g).cuda() for _ in range(2))

    def cost(x1):
        return (x1 - y).pow(2).flatten(1).sum(1)
    runs = {graphs: df.optimize(u, cost, x0, steps=3, t0=0.02, max_iter=5, cuda_graphs=graphs)
            for graphs in (False, True)}
    rep = runs[True].extra["cuda_graphs"]
    assert rep["fallback"] is None and rep["captures"] >= 1 and rep["replays"] > 0, rep
    assert runs[True].extra["compute_dtype"] == (None if dtype == torch.float32 else "float16")
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for name in ("x0", "loss"):
        assert rel_err(getattr(runs[True], name), getattr(runs[False], name)) <= tol, name
