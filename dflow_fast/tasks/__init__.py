"""Controlled-generation task families for D-Flow, each a :class:`~dflow_fast.tasks.base.Problem`
(cost, observation, guess, noise level): linear inverse problems (linear.py) and classifier
guidance (classifier.py) on images ``x [B, C, H, W]`` in ``[-1, 1]``.

Tasks (``make(name, x, ...)``):
    ``inpaint_box``    a centered square hole covering the same fraction of the image as the
                       paper's 40x40 hole on 128x128 (9.8%): 9x9 on 28x28;
    ``inpaint_random`` random missing pixels (default 70%);
    ``sr2``, ``sr4``   super-resolution from x2 / x4 average pooling;
    ``deblur``         Gaussian blur (std 1.5 px, 9x9 kernel, zero padding);
    ``denoise``        additive Gaussian noise only;
    ``class``          class-conditional generation through a classifier (non-linear cost:
                       cross-entropy of the target label).

Molecules (molecules.py, a separate registry ``MOLECULE_TASKS``: their states are padded point
clouds ``[B, M, 3 + K]`` with node masks, not images, so they stay out of ``TASKS``, which the
image demo and batch jobs iterate): ``molecule_problem(regressor, targets, mask)`` steers each
molecule's property (``alpha``) to its target; docs/molecules.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Problem
from .classifier import ClassifierProblem, class_problem
from .linear import (AvgPool, GaussianBlur, Identity, LinearOperator, LinearProblem, Mask,
                     center_box_mask, linear_problem, operator_for)
from .molecules import MOLECULE_TASKS, MoleculeProblem, molecule_problem

LINEAR_TASKS = ("inpaint_box", "inpaint_random", "sr2", "sr4", "deblur", "denoise")
TASKS = LINEAR_TASKS + ("class",)

__all__ = ["make", "TASKS", "LINEAR_TASKS", "Problem", "LinearProblem", "ClassifierProblem",
           "LinearOperator", "Mask", "AvgPool", "GaussianBlur", "Identity", "center_box_mask",
           "linear_problem", "class_problem", "operator_for", "MOLECULE_TASKS",
           "MoleculeProblem", "molecule_problem"]


def make(name: str, x: Tensor, *, sigma: float = 0.05, missing: float = 0.7,
         generator: torch.Generator | None = None, classifier=None,
         labels: Tensor | None = None) -> Problem:
    """Build task ``name`` (see module docstring) on ground-truth images x [B, C, H, W]."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {list(TASKS)}")
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    if name == "class":
        if classifier is None or labels is None:
            raise ValueError("task 'class' needs classifier= and labels=")
        return class_problem(classifier, labels, x.shape[1:], x.dtype, x.device)
    return linear_problem(name, operator_for(name, x, missing, generator), x, sigma, generator)
