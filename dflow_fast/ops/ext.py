"""The compiled core: loads ``dflow_fast._C`` and completes its ops for PyTorch's tooling.

``dflow_fast._C`` registers the ops' schemas (``torch.ops.dflow_fast.*``) and their CPU and
(when built) CUDA kernels in C++: the five of the plain solvers and the optimizer, and the six
state updates of the reversible solvers (:data:`dflow_fast.ops.registry.REVERSIBLE_OP_NAMES`). This
module adds, per op, the fake (meta) kernel that ``torch.compile`` and ``torch.library.opcheck``
trace with, and the autograd formula. The C++ library names this module as the home of its fake
kernels (``m.set_python_module("dflow_fast.ops.ext")``): torch requires that, and says "import dflow_fast.ops.ext" if a fake
tensor reaches an op before this module is loaded.

Imported lazily by :mod:`dflow_fast.ops.registry` (backends "cpp" and "cuda"); an ImportError of the
extension propagates, and the registry turns it into a message that says how to build it.

Shapes: ``x, v, a, w*`` and every tensor of the reversible updates: ``[B, *S]``; ``x`` of
chi_prior and ``g``: ``[B, D]``; ``S, Y: [B, m, D]``; ``rho: [B, m]``; ``gamma: [B]``. Outputs are
new contiguous tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _C

_LOW = (torch.float16, torch.bfloat16)


def ops():
    """The op namespace ``torch.ops.dflow_fast`` (axpy, adjoint_euler, adjoint_midpoint,
    chi_prior, lbfgs_direction, heun_predict, heun_step, heun_adjoint, coupled_forward,
    coupled_inverse, coupled_adjoint); dispatches to the CPU or CUDA kernel by the inputs'
    device."""
    return torch.ops.dflow_fast


def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this build of the extension."""
    return bool(_C.has_cuda())


def build_info() -> dict:
    """What ``dflow_fast._C`` was built with (JSON-serializable)."""
    return {
        "cuda": has_cuda(),
        "cuda_archs": list(_C.cuda_archs()),
        "built_with_torch": _C.torch_version(),
        "compiler": _C.compiler_version(),
        "cxx_standard": int(_C.cxx_standard()),
        "openmp": bool(_C.has_openmp()),
        "nvcc": _C.nvcc_version() or None,
        "built_with_cuda": _C.cuda_version() or None,
        "extension": _C.__file__,
    }


# ---- fake (meta) kernels: output metadata only, with the C++ checks' shape rules -------------

def _check_like(op: str, ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, t in others.items():
        torch._check(t.shape == ref.shape and t.dtype == ref.dtype and t.device == ref.device,
                     lambda: f"dflow_fast::{op}: {name} must have the shape, dtype and device of "
                             f"{ref_name}; {ref_name} is {tuple(ref.shape)} {ref.dtype} on "
                             f"{ref.device}, {name} is {tuple(t.shape)} {t.dtype} on {t.device}")


def _check_finite(op: str, **scalars: float) -> None:
    for name, value in scalars.items():
        torch._check(math.isfinite(value),
                     lambda: f"dflow_fast::{op}: {name} must be finite, got {value}")


def _new_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)  # contiguous, like the kernels


@torch.library.register_fake("dflow_fast::axpy")
def _axpy_fake(x: Tensor, v: Tensor, h: float) -> Tensor:
    _check_like("axpy", "x", x, v=v)
    _check_finite("axpy", h=h)
    return _new_like(x)


@torch.library.register_fake("dflow_fast::adjoint_euler")
def _adjoint_euler_fake(a: Tensor, w: Tensor) -> Tensor:
    _check_like("adjoint_euler", "a", a, w=w)
    return _new_like(a)


@torch.library.register_fake("dflow_fast::adjoint_midpoint")
def _adjoint_midpoint_fake(a: Tensor, w2: Tensor, w1: Tensor) -> Tensor:
    _check_like("adjoint_midpoint", "a", a, w2=w2, w1=w1)
    return _new_like(a)


@torch.library.register_fake("dflow_fast::chi_prior")
def _chi_prior_fake(x: Tensor, weight: float) -> tuple[Tensor, Tensor, Tensor]:
    torch._check(x.dim() == 2, lambda: f"dflow_fast::chi_prior: x must be 2-D [B, D], got "
                                       f"{tuple(x.shape)}")
    _check_finite("chi_prior", weight=weight)
    stat = torch.float32 if x.dtype in _LOW else x.dtype
    b = x.shape[0]
    return (x.new_empty(b, dtype=stat), x.new_empty(b, dtype=stat), _new_like(x))


