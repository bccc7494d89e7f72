"""dflow_fast.adapters.from_diffusers: diffusers models and schedulers as velocities
(docs/adapters.md, section "diffusers").

Every model is built from a tiny config with random weights (nothing is downloaded). The
closed-form case: for data N(mu, diag s^2) the optimal epsilon / x0 / v predictors are known and
the probability-flow ODE keeps (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) constant along each
trajectory, so the exact transport of the starting noise is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed")

import dflow_fast as df  # noqa: E402
from dflow_fast.adapters import DiffusionVelocity, FlowMatchVelocity, from_diffusers  # noqa: E402
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402

from ..helpers import rel_err  # noqa: E402
from .tiny_diffusers import UNET, sd3, unet  # noqa: E402

#: numpy 2 deprecations inside diffusers' schedulers (np.array on tensors), not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
F64 = torch.float64


def cond_unet(dtype=F64, **kw):
    torch.manual_seed(0)
    m = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **kw)
    return m.to(dtype).eval().requires_grad_(False)


def flux(dtype=torch.float32):
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return m.to(dtype).eval().requires_grad_(False)


# Flux latent packing, as diffusers' FluxPipeline does it (pipeline_flux.py: _pack_latents,
# _unpack_latents, _prepare_latent_image_ids; the pipeline module itself needs transformers)
def pack(x):
    B, C, H, W = x.shape
    x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x, H, W):
    B, _, C4 = x.shape
    x = x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, H, W)


def image_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# ---------------------------------------------------------------- flow matching (SD3, Flux)

def test_flow_match_euler_equals_the_scheduler_loop():
    """solve(euler, time_grid=v.time_grid(N)) is diffusers' own sampling loop."""
    model = unet(channels=2)
    for N in (4, 10):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        v = from_diffusers(model, sched)
        x0 = torch.randn(3, 2, 8, 8)
        ours = df.solve(v, x0, solver="euler", time_grid=v.time_grid(N))
        sched.set_timesteps(N)
        torch.testing.assert_close(v.time_grid(N), 1 - sched.sigmas.double(), rtol=0, atol=0)
        x = x0.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
        assert rel_err(ours, x) <= 1e-5, N


def test_flux_dynamic_shift_equals_the_pipeline_loop():
    """Flux: dynamic shift (mu from the token count), the pipeline's custom sigmas, guidance,
    packing done by the adapter on [B, C, H, W] latents; against FluxPipeline's loop on packed
    latents (timestep = t / 1000, txt_ids zeros)."""
    model, N, B = flux(), 5, 2
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    v = from_diffusers(model, sched, guidance=3.5)
    x0, ehs, pooled = torch.randn(B, 4, 8, 8), torch.randn(B, 3, 16), torch.randn(B, 8)
    sigmas = np.linspace(1.0, 1 / N, N)
    grid = v.time_grid(N, image_seq_len=16, sigmas=sigmas)
    ours = df.solve(v, x0, solver="euler", time_grid=grid,
                    cond={"encoder_hidden_states": ehs, "pooled_projections": pooled})
    cfg = sched.config
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    sched.set_timesteps(N, sigmas=sigmas, mu=16 * m + cfg.base_shift - m * cfg.base_image_seq_len)
    x, ids, g = pack(x0), image_ids(4, 4), torch.full([B], 3.5)
    for t in sched.timesteps:
        out = model(hidden_states=x, timestep=t.expand(B) / 1000, guidance=g, img_ids=ids,
                    pooled_projections=pooled, encoder_hidden_states=ehs,
                    txt_ids=torch.zeros(3, 3)).sample
        x = sched.step(out, t, x).prev_sample
    assert rel_err(ours, unpack(x, 8, 8)) <= 1e-5


