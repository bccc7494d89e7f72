"""Helpers shared by tests/ops/test_parity.py and tests/ops/test_extension.py: the backends and the
device each one runs on, loading a backend (or a skip that says why it cannot run here), the table
of ops with the arguments the tests call them with, and random inputs.

Without a CUDA device the Triton kernels run on CPU tensors under the interpreter:
``TRITON_INTERPRET=1`` is set by the repository's root conftest.py, before any test module (or a
package such as diffusers, which imports triton) is imported; triton reads it when it is first
imported. Importing this module sets it too, for use outside pytest. A ``TRITON_INTERPRET``
already set is kept (``=0`` on a CPU machine makes the Triton cases skip).
"""
from __future__ import annotations

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from dflow_fast.ops import registry  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW = (torch.float16, torch.bfloat16)
#: every backend and the device its tensors live on ("triton": CUDA, else the CPU interpreter)
DEVICE = {"torch": "cpu", "cpp": "cpu", "cuda": "cuda", "triton": "cuda" if CUDA else "cpu"}
#: the backends with kernels of their own (registered torch.library ops)
COMPILED = ("cpp", "cuda", "triton")


class LbfgsCase(tuple):
    """(B, m, D, empty) of lbfgs_direction: batch, history slots, dimension, and how many of the
    oldest slots are empty (unused)."""

    def __new__(cls, B: int, m: int, D: int, empty: int = 0):
        return super().__new__(cls, (B, m, D, empty))


def name_of(v) -> str:
    """Readable test ids: float32, 3x341, B2-m5-D4097-empty3."""
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, LbfgsCase):
        return "B{}-m{}-D{}-empty{}".format(*v)
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return str(v)


def grid(argnames: str, *axes):
    """``pytest.mark.parametrize`` over the product of ``axes``, each a list of values or a
    function of the values before it (e.g. the cases of an op on a backend), with ids of the values
    joined by "-": ``axpy-cpp-float32-3x341``."""
    rows = [()]
    for axis in axes:
        rows = [row + (v,) for row in rows for v in (axis(*row) if callable(axis) else axis)]
    return pytest.mark.parametrize(
        argnames, [pytest.param(*row, id="-".join(map(name_of, row))) for row in rows])


def extension():
    """``dflow_fast.ops.ext``: the compiled extension ``dflow_fast._C`` (its ``_C``) with its fake
    kernels and autograd registered. Not importable: a skip where the installation is pure Python
    on purpose (``DFLOW_FAST_NO_EXT=1``), a failure otherwise."""
    try:
        from dflow_fast.ops import ext
    except ImportError as e:
        if os.environ.get("DFLOW_FAST_NO_EXT") == "1":
            pytest.skip(f"dflow_fast._C not built (DFLOW_FAST_NO_EXT=1, pure-Python install): {e}")
        pytest.fail(f"dflow_fast._C does not import ({e}). Build it with `pip install "
                    f"--no-build-isolation -e .`, or set DFLOW_FAST_NO_EXT=1 for a pure-Python "
                    f"install.", pytrace=False)
    return ext


def load(backend: str) -> registry.Ops:
    """``registry.load(backend)``, or a skip whose reason says why it cannot run here (never a
    silent pass). A CUDA machine whose extension lacks its CUDA kernels fails instead."""
    if backend in ("cpp", "cuda"):
        if backend == "cuda" and not CUDA:
            pytest.skip("no CUDA device here; run bench/gpu_check.sh on a GPU machine")
        ext = extension()
        if backend == "cuda" and not ext.has_cuda():
            pytest.fail("dflow_fast._C was built without CUDA kernels on a CUDA machine: rebuild "
                        "with DFLOW_FAST_CUDA=1 pip install --no-build-isolation -e .",
                        pytrace=False)
    if backend == "triton" and DEVICE["triton"] == "cpu" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    try:
        return registry.load(backend)
    except registry.BackendUnavailable as e:
        if backend == "triton":
            pytest.skip(f"triton is not usable here (pip install triton, or the package's test "
                        f"extra): {e}")
        raise


def randn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh N(0, 1) draws, made in float64 and rounded once to ``dtype``."""
    return torch.randn(*shape, dtype=torch.float64, device=device).to(dtype)


def lbfgs_inputs(case, dtype=torch.float64, device="cpu") -> list[torch.Tensor]:
    """(g, S, Y, rho, gamma) like the optimizer's histories for ``case = (B, m, D, empty)``:
    y ~ H s with H positive definite, so <y, s> > 0, and gamma from the newest pair; the oldest
    ``empty`` slots are unused (zero with rho = 0)."""
    B, m, D, empty = case
    f64 = dict(dtype=torch.float64, device=device)
    g = torch.randn(B, D, **f64)
    S = torch.randn(B, m, D, **f64)
    Y = S * (0.5 + torch.rand(B, 1, D, **f64)) + 0.05 * torch.randn(B, m, D, **f64)
    rho = 1.0 / (Y * S).sum(-1)
    gamma = ((S[:, -1] * Y[:, -1]).sum(-1) / (Y[:, -1] ** 2).sum(-1) if m
             else 0.5 + torch.rand(B, **f64))
    S[:, :empty] = 0
    Y[:, :empty] = 0
    rho[:, :empty] = 0
    return [t.to(dtype) for t in (g, S, Y, rho, gamma)]


@dataclass(frozen=True)
class Op:
    """A fused op as the tests call it: ``fn(*tensors, *scalars)``."""

    name: str
    #: "elementwise", "reduction" (chi_prior) or "lbfgs": the row of the tolerance table
    kind: str
    #: tensor inputs of the elementwise ops (each [B, *S], one shape and dtype)
    n_in: int
    #: outputs (a tuple when more than one)
    n_out: int
    #: the float arguments: steps and couplings as the solvers pass them (negative steps: the
    #: inverse sweep)
    scalars: tuple = ()

    @property
    def differentiable(self) -> bool:
        return self.kind != "lbfgs"

    def inputs(self, case, dtype, device="cpu") -> list[torch.Tensor]:
        """Fresh random tensor inputs: ``case`` is a shape, or an LbfgsCase for lbfgs_direction."""
        if self.kind == "lbfgs":
            return lbfgs_inputs(case, dtype, device)
        return [randn(*case, dtype=dtype, device=device) for _ in range(self.n_in)]


OPS = {op.name: op for op in [
    Op("axpy", "elementwise", 2, 1, (-0.37,)),
    Op("adjoint_euler", "elementwise", 2, 1),
    Op("adjoint_midpoint", "elementwise", 3, 1),
    Op("chi_prior", "reduction", 1, 3, (0.7,)),
    Op("lbfgs_direction", "lbfgs", 5, 1),
    Op("heun_predict", "elementwise", 3, 1, (-0.37,)),
    Op("heun_step", "elementwise", 4, 2, (0.37, -0.21)),
    Op("heun_adjoint", "elementwise", 3, 3, (0.37, 0.21)),
    Op("coupled_forward", "elementwise", 3, 1, (0.7, 0.37)),
    Op("coupled_inverse", "elementwise", 3, 1, (0.7, -0.37)),
    Op("coupled_adjoint", "elementwise", 3, 2, (0.9, 0.37)),
]}
assert set(OPS) == set(registry.OP_NAMES + registry.REVERSIBLE_OP_NAMES)


def as_tuple(t) -> tuple:
    return t if isinstance(t, tuple) else (t,)
