"""The compiled extension dflow_fast._C itself, beyond its kernels' parity (test_parity.py): how it
is linked, its pybind functions, build_info, lazy loading, the fake (meta) kernels that
torch.compile and opcheck trace with, and what a user sees when the extension is missing.

Without the extension these tests skip where ``DFLOW_FAST_NO_EXT=1`` says the installation is pure
Python on purpose, and fail otherwise (tests.ops.common.extension).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

import dflow_fast
from tests.helpers import rel_err
from tests.ops import common
from tests.ops.common import DTYPES, LOW, OPS, LbfgsCase, as_tuple, extension, grid, lbfgs_inputs

ops = torch.ops.dflow_fast


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf (Linux)")
def test_extension_links_the_shared_cpp_runtime():
    """dflow_fast._C must take libstdc++ from the shared library the process already has: a static
    copy (a toolchain default seen on a GPU machine) crashed on the first TORCH_CHECK message."""
    out = subprocess.run(["readelf", "-d", extension()._C.__file__], capture_output=True,
                         text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def test_pybind_functions_match_torch_ops():
    _C = extension()._C
    for name, op in OPS.items():
        args = (*op.inputs(LbfgsCase(2, 3, 7) if op.kind == "lbfgs" else (4, 7), torch.float32),
                *op.scalars)
        for a, b in zip(as_tuple(getattr(_C, name)(*args)), as_tuple(getattr(ops, name)(*args))):
            assert torch.equal(a, b), name


def test_build_info_reports_cpp():
    ext = extension()
    info = dflow_fast.build_info()
    assert info["cpp"] and "cpp" in info["backends"]
    assert info["cuda"] == ("cuda" in info["backends"]) == ext.has_cuda()
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    if sys.platform == "linux":
        assert info["openmp"], "CPU kernels built without OpenMP run on one thread"
    if not ext.has_cuda():
        assert info["cuda_archs"] == []


def test_import_compiles_and_loads_nothing():
    code = ("import sys, dflow_fast; "
            "assert 'dflow_fast._C' not in sys.modules, 'extension loaded at import'; "
            "assert 'triton' not in sys.modules, 'triton imported at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- without the extension --------------------------------------------------------------------

def test_without_the_extension_backends_say_how_to_build_it():
    """An installation whose dflow_fast._C does not import: "cpp" and "cuda" asked for by name
    raise BackendUnavailable saying how to build it, "auto" falls back to the twins, build_info
    says why."""
    code = """if True:
        import sys
        sys.modules["dflow_fast._C"] = None  # import dflow_fast._C now raises ImportError
        import torch, dflow_fast
        from dflow_fast.ops import registry
        for name in ("cpp", "cuda"):
            try:
                registry.load(name)
            except registry.BackendUnavailable as e:
                assert "pip install --no-build-isolation ." in str(e), e
                assert "backend='torch'" in str(e), e
            else:
                raise AssertionError(name + " loaded without the extension")
        assert registry.resolve("auto", torch.device("cpu")).name == "torch"
        info = dflow_fast.build_info()
        assert not info["cpp"] and info["backends"][0] == "torch", info
        assert info["cpp_error"].startswith("dflow_fast._C not importable"), info
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_the_extension_tests_skip_or_fail(monkeypatch):
    """The tests' own guard: a missing extension skips them only where DFLOW_FAST_NO_EXT=1 says
    the installation is pure Python on purpose, and fails them otherwise; a missing GPU skips
    the "cuda" backend with that reason. Never a silent pass."""
    import dflow_fast.ops
    for parent, name in ((dflow_fast, "_C"), (dflow_fast.ops, "ext")):  # as if never built
        monkeypatch.setitem(sys.modules, f"{parent.__name__}.{name}", None)
        monkeypatch.delattr(parent, name, raising=False)
    monkeypatch.delenv("DFLOW_FAST_NO_EXT", raising=False)
    with pytest.raises(pytest.fail.Exception, match="pip install --no-build-isolation -e ."):
        extension()
    monkeypatch.setenv("DFLOW_FAST_NO_EXT", "1")
    with pytest.raises(pytest.skip.Exception, match=r"not built \(DFLOW_FAST_NO_EXT=1"):
        common.load("cpp")
    if not common.CUDA:
        with pytest.raises(pytest.skip.Exception, match="no CUDA device"):
            common.load("cuda")


