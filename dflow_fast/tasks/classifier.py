"""Classifier guidance: class-conditional generation through a classifier, a non-linear cost
(the cross-entropy of the requested label)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Problem


@dataclass
class ClassifierProblem(Problem):
    """B instances of ``cost = CE(classifier(x1), y)`` with ``y`` the requested labels [B]."""

    classifier: Callable[[Tensor], Tensor] = None

    def cost(self, x1: Tensor) -> Tensor:
        return F.cross_entropy(self.classifier(x1), self.y, reduction="none")

    def select(self, rows) -> "ClassifierProblem":
        return ClassifierProblem(self.name, self.y[rows], self.guess[rows], self.display[rows],
                                 self.classifier)


def class_problem(classifier: Callable[[Tensor], Tensor], labels: Tensor, shape,
                  dtype=torch.float32, device="cpu") -> ClassifierProblem:
    """Ask for ``labels`` [B] on samples of per-sample ``shape``. The guess is a blank image, so
    backward_blend starts from nearly pure noise."""
    blank = torch.zeros((len(labels), *shape), dtype=dtype, device=device)
    return ClassifierProblem("class", labels.to(device), blank, blank, classifier)
