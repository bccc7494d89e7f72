"""Per-sample Adam over B independent problems (elementwise, so samples are independent by
construction); the same active-set and non-finite handling as the batched L-BFGS."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..core.checks import check_positive, check_tolerances
from .samples import Evaluate, OnIteration, Samples, finite_rows


@dataclass(frozen=True)
class AdamOptions:
    """Adam settings: ``max_iter`` iterations per sample, learning rate ``lr``, stop a sample
    when ``max |g| <= tolerance_grad``; ``betas``, ``eps`` as in ``torch.optim.Adam``."""

    max_iter: int = 20
    lr: float = 0.05
    tolerance_grad: float = 1e-7
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def checked(self) -> "AdamOptions":
        """Validated; raises ValueError naming the field."""
        check_positive("max_iter", self.max_iter, integer=True)
        check_positive("lr", self.lr)
        check_tolerances(self)
        if not (len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_positive("eps", self.eps)
        return self


def batched_adam(evaluate: Evaluate, x: Tensor, options: AdamOptions, *,
                 on_iteration: Optional[OnIteration] = None):
    """Minimize B independent objectives from ``x`` [B, D] with Adam; returns
    ``(x [B, D], f [B], x1 [B, *S], samples)`` like :func:`~dflow_fast.optim.lbfgs.batched_lbfgs`.
    A sample whose step turns non-finite stops on its last finite iterate."""
    opt = options.checked()
    b1, b2 = opt.betas
    X = x.clone()
    f, g, x1 = evaluate(None, X)
    smp = Samples(X.shape[0])
    smp.start(f, g)
    m, v = torch.zeros_like(X), torch.zeros_like(X)
    for it in range(1, opt.max_iter + 1):
        small = (g.abs().amax(1) <= opt.tolerance_grad).tolist()
        for i in smp.active():
            if small[i]:
                smp.stop(i, "converged")
        act = smp.active()
        if not act:
            break
        idx = torch.tensor(act, device=X.device)
        gi = g[idx]
        m[idx] = b1 * m[idx] + (1 - b1) * gi
        v[idx] = b2 * v[idx] + (1 - b2) * gi * gi
        mhat = m[idx] / (1 - b1 ** it)
        vhat = v[idx] / (1 - b2 ** it)
        Xn = X[idx] - opt.lr * mhat / (vhat.sqrt() + opt.eps)
        fn, gn, x1n = evaluate(idx, Xn)
        good = finite_rows(fn, gn)
        keep = [r for r, ok in enumerate(good) if ok]
        for r, i in enumerate(act):
            smp.nfev[i] += 1
            if not good[r]:
                smp.stop(i, "nonfinite")  # keeps its last finite iterate
        if keep:
            kr = torch.tensor(keep, device=X.device)
            ki = idx[kr]
            X[ki], f[ki], g[ki], x1[ki] = Xn[kr], fn[kr], gn[kr], x1n[kr]
            for r in keep:
                smp.nit[act[r]] += 1
                smp.history[act[r]].append(fn[r].item())
        if on_iteration is not None and on_iteration(smp, X, f, [act[r] for r in keep]):
            for i in smp.active():
                smp.stop(i, "callback")
            break
    return X, f, x1, smp
