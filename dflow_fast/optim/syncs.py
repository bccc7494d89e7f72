"""Counting host reads of tensor values: what would synchronise the host with an accelerator.

On CUDA every read of a device value into Python (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``, ``.cpu()``, ``.numpy()``, ``nonzero``, a boolean-mask index, ...) waits until the
device has finished its queue. ``torch.cuda.set_sync_debug_mode`` reports these, on CUDA only;
:class:`HostReads` counts the same reads on any device (the CPU included) by wrapping the tensor
methods and functions that make them, so a test can bound an algorithm's synchronisations without
a GPU. It sees only reads made from Python: a C++ op that reads a device value internally
(``torch.unique``, ``repeat_interleave`` with a tensor, ...) is not counted, and neither is a read
of a tensor made on the host from Python data (``torch.tensor([...])`` on the CPU), which never
waits for a device. Not thread-safe: it patches ``torch.Tensor`` while it is entered.
"""
from __future__ import annotations

import collections
import functools
import weakref

import torch
from torch import Tensor

#: Tensor methods that return host values (or a tensor whose size depends on device values)
METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__",
           "numpy", "cpu", "nonzero", "argwhere", "masked_select")
#: torch functions of the same kind
FUNCTIONS = ("nonzero", "argwhere", "masked_select")


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostReads:
    """Context manager counting host reads of tensor values (module docstring).

    ``count``: reads so far; ``by_kind``: a Counter by method name ("getitem[bool]" and
    "setitem[bool]" for boolean-mask indexing); ``marks``: what :meth:`mark` recorded.
    Use :meth:`mark` to record the count at points of interest (e.g. every batched evaluation)
    and :meth:`between` for the reads between consecutive marks.
    """

    def __init__(self):
        self.count = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.marks: list[int] = []
        # tensors made on the CPU from Python data, by id (a WeakSet would compare tensors by ==)
        self._host: dict[int, weakref.ref] = {}
        self._saved: dict = {}

    def mark(self) -> None:
        self.marks.append(self.count)

    def between(self) -> list[int]:
        """Reads between consecutive marks and after the last one (len(marks) numbers)."""
        ends = self.marks[1:] + [self.count]
        return [b - a for a, b in zip(self.marks, ends)]

    def _hit(self, kind: str, t) -> None:
        ref = self._host.get(id(t))
        if ref is not None and ref() is t:
            return
        self.count += 1
        self.by_kind[kind] += 1

    def _patch(self, owner, name: str, wrap) -> None:
        self._saved[(owner, name)] = owner.__dict__.get(name, _MISSING)
        setattr(owner, name, wrap(getattr(owner, name)))

    def __enter__(self) -> "HostReads":
        for name in METHODS:
            self._patch(Tensor, name, lambda f, name=name: self._method(f, name))
        for name in FUNCTIONS:
            self._patch(torch, name, lambda f, name=name: self._method(f, name))
        self._patch(Tensor, "__getitem__", lambda f: self._index(f, "getitem[bool]"))
        self._patch(Tensor, "__setitem__", lambda f: self._index(f, "setitem[bool]"))
        for name in ("tensor", "as_tensor"):
            self._patch(torch, name, self._maker)
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), old in self._saved.items():
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)
        self._saved.clear()

    def _method(self, f, name: str):
        @functools.wraps(f)
        def read(t, *args, **kwargs):
            self._hit(name, t)
            return f(t, *args, **kwargs)
        return read

    def _index(self, f, kind: str):
        @functools.wraps(f)
        def index(t, key, *rest):
            if _bool_index(key):
                self._hit(kind, None)
            return f(t, key, *rest)
        return index

    def _maker(self, f):
        @functools.wraps(f)
        def make(data, *args, **kwargs):
            out = f(data, *args, **kwargs)
            if not isinstance(data, Tensor) and out.device.type == "cpu":
                key = id(out)
                self._host[key] = weakref.ref(out, lambda _, key=key: self._host.pop(key, None))
            return out
        return make


_MISSING = object()
