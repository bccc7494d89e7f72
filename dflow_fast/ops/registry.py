"""The backend registry: which implementation of the fused ops a solve or an optimization runs
with (the backend contract: docs/design.md section 4).

Backends:
    ``"torch"``  the PyTorch twins in :mod:`dflow_fast.ops.twins` (always available);
    ``"cpp"``    C++ CPU kernels of the compiled extension ``dflow_fast._C`` (``pip install .``);
    ``"cuda"``   CUDA kernels of the same extension (built when nvcc and a CUDA torch are present);
    ``"triton"`` Triton kernels in :mod:`dflow_fast.kernels` (CUDA tensors; CPU tensors only under
                 ``TRITON_INTERPRET=1``, which is how CI tests them).

``backend="auto"`` (the default, or the environment variable ``DFLOW_FAST_BACKEND``) takes the
first of :data:`AUTO_ORDER` that loads for the device (the compiled kernels first; where they win
and where they do not: bench/results/kernels_*.md) and falls back quietly, with a log line. A
backend asked for by name that cannot load raises an error that says how to get it. Loading is
lazy: importing dflow_fast never imports triton or the extension.

The reversible solvers' ops (:data:`REVERSIBLE_OP_NAMES`) are looked up by name like the others,
but are optional: a backend that does not define one of them runs the PyTorch twin from
:mod:`dflow_fast.ops.twins` for it, explicitly and with a debug log line, and lists it in
``Ops.fallbacks``. Today "cpp", "cuda" and "triton" define all six (``fallbacks == ()``); the
fallback keeps a backend built from older sources, or a new one, usable.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import twins

log = logging.getLogger("dflow_fast")

BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "DFLOW_FAST_BACKEND"
#: preference order of "auto", per device type (compiled kernels first)
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
OP_NAMES = ("axpy", "adjoint_euler", "adjoint_midpoint", "chi_prior", "lbfgs_direction")
#: state updates of the reversible solvers; a backend without a kernel for one uses the torch twin
REVERSIBLE_OP_NAMES = ("heun_predict", "heun_step", "heun_adjoint", "coupled_forward",
                       "coupled_inverse", "coupled_adjoint")


@dataclass(frozen=True)
class Ops:
    """One backend's implementations; each has the signature of its twin in ``ops.twins``."""

    name: str
    axpy: Callable
    adjoint_euler: Callable
    adjoint_midpoint: Callable
    chi_prior: Callable
    lbfgs_direction: Callable
    heun_predict: Callable = twins.heun_predict
    heun_step: Callable = twins.heun_step
    heun_adjoint: Callable = twins.heun_adjoint
    coupled_forward: Callable = twins.coupled_forward
    coupled_inverse: Callable = twins.coupled_inverse
    coupled_adjoint: Callable = twins.coupled_adjoint
    #: names of the ops this backend runs with the torch twin because it has no kernel for them
    fallbacks: tuple = ()


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says how to get it."""


def _from_namespace(name: str, ns) -> Ops:
    core = {op: getattr(ns, op) for op in OP_NAMES}  # required: a backend without them is broken
    extra, fallbacks = {}, []
    for op in REVERSIBLE_OP_NAMES:
        try:
            extra[op] = getattr(ns, op)
        except AttributeError:  # torch.ops namespaces raise it for unregistered ops
            extra[op] = getattr(twins, op)
            fallbacks.append(op)
    if fallbacks and name != "torch":
        log.debug("dflow_fast: backend %r has no kernels for %s; using the torch twins", name,
                  ", ".join(fallbacks))
    return Ops(name, **core, **extra, fallbacks=tuple(fallbacks) if name != "torch" else ())


@functools.lru_cache(maxsize=None)
def load(name: str) -> Ops:
    """The backend's ops, or BackendUnavailable explaining how to get them."""
    if name == "torch":
        return _from_namespace("torch", twins)
    if name in ("cpp", "cuda"):
        try:
            from . import ext  # loads dflow_fast._C and registers fake kernels and autograd
        except ImportError as e:
            raise BackendUnavailable(
                f"backend {name!r} needs the compiled extension dflow_fast._C, which is not "
                f"built in this installation ({e}). Reinstall from a source checkout with "
                f"`pip install --no-build-isolation .` (a C++ compiler is needed; for 'cuda' also "
                f"nvcc and a CUDA build of torch), or use backend='torch'.") from e
        if name == "cuda" and not ext.has_cuda():
            raise BackendUnavailable(
                "backend 'cuda': dflow_fast._C was built without CUDA kernels. Rebuild with nvcc "
                "and a CUDA build of torch (DFLOW_FAST_CUDA=1 forces it), or use backend='triton' "
                "or 'torch'.")
        return _from_namespace(name, ext.ops())
    if name == "triton":
        try:
            from .. import kernels
            kernels.check_available()
        except ImportError as e:
            raise BackendUnavailable(f"backend 'triton' is unavailable: {e}") from e
        return _from_namespace("triton", kernels)
    raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")


def resolve(backend: str | None, device: torch.device) -> Ops:
    """The ops to use for tensors on ``device``: an explicit name must work, "auto" falls back."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
    dev = device.type
    if name == "auto":
        for cand in AUTO_ORDER.get(dev, ("torch",)):
            try:
                ops = load(cand)
                _check_device(cand, dev)
            except (BackendUnavailable, ValueError) as e:
                log.info("dflow_fast: backend %r unavailable on %s, falling back: %s", cand, dev, e)
                continue
            log.debug("dflow_fast: backend 'auto' chose %r for %s", cand, dev)
            return ops
        return load("torch")
    ops = load(name)
    _check_device(name, dev)
    return ops


def _check_device(name: str, dev: str) -> None:
    if name == "cpp" and dev != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got {dev}; use 'cuda' or 'triton'")
    if name == "cuda" and dev != "cuda":
        raise ValueError(f"backend 'cuda' runs on CUDA tensors, got {dev}; use 'cpp' or 'torch'")
    if name == "triton" and dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' runs on CUDA tensors; on the CPU only under "
                         "TRITON_INTERPRET=1 (the interpreter, for testing)")


def available() -> list[str]:
    """Backend names that load in this installation (device permitting)."""
    out = []
    for name in BACKENDS:
        try:
            load(name)
            out.append(name)
        except (BackendUnavailable, ValueError):
            pass
    return out
