"""The solver core: input checks (checks.py), the velocity convention and its checked wrapper
(velocity.py), the plan of a solve (plan.py), the steps and their VJPs (steps.py, the plain
solvers and the one step loop; reversible_steps.py), and the VJP helpers (autodiff.py).
Imports ops/ only; everything else in dflow_fast builds on it."""
