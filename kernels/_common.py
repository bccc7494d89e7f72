"""Shared helpers of the Triton kernels: input checks, launching, scalar splitting.

Imported only by the kernel submodules, i.e. after triton is known to be importable.
"""
import math
import numbers
import struct
from typing import Tuple

import torch
from torch import Tensor

#: dtypes the kernels accept; fp16/bf16 are computed in fp32 and cast back
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_DTYPES = (torch.float16, torch.bfloat16)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under the interpreter (TRITON_INTERPRET=1 when it was defined)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton 3.x has it
        return False
    return isinstance(kernel, InterpretedFunction)


class _Interpreted:
    """Launches an interpreted kernel. The fake kernel of a ``triton_op`` is its own body, run on
    fake tensors where only shapes matter: the launch is skipped there. Graph capture
    (torch.compile's functionalization) cannot record an interpreted kernel: a clear error."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import FakeTensor
            from torch._subclasses.functional_tensor import FunctionalTensor
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if any(isinstance(a, FunctionalTensor) for a in tensors):
                raise RuntimeError("dflow_fast Triton kernels under TRITON_INTERPRET=1 cannot be "
                                   "traced by torch.compile/export; call them eagerly")
            if any(isinstance(a, FakeTensor) for a in tensors):
                return None
            return self.kernel[grid](*args, **kwargs)
        return launch


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: launches that torch.compile/export can trace.

    Named like torch's on purpose: ``triton_op`` finds an op's kernels by scanning its body for
    ``wrap_triton(<kernel>)`` calls (the kernels' source then keys torch's compile caches).
    Interpreted kernels (CPU tests) cannot be traced; some torch versions reject them in
    wrap_triton, newer ones pass them through. Either way they get a plain launcher that skips
    fake tensors, so the op's fake kernel works under the interpreter too.
    """
    if interpreted(kernel):
        return _Interpreted(kernel)
    return torch.library.wrap_triton(kernel)


def split_f64(value: float) -> Tuple[float, float, float]:
    """``value`` as three float32-exact parts whose float64 sum is ``value`` again.

    Triton passes Python floats to kernels as fp32 scalars; float64 kernels rebuild the exact
    double from the three parts (24 + 24 + 24 bits cover the 53-bit significand).
    """
    # Plain Python (no tensors): this runs inside the ops' bodies, also while they are traced.
    hi = _to_f32(value)
    mid = _to_f32(value - hi)
    lo = _to_f32(value - hi - mid)
    return hi, mid, lo


def _to_f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def check_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (Python float), got "
                        f"{type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > 3.4e38:
        raise ValueError(f"{name} must be finite and within float32 range, got {value}")
    return value


def check_tensor(name: str, t, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; the Triton kernels take "
                        f"float16, bfloat16, float32 or float64")


def check_device(t: Tensor, op: str, kernel) -> None:
    """CUDA tensors, or CPU tensors under the interpreter; a clear error instead of triton's."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreted(kernel)):
        return
    raise ValueError(f"{op}: the Triton kernels run on CUDA tensors, got device {t.device}; "
                     f"CPU tensors work only under TRITON_INTERPRET=1 set before the kernels are "
                     f"first used (the interpreter, for tests)")


def check_same(op: str, kernel, **tensors: Tensor) -> None:
    """All tensors: supported float dtype, one shape, one dtype, one device."""
    items = list(tensors.items())
    for name, t in items:
        check_tensor(name, t, op)
    n0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(
                f"{op}: {name} must match {n0} in shape, dtype and device; got {n0}: "
                f"{tuple(t0.shape)} {t0.dtype} {t0.device}, {name}: {tuple(t.shape)} {t.dtype} "
                f"{t.device}")
    check_device(t0, op, kernel)
