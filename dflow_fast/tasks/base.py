"""The problem protocol every task family implements (docs/design.md section 1): a batch of B
independent instances of one task, with what :func:`dflow_fast.optimize` and
:func:`dflow_fast.backward_blend` need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor


@dataclass
class Problem:
    """B problem instances of task ``name``.

    ``y``: the observation (a measurement [B, ...], or target labels [B]); ``guess``: a
    data-space start [B, *S] for backward_blend; ``display``: the observation shown in data space
    [B, *S]. Subclasses give ``cost(x1 [B, *S]) -> [B]`` and ``select(rows)``.
    """

    name: str
    y: Tensor
    guess: Tensor
    display: Tensor

    def cost(self, x1: Tensor) -> Tensor:
        """Per-sample cost [B] of the solutions x1 [B, *S]; differentiable."""
        raise NotImplementedError

    @property
    def noise_level(self) -> Optional[float]:
        """The cost below which a solution fits the observation's noise (for
        ``optimize(..., stop_loss=...)``), or None when the task has no such level."""
        return None

    def select(self, rows: Sequence[int]) -> "Problem":
        """The problem restricted to samples ``rows`` (e.g. one instance for a per-image loop)."""
        raise NotImplementedError
