"""Gradients through the solve: one autograd.Function per segment kind (adjoint.py: plain
solvers' discrete adjoint; reversible.py: the reversible solvers' stored and rebuilt segments;
auto.py: the memory-budget split and its graph segment), the helpers they share (common.py), and
the one table from gradient scheme to segments (dispatch.py). Imports core/ and ops/ only."""