@torch.library.register_fake("dflow_fast::lbfgs_direction")
def _lbfgs_direction_fake(g: Tensor, S: Tensor, Y: Tensor, rho: Tensor, gamma: Tensor) -> Tensor:
    torch._check(g.dim() == 2 and S.dim() == 3 and S.shape == Y.shape
                 and S.shape[0] == g.shape[0] and S.shape[2] == g.shape[1]
                 and rho.shape == S.shape[:2] and gamma.shape == g.shape[:1],
                 lambda: f"dflow_fast::lbfgs_direction: expected g [B, D], S and Y [B, m, D], "
                         f"rho [B, m], gamma [B]; got g {tuple(g.shape)}, S {tuple(S.shape)}, "
                         f"Y {tuple(Y.shape)}, rho {tuple(rho.shape)}, gamma {tuple(gamma.shape)}")
    return _new_like(g)


@torch.library.register_fake("dflow_fast::heun_predict")
def _heun_predict_fake(y: Tensor, yhat: Tensor, f: Tensor, h: float) -> Tensor:
    _check_like("heun_predict", "y", y, yhat=yhat, f=f)
    _check_finite("heun_predict", h=h)
    return _new_like(y)


@torch.library.register_fake("dflow_fast::heun_step")
def _heun_step_fake(y: Tensor, yhat: Tensor, f: Tensor, fnext: Tensor, h: float,
                    hnext: float) -> tuple[Tensor, Tensor]:
    _check_like("heun_step", "y", y, yhat=yhat, f=f, fnext=fnext)
    _check_finite("heun_step", h=h, hnext=hnext)
    return _new_like(y), _new_like(y)


@torch.library.register_fake("dflow_fast::heun_adjoint")
def _heun_adjoint_fake(a_y: Tensor, a_yhat: Tensor, w: Tensor, h: float,
                       hnext: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_like("heun_adjoint", "a_y", a_y, a_yhat=a_yhat, w=w)
    _check_finite("heun_adjoint", h=h, hnext=hnext)
    return _new_like(a_y), _new_like(a_y), _new_like(a_y)


@torch.library.register_fake("dflow_fast::coupled_forward")
def _coupled_forward_fake(y: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    _check_like("coupled_forward", "y", y, z=z, v=v)
    _check_finite("coupled_forward", lam=lam, h=h)
    return _new_like(y)


@torch.library.register_fake("dflow_fast::coupled_inverse")
def _coupled_inverse_fake(y1: Tensor, z: Tensor, v: Tensor, lam: float, h: float) -> Tensor:
    _check_like("coupled_inverse", "y1", y1, z=z, v=v)
    _check_finite("coupled_inverse", lam=lam, h=h)
    torch._check(lam != 0, lambda: "dflow_fast::coupled_inverse: lam must be nonzero (the "
                                   "inverse divides by it), got 0")
    return _new_like(y1)


@torch.library.register_fake("dflow_fast::coupled_adjoint")
def _coupled_adjoint_fake(a_z: Tensor, b: Tensor, w: Tensor, lam: float,
                          h: float) -> tuple[Tensor, Tensor]:
    _check_like("coupled_adjoint", "a_z", a_z, b=b, w=w)
    _check_finite("coupled_adjoint", lam=lam, h=h)
    return _new_like(a_z), _new_like(a_z)


# ---- autograd: the formulas shared with the Triton backend ------------------------------------
from . import autograd as _ag  # noqa: E402

torch.library.register_autograd("dflow_fast::axpy", _ag.axpy_backward,
                                setup_context=_ag.axpy_setup)
torch.library.register_autograd("dflow_fast::adjoint_euler", _ag.adjoint_euler_backward)
torch.library.register_autograd("dflow_fast::adjoint_midpoint", _ag.adjoint_midpoint_backward)
torch.library.register_autograd("dflow_fast::chi_prior", _ag.chi_prior_backward,
                                setup_context=_ag.chi_prior_setup)
torch.library.register_autograd("dflow_fast::lbfgs_direction", _ag.lbfgs_direction_backward)
for _name in ("heun_predict", "heun_step", "heun_adjoint", "coupled_forward", "coupled_inverse",
              "coupled_adjoint"):
    torch.library.register_autograd(f"dflow_fast::{_name}", getattr(_ag, f"{_name}_backward"),
                                    setup_context=_ag.scalars_setup)
