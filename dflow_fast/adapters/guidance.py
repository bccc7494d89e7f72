"""Classifier-free guidance (Ho & Salimans 2022) of a conditional velocity, in one batched call.

    v(t, x | c) = v(t, x | ∅) + scale · (v(t, x | c) − v(t, x | ∅))

Each evaluation stacks the n conditional rows and their n unconditional twins into one call of
2n rows (state ``cat([x, x])``, conditioning ``cat([cond, uncond])``) and mixes the two halves.
It is an ordinary ``velocity(t, x, **cond)``, so it runs under every solver and gradient scheme,
and under :func:`dflow_fast.optimize` its per-sample conditioning travels with the active rows.
See docs/adapters.md, section "guidance and latent models".

Layer 3: imports nothing of dflow_fast.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["classifier_free_guidance", "GuidedVelocity", "FromCond"]


class FromCond:
    """An unconditional value that travels in ``cond`` under its own key: ``uncond={"y":
    FromCond("y_null")}`` with ``cond={"y": y, "y_null": y_null}`` (both [B, ...]) gives every
    sample its own unconditional value, indexed with the active rows under
    :func:`dflow_fast.optimize` like any per-sample ``cond`` tensor. The key ``"y_null"`` is
    consumed by the guidance: the model never receives it."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"FromCond needs the cond key (a keyword-argument name) that holds "
                            f"the unconditional values, got {key!r}")
        self.key = key

    def __repr__(self) -> str:
        return f"FromCond({self.key!r})"


def classifier_free_guidance(velocity: Callable[..., Tensor], scale: float,
                             uncond: Mapping[str, Any]) -> "GuidedVelocity":
    """Classifier-free guidance of a conditional velocity, one call of 2n rows per evaluation.

    Args:
        velocity: ``velocity(t, x, **cond) -> [m, *S]`` for x [m, *S], conditional on the keys
            of ``uncond`` (e.g. a :func:`~dflow_fast.adapters.from_flow_matching` or
            :func:`~dflow_fast.adapters.from_diffusers` velocity). It is called once per
            evaluation with m = 2n rows: the n conditional rows first, then their n unconditional
            twins.
        scale: the guidance scale w (a finite real): ``v = v(∅) + w (v(c) − v(∅))``. ``1`` is the
            conditional velocity and ``0`` the unconditional one, exactly: those two make one
            call of n rows, since the other half has weight zero.
        uncond: maps each conditioning key to its unconditional value (a null label, the empty
            prompt's embedding). Per key, with n the rows being evaluated:

            - a tensor with leading size 1, e.g. ``torch.tensor([NULL])`` or an embedding
              [1, L, E]: one unconditional row for every sample (broadcast to n rows);
            - a tensor with leading size n: one unconditional row per sample. The guidance holds
              it, so it cannot follow :func:`dflow_fast.optimize`'s shrinking active set: use it
              with :func:`dflow_fast.solve` (n = B always);
            - :class:`FromCond` ``("other_key")``: per-sample unconditional values passed in
              ``cond["other_key"]`` [B, ...], indexed with the active rows like the rest of
              ``cond`` (the way to give per-sample unconditional values to ``optimize``).

            The conditional value ``cond[key]`` is per-sample [n, ...] or shared [1, ...] (then
            broadcast to n rows); its trailing shape and dtype must match the unconditional
            value's. Other ``cond`` entries go to both halves: a tensor with leading size n is
            repeated for the unconditional rows, anything else (a number, a leading-1 tensor) is
            passed unchanged.

    Returns:
        a :class:`GuidedVelocity`, ``guided(t, x, **cond) -> [n, *S]`` for x [n, *S]. Tensors in
        ``uncond`` that require grad (a learned null embedding) are found by gradient discovery
        like the velocity's weights.

    Raises:
        TypeError / ValueError at construction: a velocity that is not callable, a scale that is
        not a finite real, an empty or malformed ``uncond``. At the first evaluation, before the
        model is called: an ``uncond`` key (or FromCond key) missing from ``cond``, a conditional
        value that is not a tensor, mismatched shapes or dtypes, a held per-sample value of the
        wrong number of rows.
    """
    return GuidedVelocity(velocity, scale, uncond)


