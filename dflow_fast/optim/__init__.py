"""Batched optimizers over B independent problems: lbfgs.py (asynchronous per-sample L-BFGS with
strong-Wolfe line searches, one host read per batched evaluation), wolfe.py (the line search:
scalar twin and B searches as device tensors), adam.py (per-sample Adam), samples.py (the
per-sample status they share), syncs.py (counting host reads of tensor values). Imports
core/checks.py and ops/ only: an optimizer sees an ``evaluate(idx, X)`` callback, never a solver."""
