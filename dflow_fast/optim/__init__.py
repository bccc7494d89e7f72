"""Batched optimizers over B independent problems: lbfgs.py (asynchronous per-sample L-BFGS with
strong-Wolfe line searches), adam.py (per-sample Adam), samples.py (the per-sample status they
share). Imports core/checks.py and ops/ only: an optimizer sees an ``evaluate(idx, X)`` callback, never a solver."""
