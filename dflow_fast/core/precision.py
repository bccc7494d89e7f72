"""Mixed precision: the velocity under ``torch.autocast``, everything else in the state's dtype
(docs/design.md section 5, "Mixed precision").

Under ``autocast=torch.bfloat16`` or ``torch.float16`` only the velocity's own computation runs in
low precision (:class:`~dflow_fast.core.velocity.CheckedVelocity` enters the autocast region for
x's device type at every call, the backward sweeps' recomputations included, and casts the output
back to x's dtype). The states, the solvers' updates, the adjoint's cotangents, the χ_d prior and
the L-BFGS history stay float32.

float16 has 5 exponent bits: a cotangent below 2^-24 (6e-8) flushes to zero when the backward
through the network casts it down, and below 2^-14 it loses digits. The gradients' VJPs that
dflow_fast computes itself therefore scale the cotangent by a power of two that lifts its largest
entry into [1, 2) (never down: a cotangent already at or above 1 is left alone) and divide the
results by the same power, which is exact in binary floating point (:func:`scaled_grad`). The
scale is per sample when only states receive gradients (samples are independent, docs/design.md
section 1) and one for the batch when parameters do too (their gradient sums over samples).
bfloat16 has float32's exponent range and needs no scaling.

A velocity may run in low precision without autocast, its model's weights in float16 (a diffusers
pipeline loaded with ``torch_dtype=torch.float16``; the diffusers adapter casts the state to the
model's dtype and the output back). It says so with a ``compute_dtype`` attribute, and its
cotangents are scaled the same way (:func:`compute_dtype`): without the scaling a cost whose
gradient is small (a mean over a large latent) loses it in the cast down (measured on a float16
UNet2DModel, cost scaled by 1e-12: gradient error 0.30 against float32, 5.8e-4 with scaling).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

#: the dtypes ``autocast=`` accepts
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def resolve_autocast(autocast: torch.dtype | None, x0: Tensor) -> torch.dtype | None:
    """The dtype the velocity runs in, validated before any work. ``autocast`` None: the caller's
    own ``torch.autocast`` region for x0's device type if one is active (its dtype is then applied
    at every velocity call, the backward sweeps' recomputations included, which run outside the
    caller's region), else None. An explicit dtype needs a float32 state: autocast leaves float64
    untouched, and a low-precision state has nothing to gain."""
    if autocast is None:
        dev = x0.device.type
        if x0.dtype == torch.float32 and torch.is_autocast_enabled(dev):
            ambient = torch.get_autocast_dtype(dev)
            return ambient if ambient in AUTOCAST_DTYPES else None
        return None
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got "
                         f"{autocast!r}")
    if x0.dtype != torch.float32:
        raise ValueError(f"autocast={autocast} runs the velocity of a float32 state in lower "
                         f"precision; x0 is {x0.dtype} (use a float32 x0, or autocast=None)")
    return autocast


def compute_dtype(velocity, autocast: torch.dtype | None) -> torch.dtype | None:
    """The low precision the velocity computes in: the autocast dtype (already resolved), else
    the velocity's own ``compute_dtype`` attribute when it is float16 or bfloat16, else None.
    Only float16 changes the gradients (:func:`needs_scaling`)."""
    if autocast is not None:
        return autocast
    own = getattr(velocity, "compute_dtype", None)
    return own if own in AUTOCAST_DTYPES else None


def needs_scaling(low: torch.dtype | None) -> bool:
    """Whether cotangents are scaled before a VJP through a velocity running in ``low``."""
    return low == torch.float16


def cotangent_scale(cots: Sequence[Tensor], per_sample: bool) -> Tensor:
    """The power of two 2^max(0, 1 - e) with 2^(e-1) <= m < 2^e, m the largest |entry| of the
    cotangents: ``[B]`` per sample, or 0-dim for all of them; 1 where m is 0 or not finite
    (nothing to lift, or a NaN that must stay visible)."""
    if per_sample:
        m = torch.stack([c.detach().abs().flatten(1).amax(1) for c in cots]).amax(0)
    else:
        m = torch.stack([c.detach().abs().amax() for c in cots]).amax()
    m = m.float() if m.dtype in (torch.float16, torch.bfloat16) else m
    _, e = torch.frexp(m)  # m = mantissa * 2^e, mantissa in [0.5, 1)
    e = torch.where(torch.isfinite(m) & (m > 0), e, torch.ones_like(e))
    return torch.ldexp(torch.ones_like(m), (1 - e).clamp_min(0))


def _shaped(s: Tensor, like: Tensor) -> Tensor:
    """A per-sample scale [B] broadcast against ``like`` [B, *S]; a 0-dim one as is."""
    s = s.to(like.dtype)
    return s.reshape(-1, *([1] * (like.dim() - 1))) if s.dim() else s


def scaled_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], cots: Sequence[Tensor],
                low: torch.dtype | None, per_sample: bool) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, cots, allow_unused=True)``; when the velocity runs
    in float16, with the cotangents scaled up by :func:`cotangent_scale` and the gradients scaled
    back (module doc). ``per_sample``: every input is a state ``[B, *S]`` (no parameter)."""
    if not needs_scaling(low):
        return torch.autograd.grad(outputs, inputs, cots, allow_unused=True)
    s = cotangent_scale(cots, per_sample)
    grads = torch.autograd.grad(outputs, inputs, [c * _shaped(s, c) for c in cots],
                                allow_unused=True)
    return tuple(None if g is None else g / _shaped(s, g) for g in grads)
