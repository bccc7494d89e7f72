"""What this installation was built with. Importing dflow_fast never compiles anything."""
from __future__ import annotations

import importlib.util

import torch


def build_info() -> dict:
    """Backends available in this installation and the versions they were built against.

    The compiled kernels (C++/CUDA in csrc/, Triton in kernels/) are not built yet: the pure-PyTorch
    backend is the only one, and the keys below say so explicitly.
    """
    return {
        "version": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": ["torch"],
        "cpp": False,
        "cuda": False,
        "cuda_archs": [],
        "triton": importlib.util.find_spec("triton") is not None,
    }


def _version() -> str:
    from . import __version__
    return __version__
