"""Adapters from other libraries' models to ``velocity(t, x, **cond)`` in dflow_fast's convention
(t = 0 noise, t = 1 data): diffusers models with their schedulers (diffusers.py), flow_matching
models (flow_matching.py), and classifier-free guidance (guidance.py). Neither library is
imported until an adapter is used: ``import dflow_fast`` never imports them (optional extras
``[diffusers]`` and ``[flow_matching]``). Layer 3: imports core/ only."""
from __future__ import annotations

import importlib

#: public name -> the module of this package that defines it
_NAMES = {"from_diffusers": "diffusers", "DiffusionVelocity": "diffusers",
          "FlowMatchVelocity": "diffusers", "from_flow_matching": "flow_matching",
          "classifier_free_guidance": "guidance", "FromCond": "guidance"}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dflow_fast.adapters' has no attribute {name!r}")