# ---- fake (meta) kernels: what torch.compile and opcheck trace with ---------------------------

def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


@grid("name, dtype", list(OPS), DTYPES)
def test_fake_kernel_matches_the_kernel(name, dtype):
    """Outputs of the fake kernel (shape, dtype, strides) are those of the CPU kernel, also for a
    non-contiguous input; chi_prior's statistics are fp32 for fp16/bf16 input."""
    extension()
    op = OPS[name]
    inputs = op.inputs(LbfgsCase(3, 4, 9, 1) if op.kind == "lbfgs" else (5, 9), dtype)
    inputs[0] = inputs[0].t().contiguous().t()  # column-major
    real = as_tuple(getattr(ops, name)(*inputs, *op.scalars))
    fake = as_tuple(getattr(ops, name)(*map(meta_like, inputs), *op.scalars))
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == \
        [(t.shape, t.dtype, t.stride()) for t in real]
    if name == "chi_prior":
        stat = torch.float32 if dtype in LOW else dtype
        assert [t.dtype for t in real] == [stat, stat, dtype]


@pytest.mark.parametrize("call, message", [
    (lambda x: ops.axpy(x, x[:1], 0.1), r"dflow_fast::axpy: v must have the shape, dtype and "
                                        r"device of x"),
    (lambda x: ops.heun_step(x, x, x, x.double(), 0.1, 0.2), r"heun_step: fnext must have the "
                                                              r"shape, dtype and device of y"),
    (lambda x: ops.chi_prior(x[..., None], 0.1), r"chi_prior: x must be 2-D \[B, D\]"),
    (lambda x: ops.lbfgs_direction(x, x[:, None], x[:, None], x[:, :2], x[:, 0]),
     r"lbfgs_direction: expected g \[B, D\], S and Y \[B, m, D\], rho \[B, m\], gamma \[B\]"),
    (lambda x: ops.coupled_inverse(x, x, x, 0.0, 0.1), r"coupled_inverse: lam must be nonzero"),
    (lambda x: ops.coupled_forward(x, x, x, float("nan"), 0.1),
     r"coupled_forward: lam must be finite, got nan"),
    (lambda x: ops.heun_adjoint(x, x, x, 0.1, float("inf")),
     r"heun_adjoint: hnext must be finite, got inf"),
], ids=["axpy", "heun_step", "chi_prior", "lbfgs_direction", "coupled_inverse",
        "coupled_forward-nan", "heun_adjoint-inf"])
def test_fake_kernel_checks_inputs_like_the_kernel(call, message):
    extension()
    with pytest.raises(RuntimeError, match=message):
        call(torch.empty(4, 3, device="meta"))


def _pipeline(x, v, w, hist):
    """One Euler step, a midpoint adjoint accumulation, the prior and an L-BFGS direction."""
    y = ops.axpy(x, v, 0.25)
    a = ops.adjoint_midpoint(y, w, x)
    flat = a.flatten(1)
    sq, value, grad = ops.chi_prior(flat, 0.1)
    d = ops.lbfgs_direction(grad.detach(), *hist)
    return ops.adjoint_euler(flat, d) * value[:, None] + sq[:, None] + grad


def test_torch_compile_fullgraph():
    # aot_eager traces the ops through their fake kernels and autograd formulas into one graph,
    # which is what torch.compile needs of them; inductor adds code generation for the plain torch
    # ops around them (and about 30 s of compile time on a 2-core runner).
    extension()
    torch._dynamo.reset()
    x, v, w = (common.randn(3, 2, 4, dtype=torch.float64) for _ in range(3))
    hist = lbfgs_inputs(LbfgsCase(3, 4, 8, 1))[1:]  # S, Y, rho, gamma
    eager = _pipeline(x, v, w, hist)
    compiled = torch.compile(_pipeline, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x, v, w, hist), eager) <= 1e-14
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    _pipeline(xe, v, w, hist).sum().backward()
    compiled(xc, v, w, hist).sum().backward()
    assert rel_err(xc.grad, xe.grad) <= 1e-13
