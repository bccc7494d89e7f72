"""flow_matching models (Meta's ``flow_matching`` library) as ``velocity(t, x, **cond)``.

flow_matching already uses our time convention (t = 0 noise, t = 1 data, ``x_t = alpha_t x_1 +
sigma_t x_0`` on an ``AffineProbPath``) and calls its models as ``model(x=x, t=t, **extras)``
with ``t`` a 0-dim tensor inside ``ODESolver.sample``. The adapter calls the model exactly that
way, so a model that samples with ``ODESolver`` runs unchanged under :func:`dflow_fast.solve` and
:func:`dflow_fast.optimize`, its ``extras`` passed through ``cond``. A model trained to predict
the noise (``"epsilon"``) or the data (``"x1"``) is converted to a velocity through the path's
scheduler, with flow_matching's own formulas (``AffineProbPath.epsilon_to_velocity`` and
``target_to_velocity``)::

    epsilon:  u = (d_alpha / alpha) x + ((d_sigma alpha - d_alpha sigma) / alpha) eps_hat
    x1:       u = (d_sigma / sigma) x + ((d_alpha sigma - d_sigma alpha) / sigma) x1_hat

Each conversion is undefined where it divides by zero: epsilon where alpha_t = 0 (t = 0 on the
CondOT, polynomial and cosine paths: x_t is pure noise there, so a noise prediction says nothing
about the data), x1 where sigma_t = 0 (t = 1). Evaluating there raises instead of returning
inf/NaN. See docs/adapters.md, section "flow_matching".

Imports flow_matching only when an adapter is built (``import dflow_fast`` never does).
Layer 3: imports nothing of dflow_fast (the velocity convention is all it needs).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["from_flow_matching", "FlowMatchingVelocity", "PREDICTIONS"]

#: prediction type -> what the model's output is
PREDICTIONS = {
    "velocity": "the velocity dx_t/dt itself (flow_matching's default training target)",
    "epsilon": "the noise x_0 in x_t = alpha_t x_1 + sigma_t x_0",
    "x1": "the data x_1 in x_t = alpha_t x_1 + sigma_t x_0",
}
_CACHE_SIZE = 4096  # distinct times whose conversion coefficients are kept


def from_flow_matching(model: Callable[..., Tensor], path: Any = None,
                       prediction: str = "velocity") -> "FlowMatchingVelocity":
    """A flow_matching model as a dflow_fast velocity ``velocity(t, x, **cond) -> [B, *S]``.

    Args:
        model: a flow_matching ``ModelWrapper`` (any ``nn.Module`` or callable works), called as
            ``model(x=x, t=t, **extras)`` with ``x`` [B, *S] and ``t`` the 0-dim time tensor on
            x's device and dtype, exactly as ``flow_matching.solver.ODESolver.sample`` calls it;
            it returns [B, *S]. ``extras`` are the ``cond`` of :func:`dflow_fast.solve` /
            :func:`dflow_fast.optimize`: a tensor whose first dimension is B is per-sample and
            travels with its rows.
        path: the ``flow_matching.path.AffineProbPath`` the model was trained on (e.g.
            ``AffineProbPath(CondOTScheduler())`` or ``CondOTProbPath()``). Required for
            ``prediction="epsilon"`` or ``"x1"``; unused (but type-checked) for ``"velocity"``.
        prediction: what the model outputs: ``"velocity"`` (default), ``"epsilon"`` (the noise
            x_0) or ``"x1"`` (the data).

    Returns:
        a :class:`FlowMatchingVelocity`: ``velocity(t, x, **cond)`` with ``t`` 0-dim (as every
        dflow_fast solver passes it) or [B], ``x`` [B, *S], returning [B, *S] in x's dtype.
        The model's weights are found by gradient discovery (``solve(..., params=None)``).

    Raises (before any evaluation):
        ValueError: an unknown ``prediction``; ``"epsilon"``/``"x1"`` without an affine path.
        TypeError: ``model`` not callable; ``path`` not a flow_matching ``ProbPath``, or not an
            ``AffineProbPath`` where a conversion needs one.
    """
    return FlowMatchingVelocity(model, path, prediction)


class FlowMatchingVelocity:
    """``velocity(t, x, **cond)`` for a flow_matching model; build it with
    :func:`from_flow_matching`.

    A plain callable object rather than an ``nn.Module``: gradient discovery
    (docs/design.md section 2) then finds the model's parameters through its attributes whether
    the model is an ``nn.Module`` or a function closing over tensors.

    For ``"epsilon"``/``"x1"`` the conversion coefficients are formed in float64 from the path's
    scheduler, with flow_matching's ``AffineProbPath`` formulas, and rounded once to x's dtype
    (flow_matching forms them in x's dtype). A 0-dim ``t`` on the CPU is read on the host, its
    coefficients cached per time value and applied as two scalar multiply-adds. On an
    accelerator, or with per-sample times [B], they are computed as tensors on t's device: no host
    read of t, so a CUDA graph can capture the call. Their check for a singular point then reads
    one flag on the host per evaluation, except while a CUDA graph is being captured, where no
    host read is allowed: the capture's eager warm-up evaluates the same times first and has
    checked them.
    """

    def __init__(self, model: Callable[..., Tensor], path: Any = None,
                 prediction: str = "velocity"):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x=x, t=t, **extras) (a flow_matching "
                            f"ModelWrapper), got {type(model).__name__}")
        if not isinstance(prediction, str) or prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of "
                             f"{list(PREDICTIONS)} ("
                             + "; ".join(f"{k}: {v}" for k, v in PREDICTIONS.items()) + ")")
        _check_path(path, prediction)
        self.model = model
        self.path = path
        self.prediction = prediction
        self._coefficients: dict[float, tuple[float, float]] = {}

    def __repr__(self) -> str:
        path = "" if self.path is None else f", path={type(self.path).__name__}(" + \
            f"{type(getattr(self.path, 'scheduler', None)).__name__})"
        return (f"FlowMatchingVelocity(model={type(self.model).__name__}{path}, "
                f"prediction={self.prediction!r})")

    def __call__(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        """``t`` 0-dim or [B], ``x`` [B, *S] -> the velocity [B, *S]. A conversion that is
        undefined at ``t`` raises before the model runs."""
        if self.prediction == "velocity":
            return self.model(x=x, t=t, **cond)
        host = _host_time(t)
        a, b = self.coefficients(float(t)) if host else self._tensor_coefficients(t, x)
        out = self.model(x=x, t=t, **cond)
        if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor)
                   else type(out).__name__)
            raise ValueError(f"the model must return a tensor like x, {tuple(x.shape)} {x.dtype} "
                             f"(its {self.prediction} prediction), got {got}")
        if host:
            return out.mul(b).add_(x, alpha=a)  # a x + b out
        return a * x + b * out

    def coefficients(self, t: float) -> tuple[float, float]:
        """(a, b) with velocity = a x + b prediction at time ``t``, in float64.

        Raises ValueError where the conversion divides by zero or is not finite (epsilon where
        alpha_t = 0, x1 where sigma_t = 0)."""
        ab = self._coefficients.get(t)
        if ab is None:
            s = self.path.scheduler(torch.tensor(t, dtype=torch.float64))
            alpha, sigma = float(s.alpha_t), float(s.sigma_t)
            d_alpha, d_sigma = float(s.d_alpha_t), float(s.d_sigma_t)
            ab = _coefficients(self.prediction, t, alpha, sigma, d_alpha, d_sigma)
            if len(self._coefficients) >= _CACHE_SIZE:
                self._coefficients.clear()
            self._coefficients[t] = ab
        return ab

    def _tensor_coefficients(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Times t, 0-dim or per sample [B], on t's device: (a, b) as 0-dim or [B, 1, ...]
        tensors in x's dtype (formed in float64), flow_matching's formulas. Checked for a
        singular point with one host read, except while a CUDA graph captures (class doc)."""
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(f"t must be 0-dim or [B] = [{x.shape[0]}], got shape "
                             f"{tuple(t.shape)}")
        s = self.path.scheduler(t.to(torch.float64))
        if self.prediction == "epsilon":
            den, a = s.alpha_t, s.d_alpha_t / s.alpha_t
            b = (s.d_sigma_t * s.alpha_t - s.d_alpha_t * s.sigma_t) / s.alpha_t
        else:
            den, a = s.sigma_t, s.d_sigma_t / s.sigma_t
            b = (s.d_alpha_t * s.sigma_t - s.d_sigma_t * s.alpha_t) / s.sigma_t
        if not _capturing(t):
            bad = (den == 0) | ~torch.isfinite(a) | ~torch.isfinite(b)
            if bool(bad.any()):
                first = float(t.reshape(-1)[bad.reshape(-1)][0])
                _coefficients(self.prediction, first, *_scalars(self.path.scheduler, first))
                raise ValueError(f"prediction={self.prediction!r}: the path's scheduler gives a "
                                 f"non-finite conversion at t={first:g}")
        shape = (-1,) + (1,) * (x.dim() - 1) if t.dim() else ()
        return a.to(x.dtype).reshape(shape), b.to(x.dtype).reshape(shape)


def _host_time(t: Tensor) -> bool:
    """A 0-dim time on the CPU: read on the host at no cost (no device to wait for)."""
    return t.dim() == 0 and t.device.type == "cpu"


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of t's device."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _scalars(scheduler, t: float) -> tuple[float, float, float, float]:
    s = scheduler(torch.tensor(t, dtype=torch.float64))
    return float(s.alpha_t), float(s.sigma_t), float(s.d_alpha_t), float(s.d_sigma_t)


def _coefficients(prediction: str, t: float, alpha: float, sigma: float, d_alpha: float,
                  d_sigma: float) -> tuple[float, float]:
    if prediction == "epsilon":
        if alpha == 0.0:
            raise ValueError(
                f"prediction='epsilon' has no velocity at t={t:g}, where the path's alpha_t = 0: "
                f"x_t is pure noise there, so the noise prediction carries no information about "
                f"the data (the conversion divides by alpha_t). Start the time grid slightly "
                f"after that point, e.g. time_grid=torch.linspace(1e-3, 1, steps + 1), taking x0 "
                f"as the state there (docs/adapters.md, section flow_matching), or use a "
                f"velocity or x1 model")
        a, b = d_alpha / alpha, (d_sigma * alpha - d_alpha * sigma) / alpha
    else:
        if sigma == 0.0:
            raise ValueError(
                f"prediction='x1' has no velocity at t={t:g}, where the path's sigma_t = 0 (the "
                f"conversion divides by sigma_t). End the time grid before that point (a "
                f"backward solve or backward_blend starts there: start it at t < 1, e.g. "
                f"1 - 1e-3), or use a velocity or epsilon model")
        a, b = d_sigma / sigma, (d_alpha * sigma - d_sigma * alpha) / sigma
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(
            f"prediction={prediction!r}: the path's scheduler gives a non-finite conversion at "
            f"t={t:g} (alpha_t={alpha:g}, sigma_t={sigma:g}, d_alpha_t={d_alpha:g}, "
            f"d_sigma_t={d_sigma:g}); keep the time grid away from that point")
    return a, b


def _check_path(path: Any, prediction: str) -> None:
    """Refuse, before any work, a path the prediction type cannot be converted through."""
    if path is None:
        if prediction != "velocity":
            raise ValueError(
                f"prediction={prediction!r} needs the flow_matching AffineProbPath the model was "
                f"trained on to convert its output to a velocity, e.g. "
                f"path=AffineProbPath(CondOTScheduler()); got path=None")
        return
    try:
        from flow_matching.path import AffineProbPath, ProbPath  # optional dependency
    except ImportError as err:  # pragma: no cover - the extra is installed in the test env
        raise ImportError("from_flow_matching(..., path=...) needs flow_matching: pip install "
                          "'dflow_fast[flow_matching]' (or flow_matching)") from err
    if not isinstance(path, ProbPath):
        raise TypeError(f"path must be a flow_matching ProbPath (e.g. AffineProbPath(scheduler)) "
                        f"or None, got {type(path).__name__}")
    if prediction != "velocity" and not isinstance(path, AffineProbPath):
        raise TypeError(
            f"prediction={prediction!r} is converted through an affine path x_t = alpha_t x_1 + "
            f"sigma_t x_0 (flow_matching's AffineProbPath and its scheduler); "
            f"{type(path).__name__} is not affine")
