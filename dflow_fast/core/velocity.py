"""The velocity convention, ``velocity(t, x, **cond) -> [B, *S]`` (t = 0 noise, t = 1 data), and
the two wrappers every solve uses: :class:`ModelVelocity` for models called as
``model(x, t, **cond)``, and :class:`CheckedVelocity`, which binds the conditioning of the rows
being evaluated, checks each output against x and counts evaluations."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .cond import Cond, check_cond, select, unwrap

Velocity = Callable[..., Tensor]  # velocity(t, x, **cond) -> like x


class ModelVelocity(nn.Module):
    """Adapts a model called as ``model(x, t, **cond)`` with ``t`` of shape [B] to
    ``velocity(t, x, **cond)``.

    ``t`` arrives as a 0-dim tensor (or [B]); it is broadcast to [B] for the model.
    """

    def __init__(self, model: nn.Module | Callable[..., Tensor]):
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        return self.model(x, t.expand(x.shape[0]) if t.dim() == 0 else t, **cond)


class _Counts:
    """Evaluations shared by a velocity and its row views; ``measuring``: those of gradient="auto"'s
    memory-measuring step (counted in ``calls`` too), while ``in_measure`` is set."""

    __slots__ = ("calls", "rows", "measuring", "in_measure")

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self.measuring = 0
        self.in_measure = False


class CheckedVelocity:
    """Calls the user's velocity as ``velocity(t, x, **cond)``, checks its output against x, and
    counts evaluations.

    ``cond`` (validated against the batch size ``batch``) holds per-sample tensors for all B rows;
    :meth:`rows` gives the view that evaluates a subset of them. ``calls`` counts batched calls,
    ``rows_evaluated`` the samples evaluated (sum of batch sizes), over this velocity and all its
    views. ``autocast`` (a dtype, resolved by :func:`~dflow_fast.core.precision.resolve_autocast`):
    every call runs under ``torch.autocast`` for x's device type with it, and an output in that
    dtype is cast back to x's (core/precision.py). ``key``: the object gradient="auto" keys what
    it measures on (the user's velocity, before any torch.compile wrapper)."""

    def __init__(self, velocity: Velocity, cond: Optional[Cond] = None, batch: int | None = None,
                 autocast: torch.dtype | None = None, key: object = None):
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x, **cond), got "
                            f"{type(velocity).__name__}")
        if cond is not None and batch is None:
            raise ValueError("CheckedVelocity: cond needs the batch size it belongs to")
        self.velocity = velocity
        self.batch = batch
        self.autocast = autocast
        self.key = velocity if key is None else key
        self.cond = check_cond(cond, batch) if cond is not None else {}
        self._kwargs = unwrap(self.cond)
        self._counts = _Counts()

    @property
    def calls(self) -> int:
        return self._counts.calls

    @property
    def rows_evaluated(self) -> int:
        return self._counts.rows

    @property
    def measuring_calls(self) -> int:
        """Calls made by gradient="auto"'s memory-measuring step (:meth:`measuring`): part of
        ``calls``, but no solve's evaluations, so per-sample counts (optimize's nfe) leave them
        out and do not depend on whether a measurement was cached."""
        return self._counts.measuring

    @contextlib.contextmanager
    def measuring(self):
        """Calls inside count as measuring calls as well (see :attr:`measuring_calls`)."""
        previous, self._counts.in_measure = self._counts.in_measure, True
        try:
            yield
        finally:
            self._counts.in_measure = previous

    def rows(self, idx: Optional[Tensor]) -> "CheckedVelocity":
        """This velocity for the rows ``idx`` [n] of the batch (None: all of them): per-sample
        conditioning indexed, counters shared."""
        if idx is None or not self.cond:
            return self
        view = object.__new__(CheckedVelocity)
        view.velocity, view.batch, view._counts = self.velocity, self.batch, self._counts
        view.autocast, view.key = self.autocast, self.key
        view.cond = select(self.cond, self.batch, idx)
        view._kwargs = unwrap(view.cond)
        return view

    def signature(self) -> tuple:
        """What of ``cond`` can change the size of a step's graph per sample: each value's name
        and, for a tensor, its per-sample shape and dtype (gradient="auto" keys its measurement
        on it)."""
        return tuple((k, tuple(v.shape[1:]), v.dtype) if isinstance(v, Tensor) else
                     (k, type(v).__name__) for k, v in sorted(self._kwargs.items()))

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        if self.autocast is None:
            out = self.velocity(t, x, **self._kwargs)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast):
                out = self.velocity(t, x, **self._kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(f"velocity must return a tensor, got {type(out).__name__}")
        low = self.autocast is not None and out.dtype == self.autocast
        if out.shape != x.shape or (out.dtype != x.dtype and not low) or out.device != x.device:
            raise ValueError(
                f"velocity(t, x) must return a tensor like x: x is {tuple(x.shape)} {x.dtype} on "
                f"{x.device}, the velocity returned {tuple(out.shape)} {out.dtype} on {out.device}"
                + (f" (under autocast, {self.autocast} is accepted too)" if self.autocast else ""))
        self._counts.calls += 1
        self._counts.rows += x.shape[0]
        if self._counts.in_measure:
            self._counts.measuring += 1
        return out.to(x.dtype) if low else out
