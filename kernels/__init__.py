"""Triton kernels of dflow_fast (installed as ``dflow_fast.kernels``): not written yet."""


def check_available() -> None:
    raise ImportError("the Triton kernels are not implemented yet")
