"""The fused ops and their backends (docs/design.md section 4): the PyTorch twins (twins.py), the
autograd formulas every compiled backend shares (autograd.py), the compiled extension's loader and
fake kernels (ext.py), the registry that resolves a backend name to an ``Ops`` (registry.py) and
``build_info`` (build.py). The lowest layer: imports nothing of dflow_fast but the compiled
extension and the Triton kernels, both lazily. This file imports nothing, so that the Triton
kernels can import ops/autograd.py without loading the registry that loads them."""