def test_transformers_match_the_models_called_by_hand():
    """u = -model(x, timestep) with SD3's timestep sigma * 1000 and Flux's sigma; per-sample
    inputs through cond; Flux on [B, C, H, W] latents (packed here) and on packed ones."""
    B, t = 3, torch.tensor(0.37)
    ehs, pooled = torch.randn(B, 5, 16), torch.randn(B, 8)
    model = sd3()
    v = from_diffusers(model, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = torch.randn(B, 4, 8, 8)
    want = -model(hidden_states=x, timestep=torch.full([B], 630.0), encoder_hidden_states=ehs,
                  pooled_projections=pooled).sample
    got = v(t, x, encoder_hidden_states=ehs, pooled_projections=pooled)
    assert rel_err(got, want) <= 1e-6

    model = flux()
    v = from_diffusers(model, diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    g, ids = torch.tensor([3.5, 2.0, 5.0]), image_ids(4, 4)
    out = model(hidden_states=pack(x), timestep=torch.full([B], 0.63), guidance=g,
                pooled_projections=pooled, encoder_hidden_states=ehs, txt_ids=torch.zeros(5, 3),
                img_ids=ids).sample
    kw = dict(encoder_hidden_states=ehs, pooled_projections=pooled, guidance=g)
    assert rel_err(v(t, x, **kw), -unpack(out, 8, 8)) <= 1e-6
    assert rel_err(v(t, pack(x), img_ids=ids, **kw), -out) <= 1e-6


# ------------------------------------------------------------------- VP diffusion schedulers

class GaussianUNet(diffusers.UNet2DModel):
    """The optimal predictor for data N(mu, diag s^2) on the adapter's path alpha(tau),
    sigma(tau) (the fractional tau it receives)."""

    def __init__(self, mu, s):
        super().__init__(in_channels=1, out_channels=1, **UNET)
        self.mu, self.s, self.v = mu, s, None

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        tau = timestep[0].double()
        _, a, sg, _ = self.v.schedule(1 - tau / (self.v.T - 1))
        x = sample.double()
        var = a ** 2 * self.s ** 2 + sg ** 2
        eps = sg * (x - a * self.mu) / var
        x0 = self.mu + a * self.s ** 2 * (x - a * self.mu) / var
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sg * x0}[
            self.v.prediction_type].to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def gaussian(prediction, **sched_kw):
    mu = torch.randn(1, 1, 4, 4, dtype=F64)
    s = torch.rand(1, 1, 4, 4, dtype=F64) + 0.5
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", prediction_type=prediction,
                                    **sched_kw)
    model = GaussianUNet(mu, s).double().requires_grad_(False)
    v = from_diffusers(model, sched)
    object.__setattr__(model, "v", v)  # not a submodule: v holds the model
    return v, mu, s


def transport(v, x0, mu, s):
    """The exact x1 of the probability-flow ODE from x0 at t = 0."""
    _, a0, s0, _ = v.schedule(torch.tensor(0.0, dtype=F64))
    _, a1, s1, _ = v.schedule(torch.tensor(1.0, dtype=F64))
    z = (x0 - a0 * mu) / (a0 ** 2 * s ** 2 + s0 ** 2).sqrt()
    return a1 * mu + (a1 ** 2 * s ** 2 + s1 ** 2).sqrt() * z


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_gaussian_data_is_transported_exactly(prediction):
    """Midpoint on the DDIM grid converges to the exact transport at second order. Measured
    (docs/adapters.md): relative error 3.5e-3, 8.7e-4, 2.1e-4 at 10, 20, 40 steps."""
    torch.manual_seed(0)
    v, mu, s = gaussian(prediction)
    x0 = torch.randn(64, 1, 4, 4, dtype=F64)
    want = transport(v, x0, mu, s)
    errs = [rel_err(df.solve(v, x0, time_grid=v.time_grid(n)), want) for n in (10, 20, 40)]
    assert errs[0] <= 5e-3 and errs[2] <= 3e-4, errs
    assert errs[0] / errs[1] > 3.5 and errs[1] / errs[2] > 3.5, errs  # second order
    # the denoised prediction at t = 1 is the posterior mean there
    x1 = transport(v, x0, mu, s)
    _, a1, s1, _ = v.schedule(torch.tensor(1.0, dtype=F64))
    post = mu + a1 * s ** 2 * (x1 - a1 * mu) / (a1 ** 2 * s ** 2 + s1 ** 2)
    torch.testing.assert_close(v.denoised(1.0, x1), post, rtol=1e-12, atol=1e-12)