class GuidedVelocity:
    """``velocity(t, x, **cond)`` with classifier-free guidance; build it with
    :func:`classifier_free_guidance`. A plain callable object, so gradient discovery finds the
    wrapped velocity's parameters and any ``uncond`` tensor requiring grad."""

    def __init__(self, velocity: Callable[..., Tensor], scale: float, uncond: Mapping[str, Any]):
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x, **cond), got "
                            f"{type(velocity).__name__}")
        self.velocity = velocity
        self.scale = _check_scale(scale)
        self.uncond = _check_uncond(uncond)

    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """The guided velocity's own (dflow_fast.core.precision), if it declares one."""
        return getattr(self.velocity, "compute_dtype", None)

    def __repr__(self) -> str:
        return (f"GuidedVelocity(scale={self.scale:g}, uncond keys={sorted(self.uncond)}, "
                f"velocity={type(self.velocity).__name__})")

    def __call__(self, t: Tensor, x: Tensor, **cond) -> Tensor:
        """``t`` 0-dim (or [n]), ``x`` [n, *S], ``cond`` as described in
        :func:`classifier_free_guidance` -> the guided velocity [n, *S]."""
        n = x.shape[0]
        kwargs, null = self._split(cond)
        pairs = {key: _pair(key, kwargs[key], value, n) for key, value in null.items()}
        if self.scale == 1.0:  # exactly the conditional velocity: the unconditional half is unused
            return self.velocity(t, x, **kwargs)
        if self.scale == 0.0:  # exactly the unconditional velocity
            return self.velocity(t, x, **{**kwargs, **{k: p[n:] for k, p in pairs.items()}})
        both = {}
        for key, value in kwargs.items():
            if key in pairs:
                both[key] = pairs[key]
            elif isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
                both[key] = torch.cat([value, value])  # per-sample: the same for both halves
            else:
                both[key] = value
        t2 = t if t.dim() == 0 else torch.cat([t, t])
        out = self.velocity(t2, torch.cat([x, x]), **both)
        if not isinstance(out, Tensor) or out.shape != (2 * n, *x.shape[1:]):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"classifier_free_guidance: the velocity called on 2n = {2 * n} "
                             f"rows of shape {tuple(x.shape[1:])} returned {got}")
        v_c, v_u = out[:n], out[n:]
        return v_u + self.scale * (v_c - v_u)

    def _split(self, cond: dict) -> tuple[dict, dict]:
        """(the model's keyword arguments, key -> unconditional value), checking that every key
        is present; FromCond sources are taken out of the model's arguments."""
        missing = sorted(k for k in self.uncond if k not in cond)
        if missing:
            raise ValueError(
                f"classifier_free_guidance: uncond has key(s) {missing} that the velocity was not "
                f"given in cond (it got {sorted(cond)}); uncond maps cond's keys to their "
                f"unconditional values, so pass the conditional values as cond={{...}}")
        kwargs, null = dict(cond), {}
        for key, value in self.uncond.items():
            if isinstance(value, FromCond):
                if value.key not in cond:
                    raise ValueError(
                        f"classifier_free_guidance: uncond[{key!r}] = FromCond({value.key!r}) "
                        f"but cond has no key {value.key!r} (it has {sorted(cond)})")
                value = kwargs.pop(value.key)
            null[key] = value
        return kwargs, null


def _check_scale(scale: Any) -> float:
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a single number, got a tensor of shape "
                             f"{tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_uncond(uncond: Any) -> dict:
    if not isinstance(uncond, Mapping):
        raise TypeError(f"uncond must map cond keys to their unconditional values, e.g. "
                        f"{{'labels': torch.tensor([NULL])}}, got {type(uncond).__name__}")
    if not uncond:
        raise ValueError("uncond is empty: name at least one conditioning key and its "
                         "unconditional value (without one, guidance is the conditional velocity)")
    out = {}
    for key, value in uncond.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise TypeError(f"uncond keys must be keyword-argument names of the velocity, got "
                            f"{key!r}")
        if isinstance(value, FromCond):
            if value.key in uncond:
                raise ValueError(f"uncond[{key!r}] = FromCond({value.key!r}) names a key that "
                                 f"uncond itself guides; use a separate cond key")
        elif not isinstance(value, Tensor):
            raise TypeError(f"uncond[{key!r}] must be a tensor (leading size 1, or one row per "
                            f"sample) or FromCond(key), got {type(value).__name__}: conditional "
                            f"and unconditional values are stacked into one batch")
        elif value.dim() == 0:
            raise ValueError(f"uncond[{key!r}] is a 0-dim tensor; give it a leading dimension of "
                             f"size 1 (one row for every sample), e.g. value.reshape(1)")
        out[key] = value
    return out


def _rows(key: str, value: Any, n: int, what: str) -> Tensor:
    """``value`` as n rows: leading size n as is, leading size 1 broadcast (no copy)."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        got = type(value).__name__ if not isinstance(value, Tensor) else "a 0-dim tensor"
        raise ValueError(f"classifier_free_guidance: {what}[{key!r}] must be a tensor with a "
                         f"leading batch dimension (n = {n} rows, or 1 shared row) to be stacked "
                         f"with its unconditional value, got {got}")
    if value.shape[0] == n:
        return value
    if value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    hint = (" (optimize evaluates only the active rows: pass per-sample unconditional values "
            "through cond with FromCond)" if what == "uncond" else "")
    raise ValueError(f"classifier_free_guidance: {what}[{key!r}] has shape "
                     f"{tuple(value.shape)}, but the velocity was called on n = {n} rows: its "
                     f"leading size must be {n} or 1{hint}")


def _pair(key: str, cond_value: Any, null_value: Any, n: int) -> Tensor:
    """cat([conditional rows, unconditional rows]): [2n, ...]."""
    c = _rows(key, cond_value, n, "cond")
    u = _rows(key, null_value, n, "uncond")
    if c.shape[1:] != u.shape[1:] or c.dtype != u.dtype:
        raise ValueError(f"classifier_free_guidance: cond[{key!r}] rows are {tuple(c.shape[1:])} "
                         f"{c.dtype} but uncond[{key!r}] rows are {tuple(u.shape[1:])} {u.dtype}; "
                         f"they must match to be stacked into one batch")
    return torch.cat([c, u.to(c.device)])
