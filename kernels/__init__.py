"""Triton kernels of dflow_fast (installed as ``dflow_fast.kernels``).

Empty until the compiled-core issue lands: the fused solver-step and adjoint updates will live
here, each with its PyTorch twin in ``dflow_fast._ops`` and a parity test.
"""
