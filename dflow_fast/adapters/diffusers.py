"""diffusers models with their schedulers as ``velocity(t, x, **cond)`` (t = 0 noise, t = 1 data).

- Schedulers with ``alphas_cumprod`` (DDPM, DDIM, Euler, DPM-Solver, UniPC, ...) give a
  :class:`DiffusionVelocity`: the probability-flow ODE of the variance-preserving process,
  t = 1 - tau / (T - 1) for training timesteps tau in 0..T-1, log(abar) interpolated between
  integer tau by a monotone C1 cubic (the model gets the fractional tau; the velocity is the
  exact derivative of that path), written with no division by alpha: with
  lam = log(alpha^2 / sigma^2) and lam' = d lam / dt,

      epsilon        u = lam'/2 * (sigma^2 x - sigma eps_hat)
      sample         u = lam'/2 * alpha * (x0_hat - alpha x)
      v_prediction   u = -lam'/2 * alpha * sigma * v_hat

- ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux) gives a :class:`FlowMatchVelocity`:
  t = 1 - sigma, u = -model output.

Conventions, measurements and usage: docs/adapters.md, section "diffusers". diffusers is
imported here only, and only when an adapter is built. Layer 3: imports core/ only (nothing).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

PREDICTIONS = ("epsilon", "v_prediction", "sample")
UNETS = ("UNet2DModel", "UNet2DConditionModel")
TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel")
#: per-sample ``cond`` keys a UNet2DConditionModel receives inside ``added_cond_kwargs``
ADDED_COND_KEYS = ("text_embeds", "time_ids", "image_embeds", "hint")
#: alphas_cumprod is capped at 1 - ABAR_MIN (log(1 - abar) stays finite)
ABAR_MIN = 2.0 ** -24


def _diffusers():
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - the extra is installed in the test env
        raise ImportError("dflow_fast.adapters.from_diffusers needs diffusers: pip install "
                          "'dflow_fast[diffusers]'") from err
    return diffusers


def from_diffusers(model: nn.Module, scheduler: Any, **fixed_kwargs) -> nn.Module:
    """``velocity(t, x, **cond)`` for a diffusers ``model`` sampled with ``scheduler``.

    Args:
        model: a ``UNet2DModel`` or ``UNet2DConditionModel`` (with a VP scheduler or the
            flow-matching one), an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``
            (with ``FlowMatchEulerDiscreteScheduler``), or a subclass of one of them.
        scheduler: a scheduler with ``alphas_cumprod`` and ``prediction_type`` "epsilon",
            "v_prediction" or "sample" (DDPM, DDIM, Euler, DPM-Solver, ...), or a
            ``FlowMatchEulerDiscreteScheduler``. Only its schedule and timestep spacing are
            used; its sampling options (clip_sample, thresholding, eta) are not: the adapter is
            the ODE, the solver is dflow_fast's.
        **fixed_kwargs: keyword arguments of the model's forward passed at every call (e.g.
            ``joint_attention_kwargs``, a shared ``encoder_hidden_states``, Flux's ``txt_ids``).
            Per-sample inputs go in ``cond`` of ``solve``/``optimize`` instead, so they follow
            the optimizer's active rows.

    Returns:
        A :class:`DiffusionVelocity` or :class:`FlowMatchVelocity` (an ``nn.Module``; its
        ``time_grid(steps)`` gives the scheduler's own spacing in t).
    """
    d = _diffusers()
    if isinstance(scheduler, d.FlowMatchEulerDiscreteScheduler):
        return FlowMatchVelocity(model, scheduler, **fixed_kwargs)
    if hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "config"):
        return DiffusionVelocity(model, scheduler, **fixed_kwargs)
    raise TypeError(
        f"from_diffusers: unsupported scheduler {type(scheduler).__name__}; supported are "
        f"schedulers with alphas_cumprod (DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, "
        f"DPMSolverMultistepScheduler, ...) with prediction_type in {list(PREDICTIONS)}, and "
        f"FlowMatchEulerDiscreteScheduler")


def _model_kind(model: Any, allowed: tuple[str, ...], why: str) -> str:
    d = _diffusers()
    for name in UNETS + TRANSFORMERS:
        if isinstance(model, getattr(d, name)):
            if name not in allowed:
                raise TypeError(f"from_diffusers: a {name} does not go with {why}; this "
                                f"scheduler supports {list(allowed)}")
            return name
    raise TypeError(f"from_diffusers: unsupported model {type(model).__name__}; supported are "
                    f"{list(UNETS + TRANSFORMERS)} and their subclasses")


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"time_grid: steps must be an int >= 1, got {steps!r}")
    return steps


def _fresh(scheduler: Any, cls: Any = None) -> Any:
    """A new scheduler from ``scheduler``'s config, so set_timesteps never touches the user's."""
    return (cls or type(scheduler)).from_config(scheduler.config)


class _DiffusersVelocity(nn.Module):
    """Calls a diffusers model as the adapters need: casts to the model's dtype and back, routes
    ``cond`` and the fixed keywords, packs Flux latents."""

    def __init__(self, model: nn.Module, kind: str, fixed_kwargs: dict):
        super().__init__()
        self.model, self.kind = model, kind
        params = inspect.signature(model.forward).parameters
        self._any_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        names = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD]
        self._keywords = set(names[1:]) - {"timestep", "return_dict"}  # names[0]: the state
        if kind == "UNet2DConditionModel":
            self._keywords |= set(ADDED_COND_KEYS)
        self._check_keys(fixed_kwargs, "fixed keyword")
        for k, v in fixed_kwargs.items():
            if isinstance(v, Tensor) and v.requires_grad:
                raise ValueError(f"fixed keyword {k!r} requires grad: pass it in cond instead "
                                 f"(dflow_fast.Shared(...) if every sample shares it), where "
                                 f"tensors receive gradients")
        self.fixed = dict(fixed_kwargs)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """The model's dtype: a float16 model's cotangents are scaled in the backward
        (dflow_fast.core.precision), as under ``autocast=torch.float16``."""
        dtype = getattr(self.model, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else None

    def _check_keys(self, kwargs: dict, what: str) -> None:
        bad = sorted(k for k in kwargs if k not in self._keywords)
        if bad and not self._any_kwargs:
            raise TypeError(f"{type(self).__name__}: {what}(s) {bad} are not inputs of "
                            f"{type(self.model).__name__}; it takes {sorted(self._keywords)}")

    def _call(self, x: Tensor, timestep: Tensor, cond: dict) -> Tensor:
        """The model's output for states ``x`` [B, *S] at ``timestep`` [B], shaped like x."""
        self._check_keys(cond, "cond key")
        dtype = getattr(self.model, "dtype", x.dtype)
        kw = {k: (v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v)
              for k, v in {**self.fixed, **cond}.items()}
        if self.kind == "UNet2DConditionModel":
            added = {k: kw.pop(k) for k in ADDED_COND_KEYS if k in kw}
            if added:
                kw["added_cond_kwargs"] = {**(kw.get("added_cond_kwargs") or {}), **added}
            if "encoder_hidden_states" not in kw:
                raise TypeError("UNet2DConditionModel needs encoder_hidden_states: a [B, seq, "
                                "dim] tensor in cond (per sample) or a fixed keyword (shared)")
        xm = x.to(dtype)
        if self.kind == "FluxTransformer2DModel":
            return self._flux(xm, timestep, kw).to(x.dtype)
        if self.kind in TRANSFORMERS:  # SD3
            out = self.model(hidden_states=xm, timestep=timestep, return_dict=False, **kw)
        else:
            out = self.model(xm, timestep, return_dict=False, **kw)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        return out.to(x.dtype)

    def _flux(self, x: Tensor, timestep: Tensor, kw: dict) -> Tensor:
        """Flux takes 2x2-packed latents [B, HW/4, 4C] with img_ids [HW/4, 3]: a 4-D state
        [B, C, H, W] is packed here (img_ids built from H, W unless given) and the output
        unpacked; a 3-D state is taken as already packed and needs img_ids."""
        B = x.shape[0]
        for key in ("encoder_hidden_states", "pooled_projections"):
            if key not in kw:
                raise TypeError(f"FluxTransformer2DModel needs {key} (in cond or fixed)")
        if "txt_ids" not in kw:
            kw["txt_ids"] = torch.zeros(kw["encoder_hidden_states"].shape[1], 3,
                                        device=x.device, dtype=x.dtype)
        g = kw.get("guidance")
        if g is not None and not self.model.config.guidance_embeds:
            raise TypeError("this FluxTransformer2DModel has guidance_embeds=False (no guidance "
                            "embedding): drop guidance")
        if self.model.config.guidance_embeds:
            if g is None:
                raise TypeError("this FluxTransformer2DModel has guidance_embeds=True: pass "
                                "guidance (a number fixed, or a [B] tensor in cond)")
            kw["guidance"] = torch.as_tensor(g, dtype=torch.float32, device=x.device).expand(B)
        shape = x.shape
        if x.dim() == 4:
            _, C, H, W = shape
            if H % 2 or W % 2:
                raise ValueError(f"Flux latents need even height and width, got {tuple(shape)}")
            x = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
            x = x.reshape(B, (H // 2) * (W // 2), C * 4)
            if "img_ids" not in kw:
                ids = torch.zeros(H // 2, W // 2, 3, device=x.device, dtype=x.dtype)
                ids[..., 1] += torch.arange(H // 2, device=x.device, dtype=x.dtype)[:, None]
                ids[..., 2] += torch.arange(W // 2, device=x.device, dtype=x.dtype)[None, :]
                kw["img_ids"] = ids.reshape(-1, 3)
        elif x.dim() != 3 or "img_ids" not in kw:
            raise ValueError(f"Flux states are [B, C, H, W] latents (packed here) or packed "
                             f"[B, seq, channels] with img_ids given; got {tuple(shape)}"
                             + ("" if x.dim() != 3 else " without img_ids"))
        out = self.model(hidden_states=x, timestep=timestep, return_dict=False, **kw)[0]
        if len(shape) == 4:
            _, C, H, W = shape
            out = out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5)
            out = out.reshape(shape)
        return out


def _pchip_slopes(y: Tensor) -> Tensor:
    """PCHIP (Fritsch-Carlson) slopes at unit-spaced knots, as scipy's PchipInterpolator: the
    harmonic mean of the neighbouring secants inside (0 where they differ in sign), the
    shape-preserving three-point formula at the ends. The cubic Hermite interpolant with these
    slopes is C1 and monotone wherever the data are."""
    d = y[1:] - y[:-1]
    m = torch.empty_like(y)
    a, b = d[:-1], d[1:]
    m[1:-1] = torch.where(a * b > 0, 2 * a * b / (a + b), torch.zeros_like(a))
    for k, d0, d1 in ((0, d[0], d[min(1, len(d) - 1)]), (-1, d[-1], d[max(-2, -len(d))])):
        e = (3 * d0 - d1) / 2
        if e * d0 <= 0:
            e = torch.zeros_like(e)
        elif d0 * d1 < 0 and e.abs() > 3 * d0.abs():
            e = 3 * d0
        m[k] = e
    return m


def _log_abar(abar: Tensor) -> tuple[Tensor, Tensor]:
    """log(alphas_cumprod) (float64) and its PCHIP slopes. Zero terminal SNR (abar = 0, or
    diffusers' 2**-24 stand-in where it breaks monotonicity) continues log(abar) linearly from
    the two entries before, so the velocity stays finite; abar is capped at 1 - 2**-24."""
    y = torch.log(abar.clamp(max=1.0 - ABAR_MIN))
    bad = ~(y[1:] < y[:-1]) | torch.isinf(y[1:])
    if bool(bad[:-1].any()) or (bool(bad[-1]) and len(y) < 3):
        raise ValueError("alphas_cumprod must decrease strictly with the timestep")
    if bool(bad[-1]):
        y[-1] = 2 * y[-2] - y[-3]
    return y, _pchip_slopes(y)


def _time_dtype(x: Tensor) -> torch.dtype:
    """Timesteps go to the model in float32 at least (fp16 cannot hold 999.5)."""
    return torch.promote_types(x.dtype, torch.float32)


def _expand(c: Tensor, x: Tensor) -> Tensor:
    """A coefficient of shape [] or [B] (float64) as a factor for x [B, *S] in x's dtype."""
    c = c.to(x.dtype) if c.is_floating_point() else c
    return c if c.dim() == 0 else c.reshape(-1, *([1] * (x.dim() - 1)))


class DiffusionVelocity(_DiffusersVelocity):
    """The probability-flow ODE of a variance-preserving diffusers model, in dflow_fast's time.

    x_tau = alpha x_data + sigma eps with alpha^2 = abar(tau), sigma^2 = 1 - abar(tau), T training
    timesteps; t = 1 - tau / (T - 1), so t = 0 is tau = T - 1 (alpha small, not 0) and t = 1 is
    tau = 0 (sigma = sqrt(1 - abar(0)), about 0.01 for the linear schedule, not 0). Between
    integer tau, log(abar) follows the monotone cubic (PCHIP) through the table, so the velocity
    is continuous in t (linear interpolation would make it jump at every integer tau and leave
    the midpoint solver first-order: docs/adapters.md); the model gets the fractional tau.
    """

    def __init__(self, model: nn.Module, scheduler: Any, **fixed_kwargs):
        pred = getattr(scheduler.config, "prediction_type", None)
        if pred not in PREDICTIONS:
            raise ValueError(f"DiffusionVelocity: prediction_type {pred!r} of "
                             f"{type(scheduler).__name__} is not supported; supported are "
                             f"{list(PREDICTIONS)}")
        abar = torch.as_tensor(scheduler.alphas_cumprod).detach().double().cpu().reshape(-1)
        if abar.numel() < 2 or not bool(torch.isfinite(abar).all()):
            raise ValueError(f"DiffusionVelocity: {type(scheduler).__name__}.alphas_cumprod must "
                             f"hold T >= 2 finite values")
        kind = _model_kind(model, UNETS, f"{type(scheduler).__name__} (a VP diffusion scheduler;"
                           f" transformers here are flow-matching models)")
        super().__init__(model, kind, fixed_kwargs)
        self.scheduler, self.prediction_type, self.T = scheduler, pred, abar.numel()
        self._table = {torch.device("cpu"): _log_abar(abar)}

    def schedule(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(tau, alpha, sigma, d log(abar) / dt) at ``t``, float64 with t's shape and device.
        log(abar) is the monotone cubic (PCHIP) through the integer timesteps; a t within its
        dtype's rounding of an integer tau is snapped to it, so grid points hit the table."""
        table = self._table.get(t.device)
        if table is None:
            table = self._table[t.device] = self._table[torch.device("cpu")].to(t.device)
        y, m = table
        T1 = self.T - 1
        tau = ((1.0 - t.detach().double()) * T1).clamp(0.0, T1)
        near = tau.round()
        tau = torch.where((tau - near).abs() <= 8 * torch.finfo(t.dtype).eps * T1, near, tau)
        i = tau.floor().clamp(max=T1 - 1).long()
        w = tau - i
        y0, y1, m0, m1 = y[i], y[i + 1], m[i], m[i + 1]
        la = (y0 + w * (m0 + w * (3 * (y1 - y0) - 2 * m0 - m1
                                  + w * (2 * (y0 - y1) + m0 + m1))))  # Hermite cubic
        dla = m0 + w * (2 * (3 * (y1 - y0) - 2 * m0 - m1) + 3 * w * (2 * (y0 - y1) + m0 + m1))
        return tau, torch.exp(0.5 * la), torch.sqrt(-torch.expm1(la)), -T1 * dla

    def forward(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        tau, alpha, sigma, dla = self.schedule(t)
        out = self._call(x, tau.to(_time_dtype(x)).expand(x.shape[0]), cond)
        half = 0.5 * dla / sigma ** 2  # lam'/2, lam = log(alpha^2 / sigma^2)
        # Each form below subtracts the two values that nearly cancel for a good model, exactly
        # in floating point: x - eps_hat at the noise end, x0_hat - x at the data end; the
        # small remainder is a coefficient known in float64 (1 - sigma = alpha^2 / (1 + sigma),
        # 1 - alpha = sigma^2 / (1 + alpha)). docs/adapters.md has the measurement.
        noisy = _expand(alpha < sigma, x)
        if self.prediction_type == "epsilon":  # sigma^2 x - sigma eps_hat
            inner = torch.where(noisy, (x - out) - _expand(alpha ** 2 / (1 + sigma), x) * x,
                                _expand(sigma, x) * x - out)
            return _expand(half * sigma, x) * inner
        if self.prediction_type == "sample":  # alpha (x0_hat - alpha x)
            inner = torch.where(noisy, out - _expand(alpha, x) * x,
                                (out - x) + _expand(sigma ** 2 / (1 + alpha), x) * x)
            return _expand(half * alpha, x) * inner
        return _expand(-half * alpha * sigma, x) * out

    def denoised(self, t: Tensor | float, x: Tensor, **cond) -> Tensor:
        """The model's prediction of the data, x0_hat, for state x at t. At t = 1 this is the
        extra step DDIM's default (set_alpha_to_one=True) takes from tau = 0 to abar = 1."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tau, alpha, sigma, _ = self.schedule(t)
        out = self._call(x, tau.to(_time_dtype(x)).expand(x.shape[0]), cond)
        if self.prediction_type == "epsilon":
            return (x - _expand(sigma, x) * out) / _expand(alpha, x)
        if self.prediction_type == "sample":
            return out
        return _expand(alpha, x) * x - _expand(sigma, x) * out

    def time_grid(self, steps: int) -> Tensor:
        """[steps + 1] float64 on the CPU, 0 -> 1: the scheduler's own timesteps mapped to
        t = 1 - tau / (T - 1). The interior points are the scheduler's timesteps strictly
        between 0 and T - 1 after ``set_timesteps(steps)``, the noisiest dropped when there are
        ``steps`` of them ("leading"/"trailing" grids whose first timestep is below T - 1: the
        solve starts from the noise end t = 0 all the same), or those of
        ``set_timesteps(steps + 1)`` when the grid holds both ends ("linspace"). Schedulers
        whose timesteps interleave stages (KDPM2, PNDM) take DDIMScheduler's grid for the
        same config (same spacing rule)."""
        steps = _check_steps(steps)
        T1 = self.T - 1

        def inner(cls: Any, n: int) -> list[float]:
            s = _fresh(self.scheduler, cls)
            try:
                s.set_timesteps(n)
            except ValueError:  # more steps than the scheduler allows
                return []
            return sorted({float(v) for v in s.timesteps if 0.0 < float(v) < T1}, reverse=True)

        taus: list[float] = []
        for cls in (None, _diffusers().DDIMScheduler):
            taus = inner(cls, steps)
            if len(taus) == steps - 2:  # both ends among the timesteps: one step more
                taus = inner(cls, steps + 1)
            if len(taus) in (steps - 1, steps):
                break
        else:
            raise ValueError(f"time_grid: cannot take {steps} steps from "
                             f"{type(self.scheduler).__name__}'s timesteps (at most T - 1 = "
                             f"{T1} steps between integer timesteps)")
        taus = taus[len(taus) - (steps - 1):] if steps > 1 else []
        return torch.tensor([0.0] + [1.0 - v / T1 for v in taus] + [1.0], dtype=torch.float64)


class FlowMatchVelocity(_DiffusersVelocity):
    """A flow-matching diffusers model (FlowMatchEulerDiscreteScheduler: SD3, Flux) as
    ``velocity(t, x, **cond)``: x = sigma noise + (1 - sigma) data, t = 1 - sigma,
    u = -model output. The model gets timestep = sigma * T (T = num_train_timesteps, 1000; SD3's
    convention, also used for UNets), except Flux's transformer, which takes sigma (it scales by
    1000 inside)."""

    def __init__(self, model: nn.Module, scheduler: Any, **fixed_kwargs):
        cfg = scheduler.config
        if getattr(cfg, "invert_sigmas", False):
            raise ValueError("FlowMatchVelocity: invert_sigmas=True is not supported (sigma = 1 "
                             "must be the noise end)")
        kind = _model_kind(model, UNETS + TRANSFORMERS, type(scheduler).__name__)
        super().__init__(model, kind, fixed_kwargs)
        self.scheduler, self.T = scheduler, int(cfg.num_train_timesteps)

    def forward(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        sigma = (1.0 - t.detach().double()).clamp(0.0, 1.0)
        scale = 1.0 if self.kind == "FluxTransformer2DModel" else float(self.T)
        timestep = (sigma * scale).to(_time_dtype(x)).expand(x.shape[0])
        return -self._call(x, timestep, cond)

    def time_grid(self, steps: int, *, mu: Optional[float] = None,
                  image_seq_len: Optional[int] = None, sigmas: Any = None) -> Tensor:
        """[steps + 1] float64 on the CPU, 0 -> 1: t = 1 - sigma for the scheduler's sigmas after
        ``set_timesteps(steps, sigmas=sigmas, mu=mu)`` (its static or dynamic shift included),
        the first point set to 0 (the noise end). Dynamic shifting needs ``mu``, or
        ``image_seq_len`` (the packed token count, (H/2)(W/2) for Flux latents) to compute it as
        the Flux/SD3 pipelines do. ``sigmas``: the custom sigmas a pipeline passes (Flux's
        pipeline uses ``numpy.linspace(1, 1 / steps, steps)``)."""
        steps = _check_steps(steps)
        cfg, kw = self.scheduler.config, {}
        if cfg.use_dynamic_shifting:
            if mu is None and image_seq_len is None:
                raise ValueError("time_grid: this scheduler shifts dynamically (Flux): pass mu, "
                                 "or image_seq_len to compute it from the scheduler's config")
            if mu is None:
                m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len
                                                         - cfg.base_image_seq_len)
                mu = image_seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len
            kw["mu"] = float(mu)
        elif mu is not None or image_seq_len is not None:
            raise ValueError("time_grid: mu / image_seq_len apply to dynamic shifting only; "
                             "this scheduler has a static shift")
        if sigmas is not None:
            kw["sigmas"] = list(sigmas)
        s = _fresh(self.scheduler)
        s.set_timesteps(steps, **kw)
        grid = 1.0 - s.sigmas.detach().double().cpu()
        grid[0] = 0.0
        if grid.numel() != steps + 1 or not bool((grid[1:] > grid[:-1]).all()):
            raise ValueError(f"time_grid: the scheduler's sigmas {s.sigmas.tolist()} do not give "
                             f"{steps} increasing steps")
        return grid