def test_schedule_hits_the_table_and_is_scipys_pchip():
    interpolate = pytest.importorskip("scipy.interpolate", reason="scipy (the [data] extra, via scikit-learn) is not installed")
    for sched in (diffusers.DDIMScheduler(),
                  diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")):
        v = from_diffusers(unet(), sched)
        abar = sched.alphas_cumprod.double()
        tau = torch.cat([torch.arange(1000, dtype=F64), torch.rand(500, dtype=F64) * 999])
        got_tau, a, s, dla = v.schedule(1 - tau / 999)
        torch.testing.assert_close(got_tau, tau, rtol=0, atol=1e-10)
        torch.testing.assert_close(a[:1000] ** 2, abar, rtol=1e-13, atol=0)
        torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(a), rtol=0, atol=1e-15)
        p = interpolate.PchipInterpolator(np.arange(1000), np.log(abar.numpy()))
        torch.testing.assert_close(2 * a.log(), torch.from_numpy(p(tau.numpy())), rtol=1e-13,
                                   atol=1e-13)
        torch.testing.assert_close(dla, torch.from_numpy(-999 * p(tau.numpy(), 1)), rtol=1e-12,
                                   atol=1e-15)
    # float32 times snap to the integer timesteps they stand for
    tau, *_ = v.schedule(torch.tensor(1 - 899 / 999, dtype=torch.float32))
    assert float(tau) == 899.0
    # zero terminal SNR: abar[-1] = 0 continues log(abar) linearly, the velocity stays finite
    zsnr = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    v = from_diffusers(unet(), zsnr)
    _, a, _, dla = v.schedule(torch.tensor([0.0, 0.0005], dtype=F64))
    assert bool(torch.isfinite(dla).all()) and 0 < float(a[0]) < float(a[1]) < 1e-4
    assert torch.isfinite(df.solve(v, torch.randn(2, 1, 8, 8), steps=2)).all()


def test_ddim_and_the_adapter_converge_to_the_same_solution():
    """A random UNet2DModel, DDIM (eta = 0; trailing spacing, so DDIM's steps are its own
    timesteps; set_alpha_to_one=False, so both end at tau = 0): the adapter's midpoint solve
    and DDIM agree as steps grow, DDIM being first order (table in docs/adapters.md)."""
    model = unet(dtype=F64)
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False,
                                    clip_sample=False)
    v = from_diffusers(model, sched)
    x0 = torch.randn(2, 1, 8, 8, dtype=F64)
    errs = []
    for n in (10, 40, 200):
        sched.set_timesteps(n)
        x = x0.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
        errs.append(rel_err(df.solve(v, x0, time_grid=v.time_grid(n)), x))
    assert errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3 and errs[2] <= 6e-3, errs


def test_time_grid_follows_the_schedulers_spacing():
    T1, m = 999, unet()

    def mapped(taus):
        return torch.tensor([0.0] + [1 - t / T1 for t in taus] + [1.0], dtype=F64)

    v = from_diffusers(m, diffusers.DDIMScheduler(timestep_spacing="trailing"))
    torch.testing.assert_close(v.time_grid(4), mapped([749, 499, 249]))
    # "leading" (steps_offset 1): the first timestep 751 is below T - 1, the solve starts at 0
    v = from_diffusers(m, diffusers.DDIMScheduler(steps_offset=1))
    torch.testing.assert_close(v.time_grid(4), mapped([501, 251, 1]))
    # "leading" ending at timestep 0: its timesteps are the interior points
    v = from_diffusers(m, diffusers.DDPMScheduler())
    torch.testing.assert_close(v.time_grid(4), mapped([750, 500, 250]))
    # "linspace" holds both ends: set_timesteps(steps + 1)
    v = from_diffusers(m, diffusers.EulerDiscreteScheduler())
    torch.testing.assert_close(v.time_grid(4), mapped([749.25, 499.5, 249.75]))
    # PNDM interleaves stages: DDIM's grid for the same config
    v = from_diffusers(m, diffusers.PNDMScheduler())
    torch.testing.assert_close(v.time_grid(4), mapped([750, 500, 250]))
    for sched in (diffusers.DPMSolverMultistepScheduler(), diffusers.UniPCMultistepScheduler(),
                  diffusers.PNDMScheduler(timestep_spacing="trailing")):
        for n in (1, 3, 25):
            g = from_diffusers(m, sched).time_grid(n)
            assert g.dtype == F64 and g.shape == (n + 1,) and g[0] == 0 and g[-1] == 1
            assert bool((g[1:] > g[:-1]).all()), (type(sched).__name__, n)
    assert not hasattr(sched, "num_inference_steps") or sched.num_inference_steps is None


