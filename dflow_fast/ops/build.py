"""What this installation was built with. Importing dflow_fast never compiles anything, and this
module imports neither the extension nor triton until :func:`build_info` is called."""
from __future__ import annotations

import torch

from .._version import __version__


def build_info() -> dict:
    """Backends available in this installation and what they were built with (JSON-serializable).

    Keys:
        backends: loadable backend names, of "torch" (always), "cpp" (``dflow_fast._C`` imports),
            "cuda" (the extension was built with CUDA kernels), "triton" (the triton package
            imports and ``dflow_fast.kernels.check_available()`` passes).
        cpp, cuda, triton: the same as booleans; cpp_error / triton_error say why not, when not.
        cuda_archs: GPU architectures the CUDA kernels were compiled for.
        torch, torch_cuda: the running torch and its CUDA version; built_with_torch, compiler,
            cxx_standard, openmp, nvcc, built_with_cuda: what the extension was compiled with.
    Loading the extension or triton here is a run-time check (it never compiles anything).
    """
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": ["torch"],
        "cpp": False,
        "cuda": False,
        "cuda_archs": [],
        "triton": False,
        "built_with_torch": None,
        "compiler": None,
        "cxx_standard": None,
        "openmp": None,
        "nvcc": None,
        "built_with_cuda": None,
    }
    try:
        from . import ext
    except ImportError as e:
        info["cpp_error"] = f"dflow_fast._C not importable: {e}"
    else:
        built = ext.build_info()
        info.update({k: built[k] for k in ("cuda", "cuda_archs", "built_with_torch", "compiler",
                                         "cxx_standard", "openmp", "nvcc", "built_with_cuda")})
        info["cpp"] = True
        info["backends"].append("cpp")
        if built["cuda"]:
            info["backends"].append("cuda")
    try:
        import triton  # noqa: F401  (imported here, at call time only)

        from .. import kernels
        kernels.check_available()
    except Exception as e:  # ImportError above all; anything else also means "cannot run"
        info["triton_error"] = f"{type(e).__name__}: {e}"
    else:
        info["triton"] = True
        info["backends"].append("triton")
    return info
