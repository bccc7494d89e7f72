"""Solving one chunk: its problems built from (seed, index) alone, the initial x0 (backward blend
with per-problem noise), one batched ``optimize`` call, and the tensors a chunk file holds.

Why per-problem generators: a job's results must not depend on how many workers share it or on
resumption. Chunk k always holds the same problems, and every random number a problem uses (its
measurement noise and random mask, its initial noise, a class task's requested label when the
data has none) comes from a generator seeded by (seed, problem index, stream) alone
(:func:`~dflow_fast.jobs.config.problem_seed`), drawn on the CPU and then moved to the device, so
the draws do not depend on the device either.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..apps.demo import CLASS_TARGET_PROB, HISTORY
from ..optimize import optimize
from ..solve import solve
from ..tasks import ClassifierProblem, LinearProblem, Mask, Problem, make as make_task
from .config import JobConfig, problem_seed

#: statuses of OptimizeResult in the order of their codes in chunk files (``status`` uint8)
STATUS_NAMES = ("converged", "target", "max_iter", "max_eval", "nonfinite",
                "line_search_failed", "callback")
#: keys of every chunk file and of results.safetensors, in this order; ``target`` (the
#: requested labels) only for the class task
KEYS = ("index", "x0", "x1", "loss", "nit", "nfev", "nfe", "status", "success", "observation")
NUM_CLASSES = 10


@dataclass
class Solver:
    """What every chunk of a job shares: the settings, the ground truth of the selected
    problems (``truth`` float32 [n, C, H, W] on the CPU, ``labels`` [n] or None, problem j having
    data index ``start + j``), the velocity, the class task's classifier and the device."""

    cfg: JobConfig
    truth: Tensor
    labels: Optional[Tensor]
    start: int
    velocity: Callable
    classifier: Optional[Callable]
    device: torch.device
    dtype: torch.dtype

    @property
    def n(self) -> int:
        return self.truth.shape[0]

    @property
    def chunks(self) -> int:
        return math.ceil(self.n / self.cfg.batch)

    def chunk_rows(self, k: int) -> range:
        """Positions in the selection of chunk k's problems: k*batch .. (k+1)*batch - 1."""
        b = self.cfg.batch
        return range(k * b, min((k + 1) * b, self.n))

    def grid(self) -> dict:
        """The solve's time discretization: the velocity's own ``time_grid(steps)`` where it
        has one (a diffusion model's scheduler spacing), else ``steps`` uniform steps."""
        if hasattr(self.velocity, "time_grid"):
            return {"time_grid": self.velocity.time_grid(self.cfg.steps)}
        return {"steps": self.cfg.steps}

    def first_time(self) -> float:
        g = self.grid()
        return float(g["time_grid"][0]) if "time_grid" in g else 0.0

    def targets(self, rows: range) -> Tensor:
        """The class task's requested labels [len(rows)]: the data's label + 1 (mod 10, as the
        demo: a different class than the image's), else a label drawn from (seed, index)."""
        if self.labels is not None:
            return (self.labels[rows.start:rows.stop] + 1) % NUM_CLASSES
        out = []
        for j in rows:
            g = torch.Generator().manual_seed(problem_seed(self.cfg.seed, self.start + j,
                                                           "target"))
            out.append(torch.randint(NUM_CLASSES, (1,), generator=g))
        return torch.cat(out)

    def problem(self, rows: range) -> Problem:
        """The chunk's problems, each built on its own measurement generator, stacked."""
        truth = self.truth[rows.start:rows.stop].to(self.device, self.dtype)
        targets = self.targets(rows).to(self.device) if self.cfg.task == "class" else None
        parts = []
        for j, i in enumerate(rows):
            g = torch.Generator().manual_seed(problem_seed(self.cfg.seed, self.start + i,
                                                           "measurement"))
            parts.append(make_task(self.cfg.task, truth[j:j + 1], sigma=self.cfg.noise_sigma,
                                   generator=g, classifier=self.classifier,
                                   labels=None if targets is None else targets[j:j + 1]))
        return stack_problems(parts)

    def initial_x0(self, guess: Tensor, rows: range, velocity: Callable) -> Tensor:
        """Backward blend (:func:`dflow_fast.backward_blend`'s formula) with per-problem noise:
        ``x0 = sqrt(alpha) x0_back + sqrt(1 - alpha) z``, x0_back the backward solve of the
        guess [b, *S] from t = 1 to 0 (the job's solver and grid, reversed), z [b, *S] drawn
        from (seed, index, "noise") per problem. alpha = 0 skips the backward solve."""
        shape = tuple(guess.shape[1:])
        z = torch.cat([
            torch.randn((1, *shape), dtype=self.dtype, generator=torch.Generator().manual_seed(
                problem_seed(self.cfg.seed, self.start + i, "noise")))
            for i in rows]).to(self.device)
        alpha = float(self.cfg.alpha)
        if alpha == 0.0:
            return z
        grid = self.grid()
        back = ({"time_grid": grid["time_grid"].flip(0)} if "time_grid" in grid
                else {"steps": grid["steps"], "t0": 1.0, "t1": 0.0})
        with torch.no_grad():
            x_back = solve(velocity, guess, solver=self.cfg.solver, gradient="backprop",
                           **back)
        return math.sqrt(alpha) * x_back + math.sqrt(1.0 - alpha) * z

    def solve_chunk(self, k: int) -> tuple[dict[str, Tensor], dict]:
        """Chunk k's results: (tensors on the CPU keyed as KEYS, plus ``target`` for the class
        task; a summary with seconds and velocity calls)."""
        t0 = time.perf_counter()
        rows = self.chunk_rows(k)
        # gradient="auto" measures its memory plan once per velocity object and keeps that step's
        # calls out of nfe, so a chunk's results do not depend on what its worker solved before
        velocity = self.velocity
        p = self.problem(rows)
        x0 = self.initial_x0(p.guess, rows, velocity)
        # The discrepancy principle (as the demo): stop each problem once its data fit reaches
        # the noise level m sigma^2; the class task once the classifier gives the requested
        # class CLASS_TARGET_PROB.
        stop = p.noise_level if p.noise_level is not None else -math.log(CLASS_TARGET_PROB)
        res = optimize(velocity, p.cost, x0, solver=self.cfg.solver,
                       gradient=self.cfg.gradient, max_iter=self.cfg.max_iter,
                       history_size=HISTORY, stop_loss=stop, **self.grid())
        unknown = set(res.status) - set(STATUS_NAMES)
        if unknown:  # a status optimize gained: chunk files need a code for it
            raise RuntimeError(f"optimize returned statuses {sorted(unknown)} that "
                               "dflow_fast.jobs.problems.STATUS_NAMES lacks")
        codes = [STATUS_NAMES.index(s) for s in res.status]
        index = torch.arange(self.start + rows.start, self.start + rows.stop, dtype=torch.int64)
        tensors = {"index": index, "x0": res.x0, "x1": res.x1, "loss": res.loss,
                   "nit": res.nit, "nfev": res.nfev, "nfe": res.nfe,
                   "status": torch.tensor(codes, dtype=torch.uint8),
                   "success": res.success.to(torch.uint8), "observation": p.display}
        if self.cfg.task == "class":
            tensors["target"] = p.y
        tensors = {k_: v.detach().to("cpu").contiguous() for k_, v in tensors.items()}
        for key in ("nit", "nfev", "nfe"):
            tensors[key] = tensors[key].to(torch.int64)
        summary = {"seconds": time.perf_counter() - t0, "velocity_calls": res.velocity_calls}
        return tensors, summary


def stack_problems(parts: list[Problem]) -> Problem:
    """One batch from single-problem instances of the same task (a Mask operator stays shared
    when all masks are equal, and is stacked per sample when they differ, e.g. random
    inpainting)."""
    first = parts[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    if isinstance(first, LinearProblem):
        op = first.operator
        if isinstance(op, Mask) and any(not torch.equal(p.operator.mask, op.mask)
                                        for p in parts[1:]):
            op = Mask(torch.cat([p.operator.mask for p in parts]), op.name)
        return LinearProblem(first.name, cat("y"), cat("guess"), cat("display"), op, first.sigma)
    if isinstance(first, ClassifierProblem):
        return ClassifierProblem(first.name, cat("y"), cat("guess"), cat("display"),
                                 first.classifier)
    raise TypeError(f"cannot stack problems of type {type(first).__name__}")
