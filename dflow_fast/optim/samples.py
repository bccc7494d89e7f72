"""Per-sample bookkeeping shared by the batched optimizers: each of the B problems has its own
status, iteration and evaluation counts and loss history."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

# evaluate(idx [n] int64 or None for all, X [n, D]) -> (f [n], g [n, D], x1 [n, *S])
Evaluate = Callable[[Optional[Tensor], Tensor], "tuple[Tensor, Tensor, Tensor]"]
# on_iteration(samples, x [B, D], f [B], done: the samples that just completed an iteration)
#   -> True to stop all
OnIteration = Callable[["Samples", Tensor, Tensor, list], bool]

#: statuses that count as a normal end (OptimizeResult.success)
SUCCESS = ("converged", "target", "max_iter", "max_eval")


@dataclass
class Samples:
    """Status (None while active, else why it stopped), iterations, evaluations and loss history
    of each of B samples."""

    B: int
    status: list = field(default_factory=list)
    nit: list = field(default_factory=list)
    nfev: list = field(default_factory=list)
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.status = [None] * self.B
        self.nit = [0] * self.B
        self.nfev = [0] * self.B
        self.history = [[] for _ in range(self.B)]

    def active(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s is None]

    def stop(self, i: int, why: str) -> None:
        if self.status[i] is None:
            self.status[i] = why

    def start(self, f: Tensor, g: Tensor) -> None:
        """Record the first evaluation of every sample; one whose value or gradient is not
        finite stops at once ("nonfinite")."""
        for i, (ok, fi) in enumerate(zip(finite_rows(f, g), f.tolist())):
            self.nfev[i] = 1
            self.history[i].append(fi)
            if not ok:
                self.stop(i, "nonfinite")


def finite_rows(f: Tensor, g: Tensor) -> list[bool]:
    """Per row: value and gradient all finite."""
    return (torch.isfinite(f) & torch.isfinite(g).all(1)).tolist()