# --------------------------------------------------------- conditioning under the optimizer

class Guided(nn.Module):
    """Classifier-free guidance in one call of 2n rows: u_uncond + w (u_cond - u_uncond)."""

    def __init__(self, velocity, scale, null_class):
        super().__init__()
        self.velocity, self.scale, self.null = velocity, scale, null_class

    def forward(self, t, x, class_labels):
        n = x.shape[0]
        labels = torch.cat([class_labels, torch.full_like(class_labels, self.null)])
        u = self.velocity(t, torch.cat([x, x]), class_labels=labels)
        return u[n:] + self.scale * (u[:n] - u[n:])


def _batched_equals_solo(velocity, cond, grid):
    B = 3
    x0 = torch.randn(B, 1, 8, 8, dtype=F64)
    target = torch.randn(B, 1, 8, 8, dtype=F64)

    def cost(tg):
        return lambda x1: (x1 - tg).pow(2).flatten(1).sum(1)

    loss0 = cost(target)(df.solve(velocity, x0, time_grid=grid, cond=cond))
    stop = loss0 * torch.tensor([0.5, 0.05, 0.005], dtype=F64)  # stop at different iterations
    active = []
    res = df.optimize(velocity, cost(target), x0, time_grid=grid, cond=cond, max_iter=12,
                      stop_loss=stop, callback=lambda info: active.append(int(info.active.sum())))
    assert len(set(active)) > 1, "the active set never shrank: the test would prove nothing"
    for i in range(B):
        solo = df.optimize(velocity, cost(target[i:i + 1]), x0[i:i + 1], time_grid=grid,
                           cond={k: v[i:i + 1] for k, v in cond.items()}, max_iter=12,
                           stop_loss=stop[i:i + 1])
        # float64: the same arithmetic up to the rounding of batched kernels (about 1e-16 per
        # op), amplified by up to a dozen L-BFGS iterations; measured at most 3e-14 (x0) and
        # 2.4e-13 (x1), so 1e-10 leaves three orders of margin and still catches any mixing of
        # rows or conditioning, which moves x0 at order 1
        assert rel_err(res.x0[i], solo.x0[0]) <= 1e-10, i
        assert res.nit[i] == solo.nit[0] and res.status[i] == solo.status[0]


def test_guided_class_conditional_unet_under_optimize():
    v = from_diffusers(unet(dtype=F64, num_class_embeds=4), diffusers.DDIMScheduler())
    guided = Guided(v, scale=2.0, null_class=3)
    _batched_equals_solo(guided, {"class_labels": torch.tensor([0, 2, 1])}, v.time_grid(2))


def test_cross_attention_unet_under_optimize():
    sched = diffusers.DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    v = from_diffusers(cond_unet(), sched)
    _batched_equals_solo(v, {"encoder_hidden_states": torch.randn(3, 4, 8, dtype=F64)},
                         v.time_grid(2))


def test_added_conditions_go_through_cond():
    """SDXL-style added conditions (text_embeds, time_ids) as per-sample cond entries."""
    model = cond_unet(addition_embed_type="text_time", addition_time_embed_dim=4,
                      projection_class_embeddings_input_dim=6 * 4 + 8)
    v = from_diffusers(model, diffusers.DDIMScheduler())
    B, x = 2, torch.randn(2, 1, 8, 8, dtype=F64)
    cond = {"encoder_hidden_states": torch.randn(B, 4, 8, dtype=F64),
            "text_embeds": torch.randn(B, 8, dtype=F64), "time_ids": torch.rand(B, 6, dtype=F64)}
    t = torch.tensor(0.5, dtype=F64)
    tau, a, s, dla = v.schedule(t)
    eps = model(x, tau.expand(B), encoder_hidden_states=cond["encoder_hidden_states"],
                added_cond_kwargs={k: cond[k] for k in ("text_embeds", "time_ids")}).sample
    half = 0.5 * dla / s ** 2
    torch.testing.assert_close(v(t, x, **cond), half * (s ** 2 * x - s * eps), rtol=1e-12,
                               atol=1e-12)
    both = df.solve(v, x, steps=2, cond=cond)
    for i in range(B):
        one = df.solve(v, x[i:i + 1], steps=2, cond={k: c[i:i + 1] for k, c in cond.items()})
        assert rel_err(both[i:i + 1], one) <= 1e-12


