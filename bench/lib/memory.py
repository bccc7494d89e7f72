"""Memory of one call: bytes autograd keeps saved for backward (:class:`SavedBytesMeter`,
:func:`saved_bytes_gradient`), the process's resident set size (:class:`RssPeak`), the CUDA
allocator's peak (:func:`cuda_peak`), and running out of memory as a result instead of an error
(:func:`guard_oom`)."""
from __future__ import annotations

import gc
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .methods import mse_cost, solve_by

MIB = 2 ** 20


class _Saved:
    """What the pack hook hands autograd instead of the tensor: releasing it (when autograd frees
    the saved variable) tells the meter that the storage is no longer held for backward."""

    __slots__ = ("tensor", "meter", "ptr")

    def __init__(self, tensor: Tensor, meter: "SavedBytesMeter", ptr: int):
        self.tensor, self.meter, self.ptr = tensor, meter, ptr

    def __del__(self):
        self.meter._release(self.ptr)


class SavedBytesMeter:
    """CPU memory of a gradient: bytes that autograd keeps saved for backward.

    Used as a context manager around forward *and* backward. Through
    ``torch.autograd.graph.saved_tensors_hooks`` every tensor saved for backward is seen (ops'
    saved inputs/outputs, and ``ctx.save_for_backward`` of custom autograd Functions such as the
    adjoint's stored states, and the graphs the adjoint's backward sweep rebuilds). Accounting:

    - by storage: a storage is counted once, with its full ``untyped_storage().nbytes()``, however
      many saved tensors (views, the same tensor saved by several ops) refer to it;
    - live: a storage stops counting when the last saved variable referring to it is freed, so
      ``peak`` is the high-water mark over the whole forward + backward, e.g. the adjoint's N
      states plus the one step it recomputes at a time;
    - ``exclude`` (the model's parameters) is not counted: weights are resident anyway and do not
      grow with steps or batch, so they are not memory spent per gradient.

    Not counted: transient tensors that are never saved (freed right after use), gradient
    buffers of the backward pass, and allocator overhead. It is a lower bound on the process's
    extra memory and the quantity that grows with steps; CUDA runs measure the allocator instead.

    Attributes: ``peak`` (bytes), ``live`` (bytes now), ``after_forward`` (bytes at
    :meth:`mark`), ``n_saved`` (pack-hook calls counted).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._refs: dict[int, list[int]] = {}  # storage data_ptr -> [saved refs, nbytes]
        self.live = self.peak = self.n_saved = 0
        self.after_forward: Optional[int] = None
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr in self.exclude:
            return t
        rec = self._refs.get(ptr)
        if rec is None:
            self._refs[ptr] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            rec[0] += 1
        self.n_saved += 1
        # Detached: a saved output holding itself (tensor -> grad_fn -> saved -> tensor) would be
        # a reference cycle that keeps graphs run with retain_graph=True (torchdiffeq's
        # odeint_adjoint) alive until the next gc; autograd gives an unpacked tensor its history.
        return _Saved(t.detach(), self, ptr)

    @staticmethod
    def _unpack(obj):
        return obj.tensor if isinstance(obj, _Saved) else obj

    def _release(self, ptr: int) -> None:
        rec = self._refs.get(ptr)
        if rec is None:
            return
        rec[0] -= 1
        if rec[0] == 0:
            del self._refs[ptr]
            self.live -= rec[1]

    def mark(self) -> None:
        """Record ``live`` now as ``after_forward`` (call between forward and backward)."""
        self.after_forward = self.live

    def __enter__(self) -> "SavedBytesMeter":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def saved_bytes_gradient(method: str, velocity, net: nn.Module, x0: Tensor, target: Tensor, *,
                         steps: int, solver: str) -> tuple[Tensor, SavedBytesMeter]:
    """:func:`one_gradient` under a :class:`SavedBytesMeter` that excludes ``net``'s parameters.
    Returns ``(gradient [B, *S], meter)``; ``meter.after_forward`` is taken before the backward."""
    meter = SavedBytesMeter(exclude=list(net.parameters()) + list(net.buffers()))
    with meter:
        x = x0.detach().requires_grad_(True)
        x1 = solve_by(method, velocity, x, steps=steps, solver=solver)
        loss = mse_cost(x1, target).sum()
        meter.mark()
        g, = torch.autograd.grad(loss, x)
        del x1, loss
    gc.collect()
    return g, meter


class RssPeak:
    """CPU memory of a call as the operating system sees it: the process's peak resident set size
    during the call minus its resident size before (Linux: ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs``, then ``VmRSS``/``VmHWM`` from ``/proc/self/status``).

    Unlike :class:`SavedBytesMeter` it needs no cooperation from autograd, so it also sees what
    ``torch.utils.checkpoint`` keeps (its own saved-tensor hooks hide it from the meter) and the
    transients (gradient buffers, convolution workspaces). Freed memory that malloc keeps instead
    of returning to the system would hide reuse, so every measurement starts with
    ``gc.collect()`` and glibc's ``malloc_trim(0)``; large tensors are mmap'ed and unmapped on
    free, so the peak tracks them. Measure after one warm-up call (first calls allocate caches).
    """

    _libc = None

    @staticmethod
    def available() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return RssPeak._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
        return None

    @classmethod
    def measure(cls, fn: Callable[[], Any]) -> tuple[Any, int]:
        """``(fn(), peak resident bytes during fn above the resident bytes before it)``."""
        gc.collect()
        if cls._libc is None:
            import ctypes
            try:
                cls._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                cls._libc = False
        if cls._libc:
            cls._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = cls._status("VmRSS")
        out = fn()
        return out, max(0, cls._status("VmHWM") - base)


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn`` once; returns ``(its result, peak bytes allocated above what was allocated
    before the call)``, i.e. the memory the call itself needed on top of weights and inputs."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(e, oom_type):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def guard_oom(fn: Callable[[], Any], device: torch.device | str | None = None):
    """``fn()``, or the string ``"oom"`` if it ran out of memory (other errors propagate).

    The exception is dropped before the cache is emptied: its traceback holds the frames, and so
    the tensors, of the failed call."""
    try:
        return fn()
    except Exception as e:
        if not is_oom(e):
            raise
    # Out of the except block: the exception and its frames are gone, their memory can be freed.
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return "oom"
