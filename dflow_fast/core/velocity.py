"""The velocity convention, ``velocity(t, x) -> [B, *S]`` (t = 0 noise, t = 1 data), and the two
wrappers every solve uses: :class:`ModelVelocity` for models called as ``model(x, t)``, and
:class:`CheckedVelocity`, which checks each output against x and counts evaluations."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

Velocity = Callable[[Tensor, Tensor], Tensor]


class ModelVelocity(nn.Module):
    """Adapts a model called as ``model(x, t)`` with ``t`` of shape [B] to ``velocity(t, x)``.

    ``t`` arrives as a 0-dim tensor (or [B]); it is broadcast to [B] for the model.
    """

    def __init__(self, model: nn.Module | Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model(x, t.expand(x.shape[0]) if t.dim() == 0 else t)


class CheckedVelocity:
    """Calls the user's velocity, checks its output against x, and counts evaluations.

    ``calls`` counts batched calls, ``rows`` the samples evaluated (sum of batch sizes)."""

    def __init__(self, velocity: Velocity):
        if not callable(velocity):
            raise TypeError(f"velocity must be callable as velocity(t, x), got "
                            f"{type(velocity).__name__}")
        self.velocity = velocity
        self.calls = 0
        self.rows = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        out = self.velocity(t, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"velocity must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(
                f"velocity(t, x) must return a tensor like x: x is {tuple(x.shape)} {x.dtype} on "
                f"{x.device}, the velocity returned {tuple(out.shape)} {out.dtype} on {out.device}")
        self.calls += 1
        self.rows += x.shape[0]
        return out