# ------------------------------------------------------------------------- gradient schemes

@pytest.mark.parametrize("case", ["unet-epsilon", "cond-unet-v", "sd3-flow-match"])
@pytest.mark.parametrize("gradient", ["adjoint", "auto"])
def test_every_gradient_scheme_gives_backprops_gradient(case, gradient):
    B = 2
    if case == "unet-epsilon":
        v, x0, cond = from_diffusers(unet(dtype=F64), diffusers.DDIMScheduler()), \
            torch.randn(B, 1, 8, 8, dtype=F64), {}
    elif case == "cond-unet-v":
        v = from_diffusers(cond_unet(), diffusers.DDPMScheduler(prediction_type="v_prediction"))
        x0, cond = torch.randn(B, 1, 8, 8, dtype=F64), {
            "encoder_hidden_states": torch.randn(B, 4, 8, dtype=F64)}
    else:
        v = from_diffusers(sd3(F64), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
        x0, cond = torch.randn(B, 4, 8, 8, dtype=F64), {
            "encoder_hidden_states": torch.randn(B, 5, 16, dtype=F64),
            "pooled_projections": torch.randn(B, 8, dtype=F64)}
    w = torch.randn_like(x0)

    def grad(g, **kw):
        x = x0.clone().requires_grad_(True)
        x1 = df.solve(v, x, steps=3, gradient=g, cond=cond, **kw)
        return torch.autograd.grad((x1 * w).sum(), x)[0]

    kw = {"memory_budget": 0} if gradient == "auto" else {}
    torch.testing.assert_close(grad(gradient, **kw), grad("backprop"), rtol=1e-10, atol=1e-12)
    if gradient == "auto":
        torch.testing.assert_close(grad("auto"), grad("backprop"), rtol=1e-10, atol=1e-12)


def test_model_weights_are_found_and_receive_gradients():
    model = unet(dtype=F64).requires_grad_(True)
    v = from_diffusers(model, diffusers.DDIMScheduler())
    x0 = torch.randn(2, 1, 8, 8, dtype=F64)
    p = model.conv_out.weight
    got = torch.autograd.grad(df.solve(v, x0, steps=2, gradient="adjoint").sum(), p)[0]
    want = torch.autograd.grad(df.solve(v, x0, steps=2, gradient="backprop").sum(), p)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ errors

def test_clear_errors_before_any_work():
    m = unet()
    with pytest.raises(TypeError, match="unsupported scheduler ScoreSdeVeScheduler.*"
                                        "FlowMatchEulerDiscreteScheduler"):
        from_diffusers(m, diffusers.ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="prediction_type 'flow'.*'epsilon', 'v_prediction', "
                                         "'sample'"):
        from_diffusers(m, diffusers.DDPMScheduler(prediction_type="flow"))
    with pytest.raises(TypeError, match="unsupported model Linear.*UNet2DModel"):
        from_diffusers(nn.Linear(2, 2), diffusers.DDIMScheduler())
    with pytest.raises(TypeError, match="SD3Transformer2DModel does not go with DDIMScheduler"):
        from_diffusers(sd3(), diffusers.DDIMScheduler())
    with pytest.raises(TypeError, match=r"\['labels'\] are not inputs of UNet2DModel"):
        from_diffusers(m, diffusers.DDIMScheduler(), labels=1)
    with pytest.raises(ValueError, match="invert_sigmas"):
        from_diffusers(m, diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    v = from_diffusers(flux(), diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="pass mu, or image_seq_len"):
        v.time_grid(4)
    with pytest.raises(TypeError, match="guidance_embeds=True: pass guidance"):
        v(torch.tensor(0.5), torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 2, 16),
          pooled_projections=torch.randn(1, 8))
    with pytest.raises(ValueError, match="steps must be an int"):
        from_diffusers(m, diffusers.DDIMScheduler()).time_grid(0)
    with pytest.raises(ValueError, match="at most T - 1 = 999 steps"):
        from_diffusers(m, diffusers.DDIMScheduler()).time_grid(1000)
    assert isinstance(from_diffusers(m, diffusers.DDIMScheduler()), DiffusionVelocity)
    assert isinstance(from_diffusers(m, diffusers.FlowMatchEulerDiscreteScheduler()),
                      FlowMatchVelocity)
