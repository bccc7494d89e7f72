"""Triton kernels of dflow_fast's fused ops (installed as ``dflow_fast.kernels``).

The ``"triton"`` backend of :mod:`dflow_fast.ops.registry`. Each function has the signature and
semantics of its PyTorch twin in :mod:`dflow_fast.ops.twins` and calls an operator registered
once with ``torch.library.triton_op`` (namespace ``dflow_fast_triton``), so it works with
autograd, ``torch.compile`` and ``torch.export``:

    axpy(x, v, h)                          x + h v                     x, v: [B, *S]
    adjoint_euler(a, w)                    a + w                       a, w: [B, *S]
    adjoint_midpoint(a, w2, w1)            a + w2 + w1 (one pass)      a, w2, w1: [B, *S]
    chi_prior(x, weight)                   (sq [B], value [B], grad [B, D])    x: [B, D]
    lbfgs_direction(g, S, Y, rho, gamma)   d [B, D]   g: [B, D], S, Y: [B, m, D], rho: [B, m],
                                                      gamma: [B]

and the reversible solvers' state updates, every tensor ``[B, *S]`` (formulas in
:mod:`dflow_fast.ops.twins`):

    heun_predict(y, yhat, f, h)                    2 y - yhat + h f
    heun_step(y, yhat, f, fnext, h, hnext)         (y', 2 y' - yhat + hnext fnext),
                                                   y' = y + (h/2)(f + fnext)
    heun_adjoint(a_y, a_yhat, w, h, hnext)         (a_y + 2c, -c, (h/2) a_y + h c
                                                    + (hnext/2)(a_y + 2c)),  c = a_yhat + w
    coupled_forward(y, z, v, lam, h)               lam y + (1 - lam) z + h v
    coupled_inverse(y1, z, v, lam, h)              (y1 - (1 - lam) z - h v) / lam
    coupled_adjoint(a_z, b, w, lam, h)             (lam b, a_z + (1 - lam) b + h w)

fp16/bf16 inputs are computed in fp32. Tensors must be on a CUDA device, or on the CPU under the
Triton interpreter (``TRITON_INTERPRET=1`` set before the first call; slow, for tests).

Importing this package neither imports triton nor compiles anything: the kernel modules load on
the first call, and triton compiles each kernel variant on its first launch.
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

__all__ = ["check_available", "axpy", "adjoint_euler", "adjoint_midpoint", "chi_prior",
           "lbfgs_direction", "heun_predict", "heun_step", "heun_adjoint", "coupled_forward",
           "coupled_inverse", "coupled_adjoint"]

_MIN_TRITON = (3, 0)
_MIN_TORCH = (2, 6)  # torch.library.triton_op and wrap_triton


def _version(s: str) -> tuple:
    parts = []
    for p in s.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_available() -> None:
    """Raise ImportError saying how to fix it unless triton and a recent enough torch are here.

    Cheap: imports triton (no compilation, no device query).
    """
    try:
        import triton
    except ImportError as e:
        raise ImportError("dflow_fast's Triton kernels need the triton package: "
                          "`pip install triton` (or `pip install dflow_fast[test]`); "
                          "on the CPU they run only under TRITON_INTERPRET=1") from e
    import torch
    if _version(triton.__version__) < _MIN_TRITON:
        raise ImportError(f"dflow_fast's Triton kernels need triton >= 3.0, found "
                          f"{triton.__version__}: `pip install -U triton`")
    if _version(torch.__version__) < _MIN_TORCH or not hasattr(torch.library, "triton_op"):
        raise ImportError(f"dflow_fast's Triton kernels need torch >= 2.6 "
                          f"(torch.library.triton_op), found {torch.__version__}")


def axpy(x: Tensor, v: Tensor, h: float) -> Tensor:
    """``x + h * v`` for ``x, v: [B, *S]``: the Euler update and both midpoint stages."""
    from .elementwise import axpy as impl
    return impl(x, v, h)


def adjoint_euler(a: Tensor, w: Tensor) -> Tensor:
    """Euler adjoint accumulation ``a_prev = a + w`` for ``a, w: [B, *S]``."""
    from .elementwise import adjoint_euler as impl
    return impl(a, w)


def adjoint_midpoint(a: Tensor, w2: Tensor, w1: Tensor) -> Tensor:
    """Midpoint adjoint accumulation ``a_prev = a + w2 + w1`` in one pass, all ``[B, *S]``."""
    from .elementwise import adjoint_midpoint as impl
    return impl(a, w2, w1)


def chi_prior(x: Tensor, weight: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sq [B], value [B], grad [B, D])`` of the χ_d prior for ``x: [B, D]``; see
    :func:`dflow_fast.ops.twins.chi_prior`. sq and value are fp32 for fp16/bf16 inputs."""
    from .reductions import chi_prior as impl
    return impl(x, weight)


def lbfgs_direction(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    """L-BFGS search directions ``d [B, D] = -H g`` (two-loop recursion) for ``g: [B, D]``,
    ``S, Y: [B, m, D]``, ``rho: [B, m]``, ``gamma: [B]``; see
    :func:`dflow_fast.ops.twins.lbfgs_direction`."""
    from .lbfgs import lbfgs_direction as impl
    return impl(g, S, Y, rho, gamma)


# ---- reversible solvers' state updates (kernels in .reversible) ------------------------------

def heun_predict(y: Tensor, yhat: Tensor, f: Tensor, h: float) -> Tensor:
    """Reversible Heun's prediction ``2 y - yhat + h f``, all ``[B, *S]``."""
    from .reversible import heun_predict as impl
    return impl(y, yhat, f, h)


def heun_step(y: Tensor, yhat: Tensor, f: Tensor, fnext: Tensor, h: float,
              hnext: float) -> Tuple[Tensor, Tensor]:
    """``(y' = y + (h/2)(f + fnext), 2 y' - yhat + hnext fnext)`` in one pass, all ``[B, *S]``;
    see :func:`dflow_fast.ops.twins.heun_step`."""
    from .reversible import heun_step as impl
    return impl(y, yhat, f, fnext, h, hnext)


def heun_adjoint(a_y: Tensor, a_yhat: Tensor, w: Tensor, h: float,
                 hnext: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Reversible Heun's adjoint through one step, all ``[B, *S]``; see
    :func:`dflow_fast.ops.twins.heun_adjoint`."""
    from .reversible import heun_adjoint as impl
    return impl(a_y, a_yhat, w, h, hnext)


def coupled_forward(y: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Coupled reversible RK's update ``lam y + (1 - lam) z + h v``, all ``[B, *S]``."""
    from .reversible import coupled_forward as impl
    return impl(y, z, v, lam, h)


def coupled_inverse(y1: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    """Inverse of :func:`coupled_forward`: ``(y1 - (1 - lam) z - h v) / lam``, all ``[B, *S]``."""
    from .reversible import coupled_inverse as impl
    return impl(y1, z, v, lam, h)


def coupled_adjoint(a_z: Tensor, b: Tensor, w: Tensor, lam: float,
                    h: float) -> Tuple[Tensor, Tensor]:
    """Coupled reversible RK's adjoint ``(lam b, a_z + (1 - lam) b + h w)``, all ``[B, *S]``; see
    :func:`dflow_fast.ops.twins.coupled_adjoint`."""
    from .reversible import coupled_adjoint as impl
    return impl(a_z, b, w, lam, h)
